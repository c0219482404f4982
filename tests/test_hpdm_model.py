"""HPDM's patch pyramid and network (cogvideo/models/hpdm/): nested crops and the patches cut
from a video against pooling the whole video first; the grid-sampled context against a dense
reference that upsamples the coarser activations to the finer level and crops them; adaptive
computation runs exactly the (block, level) pairs its table names; context flows coarse to fine
only."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cogvideo.family import build_model, plain_model
from cogvideo.models.hpdm import pyramid
from cogvideo.models.hpdm.config import PRESETS, HPDMConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# three levels, time doubling per level: 2x8x8 patches of a 8x32x32 video
CFG = HPDMConfig(
    patch=(2, 8, 8),
    num_levels=3,
    temporal_scale=2,
    block_levels=(1, 2, 2, 3),
    interface_dim=16,
    latent_dim=16,
    num_latents=4,
    head_dim=8,
    cond_dim=16,
    num_classes=5,
)


def tiny_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu")
    for name, param in model.named_parameters():
        if param.dim() == 1 or name.startswith("head.") or ".modulation." in name:
            param.data.normal_(0, 0.1)  # non-trivial norms, modulations and head: every path counts
    return model.double()


def pyramid_boxes(cfg, offsets):
    """offsets [B, levels, 3] -> start, extent [B, levels, 3] (each level at its trained size)."""
    parts = [
        pyramid.boxes(cfg, lv, offsets[:, lv - 1], cfg.level_size(lv)) for lv in range(1, cfg.num_levels + 1)
    ]
    return torch.stack([p[0] for p in parts], 1), torch.stack([p[1] for p in parts], 1)


def test_nested_crops_lie_inside_each_other_on_the_token_grid_and_reach_everywhere():
    seen = set()
    for seed in range(200):
        offsets = pyramid.sample_offsets(CFG, torch.Generator().manual_seed(seed))
        start, extent = pyramid_boxes(CFG, offsets[None])
        assert torch.equal(offsets[0], torch.zeros(3, dtype=torch.long))  # level 1: the whole video
        for lv in range(1, CFG.num_levels):
            assert (start[0, lv] >= start[0, lv - 1] - 1e-12).all()
            assert (start[0, lv] + extent[0, lv] <= start[0, lv - 1] + extent[0, lv - 1] + 1e-12).all()
            assert (offsets[lv] % torch.tensor(CFG.tokenizer_patch) == 0).all()
        seen.update((axis, int(o)) for axis, o in enumerate(offsets[-1]))
    # level 3's patch starts at every token position of the 8x32x32 level along each axis
    assert seen == {(0, t) for t in range(7)} | {(a, 4 * i) for a in (1, 2) for i in range(7)}


def test_patches_are_crops_of_the_pooled_levels():
    """Crop-then-pool (the training path) equals pool-the-whole-video-then-crop."""
    video = torch.rand(3, *CFG.video_size, dtype=torch.float64)
    offsets = pyramid.sample_offsets(CFG, torch.Generator().manual_seed(3))
    patches = pyramid.extract_patches(CFG, video, offsets)
    for lv in range(1, CFG.num_levels + 1):
        factor = [v // s for v, s in zip(CFG.video_size, CFG.level_size(lv))]
        level = F.avg_pool3d(video[None], factor)[0]
        (t, h, w), (pt, ph, pw) = offsets[lv - 1].tolist(), CFG.patch
        assert torch.allclose(patches[lv - 1], level[:, t : t + pt, h : h + ph, w : w + pw], atol=1e-12)


@pytest.mark.parametrize("coarse_level,fine_level", [(1, 2), (1, 3), (2, 3)])
def test_grid_sampled_context_equals_upsampled_and_cropped_activations(coarse_level, fine_level):
    """Dense reference: the coarser patch's activation grid upsampled (trilinear, half-pixel
    centres) to the finer level's token resolution, cropped at the finer patch's place."""
    offsets = pyramid.sample_offsets(CFG, torch.Generator().manual_seed(11))
    start, extent = pyramid_boxes(CFG, offsets[None])
    coarse = (start[:, coarse_level - 1], extent[:, coarse_level - 1])
    fine = (start[:, fine_level - 1], extent[:, fine_level - 1])
    activations = torch.randn(1, 6, *CFG.token_grid, dtype=torch.float64)
    got = pyramid.sample_context(activations, pyramid.context_grid(CFG, fine, coarse))

    ratio = [f // c for f, c in zip(CFG.level_scale(fine_level), CFG.level_scale(coarse_level))]
    dense = F.interpolate(activations, scale_factor=ratio, mode="trilinear", align_corners=False)
    parent = [o * r for o, r in zip(offsets[coarse_level - 1].tolist(), ratio)]
    at = [(o - p) // k for o, p, k in zip(offsets[fine_level - 1].tolist(), parent, CFG.tokenizer_patch)]
    (t, h, w), (gt, gh, gw) = at, CFG.token_grid
    expected = dense[:, :, t : t + gt, h : h + gh, w : w + gw].flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-12)
    # sharp: the same crop one token over does not match
    shifted = dense[:, :, t : t + gt, h + 1 : h + 1 + gh, w : w + gw] if h + gh < dense.shape[3] else None
    shifted = dense[:, :, t : t + gt, h - 1 : h - 1 + gh, w : w + gw] if shifted is None else shifted
    assert not torch.allclose(got, shifted.flatten(2).transpose(1, 2), atol=1e-3)


def run_pyramid(model, x, offsets, cond, c_noise=None):
    start, extent = pyramid_boxes(model.cfg, offsets)
    if c_noise is None:
        c_noise = torch.full(offsets.shape[:2], -0.3, dtype=torch.float64)
    return model(x, c_noise, start, extent, cond)


def random_inputs(cfg=CFG, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.stack([pyramid.sample_offsets(cfg, g) for _ in range(batch)])
    x = torch.randn(batch, cfg.num_levels, 3, *cfg.patch, generator=g, dtype=torch.float64)
    return x, offsets, torch.randint(0, cfg.num_classes, (batch,), generator=g)


def record_block_runs(model):
    """(block, level) pairs the model runs: the level from run_level, the block from its forward."""
    runs, current = [], {}
    original = model.run_level

    def run_level(level, *args, **kwargs):
        current["level"] = level
        return original(level, *args, **kwargs)

    model.run_level = run_level
    for b, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, b=b: runs.append((b, current["level"])))
    return runs


def test_adaptive_computation_runs_exactly_the_blocks_its_table_names(monkeypatch):
    model = tiny_model()
    runs = record_block_runs(model)
    run_pyramid(model, *random_inputs())
    table = {(b, lv) for b, n in enumerate(CFG.block_levels) for lv in range(1, n + 1)}
    assert sorted(runs) == sorted(table) and len(runs) == len(table)  # each pair once
    assert {lv for b, lv in runs if b == 0} == {1} and {lv for b, lv in runs if b == 3} == {1, 2, 3}
    # the check is sharp: a model reading the table off by one level fails it
    monkeypatch.setattr(HPDMConfig, "levels_of_block", lambda self, b: range(1, self.block_levels[b]))
    runs.clear()
    run_pyramid(model, *random_inputs())
    assert sorted(runs) != sorted(table)


def test_context_flows_coarse_to_fine_only():
    model = tiny_model()
    x, offsets, cond = random_inputs()
    out = run_pyramid(model, x, offsets, cond)
    finer_changed = x.clone()
    finer_changed[:, 2] += 1.0
    out2 = run_pyramid(model, finer_changed, offsets, cond)
    assert torch.equal(out[:, :2], out2[:, :2]) and not torch.allclose(out[:, 2], out2[:, 2])
    coarser_changed = x.clone()
    coarser_changed[:, 0] += 1.0
    out3 = run_pyramid(model, coarser_changed, offsets, cond)
    assert all(not torch.allclose(out[:, lv], out3[:, lv]) for lv in range(3))  # the context reaches level 3


def test_a_level_of_the_pyramid_is_the_same_whether_run_jointly_or_alone():
    """run_level with the coarser levels' states as sources reproduces the joint forward (the
    sampler's path is the training path)."""
    from cogvideo.models.hpdm.model import Source

    model = tiny_model()
    x, offsets, cond = random_inputs()
    c_noise = torch.tensor([[-0.3, 0.2, 0.5], [0.1, -1.0, 0.0]], dtype=torch.float64)
    joint = run_pyramid(model, x, offsets, cond, c_noise)
    start, extent = pyramid_boxes(CFG, offsets)
    sources = []
    for lv in range(1, 4):
        box = (start[:, lv - 1], extent[:, lv - 1])
        out, states = model.run_level(lv, x[:, lv - 1], c_noise[:, lv - 1], box, cond, sources)
        assert torch.equal(out, joint[:, lv - 1])
        sources.append(Source(states, box))


def test_interface_attention_is_dense_attention_and_ties_frames_without_the_latents(monkeypatch):
    """`interface_attention`: before each block's read, the interface tokens take in a softmax
    attention over every token of their patch (by hand below), so with the latents' read and write
    cut (their output projections zeroed) one frame still reaches another; without it nothing does."""
    cfg = CFG.replace(interface_attention=True)
    model = tiny_model(cfg)
    block, heads = model.blocks[0], cfg.interface_dim // cfg.head_dim
    x = torch.randn(2, cfg.tokens_per_patch, cfg.interface_dim, dtype=torch.float64)
    z = torch.randn(2, cfg.num_latents, cfg.latent_dim, dtype=torch.float64)
    q, k, v = (
        t.unflatten(-1, (heads, cfg.head_dim)).transpose(1, 2)
        for t in block.mix.qkv(block.mix_norm(x)).chunk(3, -1)
    )
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim), dim=-1)
    expected = x + block.mix.out((weights @ v).transpose(1, 2).flatten(2))
    read_input = []
    block.read_interface.register_forward_hook(lambda module, args, out: read_input.append(args[0]))
    block(x, z, torch.randn(2, cfg.cond_dim, dtype=torch.float64))
    torch.testing.assert_close(read_input[0], expected, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        for b in model.blocks:
            for layer in (b.read.out, b.write.out):
                layer.weight.zero_(), layer.bias.zero_()
    box = pyramid.boxes(cfg, 1, torch.zeros(2, 3, dtype=torch.long), cfg.level_size(1))

    def reach():  # how much frame 1's output moves with frame 0's input
        video = torch.randn(2, 3, *cfg.patch, dtype=torch.float64, requires_grad=True)
        out, _ = model.run_level(1, video, torch.zeros(2, dtype=torch.float64), box, torch.tensor([0, 1]), [])
        (grad,) = torch.autograd.grad(out[:, :, 1].sum(), video)
        return float(grad[:, :, 0].abs().sum())

    assert reach() > 0
    for b in model.blocks:  # planted: the flag's layer built but never run
        monkeypatch.setattr(b, "mix", None)
    assert reach() == 0


@pytest.mark.parametrize(
    "preset,paper", [("hpdm-s", 178e6), ("hpdm-m", 321e6), ("hpdm-l", 725e6), ("hpdm-t2v", 3934e6)]
)
def test_presets_match_table_8_within_5_percent(preset, paper):
    count = sum(p.numel() for p in plain_model(PRESETS[preset]()).parameters())
    assert abs(count / paper - 1) < 0.05, (preset, count)


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="model.block_levels"):
        CFG.replace(block_levels=(2, 1, 3)).validate()
    with pytest.raises(ValueError, match="model.block_levels.*last block"):
        CFG.replace(block_levels=(1, 2)).validate()
    with pytest.raises(ValueError, match="model.tokenizer_patch"):
        CFG.replace(patch=(2, 9, 8)).validate()
    with pytest.raises(ValueError, match="model.head_overlap: needs even token heights"):
        CFG.replace(head_overlap=True, tokenizer_patch=(1, 4, 1)).validate()
    with pytest.raises(ValueError, match="model.interface_dim: its 2 heads"):
        CFG.validate(tensor_parallel=4)
    assert math.prod(CFG.token_grid) == CFG.tokens_per_patch == 8


class FixedOutput(torch.nn.Module):
    """A stand-in network whose F is the input doubled (records what it was given)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, start, extent, cond):
        self.seen = (x, c_noise, start, extent, cond)
        return 2 * x


@pytest.mark.parametrize("prediction", ["sample", "edm"])
def test_pyramid_loss_is_edms_weighted_error_by_hand(prediction):
    """x-prediction (the presets': D is the network's output, the weight's sigma floored at
    0.05) and EDM's mix (D = c_skip x + c_out F), each written out by hand."""
    import dataclasses

    from cogvideo.models.hpdm.loss import pyramid_loss, training_example

    floor = 0.05 if prediction == "sample" else 0.0
    cfg = CFG.replace(edm=dataclasses.replace(CFG.edm, prediction=prediction, weight_sigma_min=floor))
    assert CFG.edm.prediction == "sample" and CFG.edm.weight_sigma_min == 0.05
    video = torch.randint(0, 256, (*cfg.video_size, 3), dtype=torch.uint8)
    examples = [training_example(cfg, video, torch.tensor(c), seed=s) for s, c in ((1, 2), (2, 4))]
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    batch["sigma"][0, 0] = 0.01  # below the weight's floor
    model = FixedOutput()
    loss = pyramid_loss(cfg, model, batch, torch.device("cpu"))

    sd, expected = 0.5, []
    for e in batch_rows(batch):
        for lv in range(cfg.num_levels):
            s = float(e["sigma"][lv])
            clean, noisy = e["patches"][lv].double(), (e["patches"][lv] + s * e["noise"][lv]).double()
            c_in, c_skip = 1 / (s * s + sd * sd) ** 0.5, sd * sd / (s * s + sd * sd)
            c_out = s * sd / (s * s + sd * sd) ** 0.5
            if prediction == "sample":
                d, w = 2 * (c_in * noisy), max(s, floor)
            else:
                d, w = c_skip * noisy + c_out * 2 * (c_in * noisy), s
            weight = (w * w + sd * sd) / (w * sd) ** 2
            expected.append(weight * float((d - clean).pow(2).mean()))
    assert abs(float(loss) / (sum(expected) / len(expected)) - 1) < 1e-5
    assert torch.allclose(model.seen[1], torch.log(batch["sigma"]) / 4)  # c_noise = ln(sigma) / 4


def batch_rows(batch):
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["sigma"]))]


def test_training_examples_are_seeded_and_drop_the_condition_one_time_in_ten():
    from cogvideo.models.hpdm.loss import training_example

    video = torch.randint(0, 256, (*CFG.video_size, 3), dtype=torch.uint8)
    a, b = training_example(CFG, video, torch.tensor(2), 5), training_example(CFG, video, torch.tensor(2), 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["noise"], training_example(CFG, video, torch.tensor(2), 6)["noise"])
    dropped = sum(
        int(training_example(CFG, video, torch.tensor(2), s)["condition"]) == 5 for s in range(1000)
    )
    assert abs(dropped / 1000 - 0.1) < 5 * (0.1 * 0.9 / 1000) ** 0.5  # the null class is num_classes = 5
    with pytest.raises(
        ValueError, match=r"a video of \(8, 32, 16, 3\) pixels, the pyramid needs \(8, 32, 32, 3\)"
    ):
        training_example(CFG, video[:, :, :16], torch.tensor(2), 5)


def test_output_convolution_starts_as_the_identity_and_reads_across_token_borders(monkeypatch):
    """`output_conv`: D's pixels are a 1x3x3 convolution (zero-padded at the patch's edges) of the
    per-token head's pixels; built fresh it is the identity; trained, a pixel at a token's last
    column moves with the next token's first (planted: the convolution skipped, it does not)."""
    cfg = CFG.replace(output_conv=True)
    model = build_model(cfg, device="cpu").double()
    head = []
    model.smooth.register_forward_hook(lambda module, args, out: head.append(args[0]))
    x = torch.randn(2, 3, *cfg.patch, dtype=torch.float64)
    box = pyramid.boxes(cfg, 1, torch.zeros(2, 3, dtype=torch.long), cfg.level_size(1))

    def run():
        return model.run_level(1, x, torch.zeros(2, dtype=torch.float64), box, torch.tensor([0, 1]), [])[0]

    torch.testing.assert_close(run(), head[-1], rtol=0, atol=1e-15)  # the identity
    with torch.no_grad():
        model.smooth.weight.normal_(0, 0.3), model.smooth.bias.normal_(0, 0.1)
    out, pixels = run(), head[-1]
    padded, (_, h, w) = F.pad(pixels, (1, 1, 1, 1)), cfg.patch
    expected = model.smooth.bias.view(1, 3, 1, 1, 1) + sum(
        torch.einsum("oi,bithw->bothw", model.smooth.weight[:, :, 0, i, j], padded[..., i : i + h, j : j + w])
        for i in range(3)
        for j in range(3)
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    kw = cfg.tokenizer_patch[2]
    assert not torch.equal(out[..., kw - 1], pixels[..., kw - 1])  # the last column reads the next token
    monkeypatch.setattr(model, "smooth", None)  # planted: the layer built but not run
    assert not torch.allclose(run(), expected)


def test_overlapped_head_blends_each_tokens_footprint_with_its_neighbours(monkeypatch):
    """`head_overlap`: each token's head writes 2x its height and width, centred on it; a pixel is
    the tent-weighted mean of the footprints covering it (by hand, pixel by pixel), so footprints
    constant per token give the bilinear upsampling of the token values (half-pixel centres,
    clamped at the patch's edges): nothing steps at a token border. Planted: a flat window (the
    footprints' plain mean) fails both."""
    from cogvideo.models.hpdm import model as hpdm_model

    cfg = CFG.replace(head_overlap=True, patch=(2, 8, 12), tokenizer_patch=(1, 4, 2))
    model = build_model(cfg, device="cpu").double()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3), model.head.bias.normal_(0, 0.1)
    heads = []
    model.head.register_forward_hook(lambda module, args, out: heads.append(out))
    x = torch.randn(2, 3, *cfg.patch, dtype=torch.float64)
    box = pyramid.boxes(cfg, 1, torch.zeros(2, 3, dtype=torch.long), cfg.level_size(1))

    def run():
        return model.run_level(1, x, torch.zeros(2, dtype=torch.float64), box, torch.tensor([0, 1]), [])[0]

    out = run()
    (kt, kh, kw), (t, h, w) = cfg.tokenizer_patch, cfg.token_grid
    footprints = heads[-1].view(2, t, h, w, 3, kt, 2 * kh, 2 * kw)

    def tent(i, k):  # footprint index i of 2k pixels
        return 1 - abs(i + 0.5 - k) / k

    expected = torch.zeros_like(out)
    for y in range(h * kh):
        for xx in range(w * kw):
            total, weight = 0, 0
            for m in range(h):
                for n in range(w):
                    i, j = y - m * kh + kh // 2, xx - n * kw + kw // 2
                    if 0 <= i < 2 * kh and 0 <= j < 2 * kw:
                        share = tent(i, kh) * tent(j, kw)
                        total = total + share * footprints[:, :, m, n, :, :, i, j].permute(
                            0, 2, 1, 3
                        ).flatten(2, 3)
                        weight += share
            expected[..., y, xx] = total / weight
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.shape == (2, 3, *cfg.patch)

    values = torch.randn(2, t, h, w, 3, dtype=torch.float64)  # one value per token and colour
    constant = values[..., None].expand(-1, -1, -1, -1, -1, kt * 4 * kh * kw).flatten(4)
    upsampled = F.interpolate(
        values.permute(0, 1, 4, 2, 3).flatten(0, 1), scale_factor=(kh, kw), mode="bilinear"
    )
    blended = hpdm_model.overlap_add(constant, cfg.tokenizer_patch)
    torch.testing.assert_close(
        blended, upsampled.unflatten(0, (2, t)).transpose(1, 2), rtol=1e-12, atol=1e-12
    )

    monkeypatch.setattr(
        hpdm_model, "tent", lambda length, device=None, dtype=None: torch.ones(length, dtype=dtype)
    )
    assert not torch.allclose(run(), expected)
    assert not torch.allclose(hpdm_model.overlap_add(constant, cfg.tokenizer_patch), blended)


def test_each_level_draws_its_noise_levels_around_its_own_p_mean(monkeypatch):
    """`level_p_mean`: level l's ln(sigma) ~ N(level_p_mean[l], p_std^2), the other draws of the
    example unchanged; empty, every level draws around edm.p_mean (planted: the table ignored)."""
    from cogvideo.models.hpdm.loss import training_example

    cfg = CFG.replace(level_p_mean=(2.0, -1.2, 0.5))
    video = torch.randint(0, 256, (*cfg.video_size, 3), dtype=torch.uint8)

    def mean_log_sigma():
        draws = [training_example(cfg, video, torch.tensor(2), s)["sigma"] for s in range(300)]
        return torch.stack(draws).double().log().mean(0)

    bound = 5 * cfg.edm.p_std / 300**0.5
    assert torch.allclose(mean_log_sigma(), torch.tensor(cfg.level_p_mean, dtype=torch.float64), atol=bound)
    same = training_example(CFG, video, torch.tensor(2), 7), training_example(cfg, video, torch.tensor(2), 7)
    assert all(torch.equal(same[0][k], same[1][k]) for k in ("offsets", "noise", "patches", "condition"))
    monkeypatch.setattr(HPDMConfig, "level_edm", lambda self, level: self.edm)
    assert not torch.allclose(
        mean_log_sigma(), torch.tensor(cfg.level_p_mean, dtype=torch.float64), atol=bound
    )
    with pytest.raises(ValueError, match=r"model.level_p_mean: 2 means for 3 levels"):
        CFG.replace(level_p_mean=(1.0, 0.0)).validate()


def _tokens_by_hand(model, cfg, x, box):
    """The interface tokens computed by hand: each token's pixels (channel-major, then its frames,
    rows and columns) through the tokenizer, its coordinates through their map, and with
    position_embeddings its frame's row of the time table plus its place's (row-major) row of the
    space table."""
    kt, kh, kw = cfg.tokenizer_patch
    t, h, w = cfg.token_grid
    tokens = []
    coords = pyramid.token_coordinates(cfg, *box).to(x.dtype)
    for i in range(t):
        for j in range(h):
            for k in range(w):
                pixels = x[:, :, i * kt : (i + 1) * kt, j * kh : (j + 1) * kh, k * kw : (k + 1) * kw]
                index = (i * h + j) * w + k
                token = model.tokenizer(pixels.flatten(1)) + model.coordinates(coords[:, index])
                if cfg.position_embeddings:
                    token = token + model.time_positions[i] + model.space_positions[j * w + k]
                tokens.append(token)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("positions", [False, True])
def test_interface_tokens_are_pixels_coordinates_and_position_embeddings_by_hand(positions, monkeypatch):
    cfg = CFG.replace(position_embeddings=positions, patch=(2, 8, 16))  # rows != columns
    model = tiny_model(cfg)
    assert hasattr(model, "space_positions") == positions  # checkpoints without the field have none
    if positions:
        t, h, w = cfg.token_grid
        assert model.space_positions.shape == (h * w, cfg.interface_dim)
        assert model.time_positions.shape == (t, cfg.interface_dim)
        assert min(model.space_positions.std(), model.time_positions.std()) > 0  # initialised
    x = torch.randn(2, 3, *cfg.patch, dtype=torch.float64)
    offsets = torch.tensor([[0, 0, 0], [0, 8, 16]])
    box = pyramid.boxes(cfg, 2, offsets, cfg.level_size(2))
    expected = _tokens_by_hand(model, cfg, x, box)
    torch.testing.assert_close(model.tokenize(x, box), expected, rtol=1e-12, atol=1e-12)
    if positions:  # planted: the space table read column-major (its rows transposed)
        t, h, w = cfg.token_grid
        column_major = model.space_positions.detach().unflatten(0, (h, w)).transpose(0, 1).flatten(0, 1)
        monkeypatch.setattr(model, "space_positions", torch.nn.Parameter(column_major))
        assert not torch.allclose(model.tokenize(x, box), expected)


def _condition_by_hand(model, cfg, level, c_noise, cond, pad):
    """The modulating vector of a text preset with `piece_conditioning`: silu(time + level + the sum
    of the rows of the caption's pieces other than `pad`)."""
    from cogvideo.models.hpdm.model import TIME_FEATURES

    half = TIME_FEATURES // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = c_noise[:, None] * 1000.0 * freqs[None]
    time = model.time_fc2(F.silu(model.time_fc1(torch.cat([angles.cos(), angles.sin()], dim=-1))))
    table = model.piece_embeddings.weight
    rows = torch.stack(
        [sum((table[p] for p in c.tolist() if p != pad), table.new_zeros(cfg.cond_dim)) for c in cond]
    )
    return F.silu(time + model.level_embeddings.weight[level - 1] + rows)


def test_piece_conditioning_sums_a_row_per_caption_piece_and_leaves_padding_out(monkeypatch):
    """`piece_conditioning`: the condition vector adds one learned row per caption piece (a word
    moves it as far as a class label does), padding left out, so a caption of padding alone adds
    nothing; planted: the padding counted (another pad id), the vector is not the hand-computed one."""
    cfg = CFG.replace(condition="text", text_length=5, text_dim=8, piece_conditioning=True)
    model = tiny_model(cfg)
    assert not hasattr(model, "text_pooled") and model.piece_embeddings.weight.shape == (
        cfg.vocab.num_text_tokens,
        cfg.cond_dim,
    )
    pad = cfg.vocab.pad_piece_id
    cond = torch.tensor([[7, 9, 9, pad, pad], [7, 9, 12, pad, pad], [pad] * 5])
    c_noise = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    vector, extra = model.condition(2, c_noise, cond)
    torch.testing.assert_close(
        vector, _condition_by_hand(model, cfg, 2, c_noise, cond, pad), rtol=1e-12, atol=1e-12
    )
    assert extra.shape == (3, cfg.text_length, cfg.latent_dim)  # the caption's tokens still join the latents
    monkeypatch.setattr(model, "cfg", cfg.replace(vocab=dataclasses.replace(cfg.vocab, pad_piece_id=1)))
    assert not torch.allclose(model.condition(2, c_noise, cond)[0], vector)


def test_interface_modulation_conditions_the_head_and_the_interface_feed_forward(monkeypatch):
    """`interface_modulation`: the head's norm and each block's interface feed-forward norm take
    the condition vector's scale and shift (zero at initialisation: plain LayerNorms); the head's
    pixels by hand; planted: the condition not passed to them, two conditions give the same output."""
    from cogvideo.models.hpdm import model as model_module
    from cogvideo.models.hpdm.model import ModulatedNorm

    cfg = CFG.replace(interface_modulation=True)
    fresh = build_model(cfg, device="cpu").double()
    assert all(
        isinstance(n, ModulatedNorm) for n in [fresh.head_norm, *(b.write_ff_norm for b in fresh.blocks)]
    )
    assert all(not p.any() for n, p in fresh.named_parameters() if "norm.modulation" in n)  # unmodulated
    model = tiny_model(cfg)
    tokens = torch.randn(2, cfg.tokens_per_patch, cfg.interface_dim, dtype=torch.float64)
    vector = torch.randn(2, cfg.cond_dim, dtype=torch.float64)
    scale, shift = model.head_norm.modulation(vector).unsqueeze(1).chunk(2, dim=-1)
    normed = F.layer_norm(tokens, (cfg.interface_dim,)) * (1 + scale) + shift
    kt, kh, kw = cfg.tokenizer_patch
    t, h, w = cfg.token_grid
    pixels = model.head(normed).unflatten(-1, (3, kt, kh, kw)).unflatten(1, (t, h, w))
    expected = pixels.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(2, 3, *cfg.patch)
    torch.testing.assert_close(model.detokenize(tokens, vector), expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, *cfg.patch, dtype=torch.float64)
    box = pyramid.boxes(cfg, 1, torch.zeros(2, 3, dtype=torch.long), cfg.level_size(1))
    block, seen = model.blocks[0], {}
    block.register_forward_pre_hook(lambda module, args: seen.update(x=args[0], cond=args[2]))
    block.register_forward_hook(lambda module, args, out: seen.update(out=out[0]))
    block.write.register_forward_hook(lambda module, args, out: seen.update(write=out))

    def block_by_hand():  # the write's residual, then the feed-forward on the modulated norm
        written = seen["x"] + seen["write"]
        scale, shift = block.write_ff_norm.modulation(seen["cond"]).unsqueeze(1).chunk(2, dim=-1)
        return written + block.write_ff(F.layer_norm(written, (cfg.interface_dim,)) * (1 + scale) + shift)

    model.run_level(1, x, torch.zeros(2, dtype=torch.float64), box, torch.tensor([0, 1]), [])
    torch.testing.assert_close(seen["out"], block_by_hand(), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(model_module, "_norm", lambda norm, x, cond: ModulatedNorm.forward(norm, x, cond * 0))
    model.run_level(1, x, torch.zeros(2, dtype=torch.float64), box, torch.tensor([0, 1]), [])
    assert not torch.allclose(seen["out"], block_by_hand())  # planted: the condition not passed


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_position_tables_start_at_position_std(std):
    """`position_std`: the space and time tables' initial spread (RIN's unit normal at 1.0), within
    four standard errors of a sample's spread (planted: the tables at init_std whatever it says)."""
    cfg = CFG.replace(position_embeddings=True, position_std=std)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    for table in (model.space_positions, model.time_positions):
        error = 4 * std / math.sqrt(2 * table.numel())
        assert abs(float(table.detach().std()) - std) < error
