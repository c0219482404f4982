"""DSR (CogView2's direct super-resolution) as released: layout, position ids, the mask of each
block and the two local windows, each against what the release builds or the reference's
formulas (THUDM/CogVideo `sr_pipeline/`), and the plain-PyTorch local attention against a
dense-mask reference at the published grid pair (20 x 20 -> 60 x 60) and a small one (4 -> 12)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cogvideo.family import build_model, get_family, plain_model
from cogvideo.models.dsr import layout
from cogvideo.models.dsr import local_attention as local
from cogvideo.models.dsr.config import PRESETS, DsrConfig
from cogvideo.models.dsr.model import high_res_loss, init_from_backbone, is_dsr_param

TINY = PRESETS["dsr-tiny"]().validate()
PUBLISHED = PRESETS["cogview2-dsr"]().validate()
GRIDS = {
    "4->12": TINY,
    "5->10": TINY.replace(frame_size=20, frame_tokens=5, high_frame_tokens=10, max_position_embeddings=40),
    "20->60": TINY.replace(
        frame_size=160,
        frame_tokens=20,
        high_frame_tokens=60,
        max_position_embeddings=420,
        num_layers=1,
        hidden_size=8,
        num_heads=2,
    ),
}


def release_positions(cfg: DsrConfig, n_pad: int) -> torch.Tensor:
    """filling_sequence_dsr's position ids: pads 0, text 0.., low-res from the low offset, then
    the high-res ids max_sequence_length + j (the extra table's row j)."""
    T, n = cfg.text_length, cfg.tokens_per_frame
    return torch.cat(
        [
            torch.zeros(n_pad, dtype=torch.long),
            torch.arange(T - n_pad),
            torch.arange(cfg.low_position_offset, cfg.low_position_offset + n),
            cfg.max_position_embeddings + torch.arange(cfg.high_tokens),
        ]
    )


def release_mask(cfg: DsrConfig, n_pad: int) -> torch.Tensor:
    """filling_sequence_dsr's attention mask over the rows before the high-res block."""
    T, L = cfg.text_length, cfg.high_start
    mask = torch.ones(L, L)
    mask[:T, T:] = 0
    mask[n_pad:, :n_pad] = 0
    return mask.bool()


@functools.cache
def _reference_windows(low_side: int, high_side: int, lw: int, hr: int, hc: int) -> torch.Tensor:
    s, n = high_side // low_side, low_side * low_side
    sees = np.zeros((high_side * high_side, n + high_side * high_side), dtype=bool)
    for r in range(high_side):
        for c in range(high_side):
            for k in range(lw * lw):
                a, b = r // s - lw // 2 + k // lw, c // s - lw // 2 + k % lw
                if 0 <= a < low_side and 0 <= b < low_side:
                    sees[r * high_side + c, a * low_side + b] = True
            for k in range(hr * hc):
                a, b = r - hr // 2 + k // hc, c - hc // 2 + k % hc
                if 0 <= a < high_side and 0 <= b < high_side:
                    sees[r * high_side + c, n + a * high_side + b] = True
    return torch.from_numpy(sees)


def reference_windows(cfg: DsrConfig) -> torch.Tensor:
    """[N, n + N] from the reference's formulas, one query and one slot at a time: 25 low-res
    cells (r//s - 2 + k//5, c//s - 2 + k%5), 45 high-res cells (r - 4 + k//5, c - 2 + k%5)."""
    return _reference_windows(
        cfg.frame_tokens, cfg.high_frame_tokens, cfg.low_window, cfg.high_window_rows, cfg.high_window_cols
    )


def test_published_layout_is_96_496_4096():
    cfg = PUBLISHED
    assert (cfg.text_length, cfg.high_start, cfg.seq_length) == (96, 496, 4096)
    assert (cfg.low_position_offset, cfg.high_tokens, cfg.window_keys) == (513, 3600, 70)
    assert release_positions(cfg, 10)[[96, 495, 496, 4095]].tolist() == [513, 912, 1024, 4623]


@pytest.mark.parametrize("n_pad", [0, 3, TINY.text_length])
def test_position_ids_and_masks_are_the_releases(n_pad):
    cfg = TINY
    text = [cfg.vocab.text_offset + 5 + i for i in range(cfg.text_length - n_pad)]
    low = torch.arange(cfg.tokens_per_frame) % cfg.vocab.num_image_tokens
    high = torch.arange(cfg.high_tokens) % cfg.vocab.num_image_tokens
    tokens, targets = layout.build_example(cfg, text, low.view(4, 4), high.view(12, 12))
    assert tokens[:n_pad].tolist() == [0] * n_pad  # the release's pad id, an image code
    assert tokens[cfg.high_start :].eq(cfg.vocab.boi_id).all() and torch.equal(targets, high)
    pads = layout.text_pads(cfg, tokens[None])
    ours = torch.cat(
        [layout.position_ids(cfg, pads)[0], cfg.max_position_embeddings + torch.arange(cfg.high_tokens)]
    )
    assert torch.equal(ours, release_positions(cfg, n_pad))
    assert torch.equal(layout.context_mask(cfg, pads)[0, 0], release_mask(cfg, n_pad))


def low_res_slots_by_hand(cfg: DsrConfig, low: torch.Tensor) -> list[int]:
    """Slot (r, c) of the high-res grid holds the code of the low-res cell it lies in."""
    s, side = cfg.scale, cfg.high_frame_tokens
    return [int(low[r // s, c // s]) for r in range(side) for c in range(side)]


@pytest.mark.parametrize("grid", ["4->12", "5->10"])
def test_low_res_slots_hold_the_code_of_their_cell(grid, monkeypatch):
    """high_slots=low_res (a deviation from the release's `<start_of_image>` slots): each
    high-res slot holds its low-res cell's code, the rows before them as the release's; a
    planted periodic tiling (cell (r % side, c % side), the release's position-table quirk) fails."""
    cfg = GRIDS[grid].replace(high_slots="low_res").validate()
    low = torch.randperm(cfg.vocab.num_image_tokens)[: cfg.tokens_per_frame].view(cfg.frame_tokens, -1)
    text, high = [cfg.vocab.text_offset + 1], torch.zeros(cfg.high_tokens, dtype=torch.long)
    tokens, _ = layout.build_example(cfg, text, low, high)
    assert tokens[cfg.high_start :].tolist() == low_res_slots_by_hand(cfg, low)
    released, _ = layout.build_example(cfg.replace(high_slots="boi"), text, low, high)
    assert torch.equal(tokens[: cfg.high_start], released[: cfg.high_start])
    monkeypatch.setattr(
        layout,
        "high_slot_tokens",
        lambda cfg, low: low.reshape(cfg.frame_tokens, -1).repeat(cfg.scale, cfg.scale).flatten(),
    )
    planted, _ = layout.build_example(cfg, text, low, high)
    assert planted[cfg.high_start :].tolist() != low_res_slots_by_hand(cfg, low)


def test_an_unknown_high_slot_input_is_refused_by_name():
    with pytest.raises(ValueError, match=r"model.high_slots: 'codes' is not one of \['boi', 'low_res'\]"):
        TINY.replace(high_slots="codes").validate()


@pytest.mark.parametrize("grid", GRIDS)
def test_windows_are_the_reference_formulas(grid):
    assert torch.equal(layout.high_res_keys(GRIDS[grid]), reference_windows(GRIDS[grid]))


def dense_reference(cfg, q, k_high, v_high, k_low, v_low):
    """softmax(q k^T / sqrt(d)) v over [low-res keys; high-res keys], windows from the reference."""
    keys, values = torch.cat([k_low, k_high], dim=2), torch.cat([v_low, v_high], dim=2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~reference_windows(cfg), float("-inf"))
    return scores.softmax(-1) @ values


def random_qkv(cfg, heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    high = [torch.randn(1, heads, cfg.high_tokens, d, generator=g, dtype=torch.float64) for _ in range(3)]
    low = [torch.randn(1, heads, cfg.tokens_per_frame, d, generator=g, dtype=torch.float64) for _ in range(2)]
    return high, low


@functools.cache
def qkv_and_reference(grid: str):
    """Random float64 queries, keys and values at `grid` and the dense reference's context."""
    cfg = GRIDS[grid]
    (q, kh, vh), (kl, vl) = random_qkv(cfg)
    return (q, kh, vh), (kl, vl), dense_reference(cfg, q, kh, vh, kl, vl)


@pytest.mark.parametrize(
    "grid, tile_cells, chunk_rows",
    [
        *((grid, local.TILE_CELLS, local.CHUNK_ROWS) for grid in GRIDS),
        ("4->12", 1, 1),
        ("4->12", 2, 1),
        ("4->12", 4, 1),
        ("20->60", 4, 3),
    ],
)
def test_local_attention_equals_the_dense_mask_reference(grid, tile_cells, chunk_rows):
    """Any tiling and chunking (5 -> 10: the low-res side is no multiple of TILE_CELLS, one cell
    per tile; 20 -> 60 in tiles of 4 x 4 cells, 3 tile rows a chunk: the last chunk is short)."""
    cfg = GRIDS[grid]
    (q, kh, vh), (kl, vl), expected = qkv_and_reference(grid)
    ours = local.local_attention(q, kh, vh, kl, vl, local.Windows(cfg, q.device, tile_cells, chunk_rows))
    assert (ours - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


def test_a_window_one_row_short_each_side_is_caught(monkeypatch):
    cfg = GRIDS["4->12"]
    (q, kh, vh), (kl, vl), expected = qkv_and_reference("4->12")
    real = layout.window_offsets

    def seven_rows(cfg):
        low, high = real(cfg)
        return low, [(a, b) for a, b in high if abs(a) < 4]  # a 7 x 5 box instead of 9 x 5

    monkeypatch.setattr(local, "window_offsets", seven_rows)
    ours = local.local_attention(q, kh, vh, kl, vl, local.Windows(cfg, q.device))
    assert (ours - expected).abs().max().item() > 1e-3


def test_out_of_grid_cells_left_unmasked_are_caught(monkeypatch):
    """The gathered keys of cells outside a grid are copies of edge cells: only the mask keeps
    them out (planted: every gathered cell counted as inside its grid)."""
    cfg = GRIDS["4->12"]
    (q, kh, vh), (kl, vl), expected = qkv_and_reference("4->12")
    monkeypatch.setattr(local, "_inside", lambda rows, cols, size: torch.ones_like(rows, dtype=torch.bool))
    ours = local.local_attention(q, kh, vh, kl, vl, local.Windows(cfg, q.device))
    assert (ours - expected).abs().max().item() > 1e-3


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_local_attention_memory_grows_with_the_window_not_the_grid():
    """At 20 x 20 -> 60 x 60 no tensor the local path makes holds more than one chunk's scores
    over its tiles' gathered keys (at most queries x tile_keys, a function of the windows and the
    tile alone: the same at 4 -> 12) or the keys of both grids side by side; the dense path's mask
    cells alone are queries x all keys (23x the tile's keys, 57x the window). The windows' mask,
    built once per forward for every layer and the whole batch, is queries x tile_keys bools."""
    cfg = GRIDS["20->60"]
    tiling = local.Windows(cfg, torch.device("cpu"))
    assert tiling.tile_keys == local.Tiling(GRIDS["4->12"]).tile_keys < 3 * cfg.window_keys
    (q, kh, vh), (kl, vl) = random_qkv(cfg, heads=1, d=2)
    B, H, N, d = q.shape
    assert tiling.hidden.numel() == N * tiling.tile_keys
    with LargestTensor() as seen:
        local.local_attention(q, kh, vh, kl, vl, tiling)
    chunk_scores = tiling.chunk_tiles * tiling.tile_queries * tiling.tile_keys
    assert chunk_scores <= N * tiling.tile_keys
    assert seen.largest <= B * H * max((cfg.tokens_per_frame + N) * d, chunk_scores)
    with LargestTensor() as dense:
        dense_reference(cfg, q, kh, vh, kl, vl)
    assert dense.largest >= B * H * N * (cfg.tokens_per_frame + N)


def dsr_tokens(cfg, n_pads=(0, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_pad in n_pads:
        text = cfg.vocab.text_offset + torch.randint(
            cfg.vocab.num_text_tokens, (cfg.text_length - n_pad,), generator=g
        )
        low = torch.randint(cfg.vocab.num_image_tokens, (cfg.tokens_per_frame,), generator=g)
        high = torch.zeros(cfg.high_tokens, dtype=torch.long)
        rows.append(layout.build_example(cfg, text, low, high)[0])
    return torch.stack(rows)


def randomised(cfg, seed=0):
    model = build_model(cfg, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1 + noise if "layernorm" in name and name.endswith("weight") else noise)
    return model.double().eval()


@pytest.mark.parametrize("grid", GRIDS)
def test_the_model_local_path_equals_its_dense_path(grid):
    cfg = GRIDS[grid]
    model = randomised(cfg)
    tokens = dsr_tokens(cfg, (0, 3) if grid == "4->12" else (3,))
    with torch.no_grad():
        ours = model(tokens)
        model.dense_attention = True
        dense = model(tokens)
    assert ours.shape == (len(tokens), cfg.high_tokens, cfg.vocab.vocab_size)
    assert (ours - dense).abs().max().item() <= 1e-12 * dense.abs().max().item()


def test_high_res_logits_ignore_pads():
    """Pads are invisible: a prompt padded with another id (that config's pad) gives the same logits."""
    cfg = TINY
    tokens = dsr_tokens(cfg, (3,))
    other = tokens.clone()
    other[0, :3] = 7
    with torch.no_grad():
        assert torch.equal(randomised(cfg.replace(text_pad_id=7))(other), randomised(cfg)(tokens))


def test_loss_is_on_the_high_res_tokens_over_image_ids():
    cfg = TINY
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, cfg.high_tokens, cfg.vocab.vocab_size, generator=g, dtype=torch.float64)
    targets = torch.randint(cfg.vocab.num_image_tokens, (2, cfg.high_tokens), generator=g)
    by_hand = -logits[..., : cfg.vocab.num_image_tokens].log_softmax(-1).gather(-1, targets[..., None]).mean()
    assert torch.allclose(high_res_loss(cfg, logits, targets).double(), by_hand, rtol=1e-6)


def test_only_dsr_parameters_train_and_reinit_copies_the_backbone():
    cfg = TINY
    trained = {n for n, p in plain_model(cfg).named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in plain_model(cfg).named_parameters() if is_dsr_param(n)}
    assert "high_position_embeddings.weight" in trained and "layers.1.high_attention.dense.bias" in trained
    unfrozen = plain_model(cfg.replace(train_backbone=True))  # the option (off by default, as released)
    assert all(p.requires_grad for p in unfrozen.parameters())
    full = build_model(cfg, device="cpu").state_dict()
    backbone = {k: v for k, v in full.items() if not is_dsr_param(k)}
    dsr = init_from_backbone(backbone, cfg)
    assert set(dsr) == set(full)
    video = {
        **backbone,
        "layers.0.temporal_gate": torch.zeros(4),
        "frame_position_embeddings.weight": torch.zeros(2, 4),
    }
    assert set(init_from_backbone(video, cfg)) == set(
        full
    )  # a CogVideo stage's backbone, temporal parts left out
    assert torch.equal(
        dsr["layers.0.high_attention.query_key_value.weight"],
        backbone["layers.0.attention.query_key_value.weight"],
    )
    table, high = backbone["position_embeddings.weight"], dsr["high_position_embeddings.weight"]
    side, R = cfg.frame_tokens, cfg.high_frame_tokens
    for r in range(R):  # the release's tiling: extra[R r + c] = base[offset + side (r % side) + c % side]
        for c in range(R):
            assert torch.equal(
                high[r * R + c], table[cfg.image_position_offset + side * (r % side) + c % side]
            )


def test_the_family_is_registered_with_its_presets():
    family = get_family("dsr")
    assert set(family.presets) >= {"dsr-tiny", "dsr-small", "cogview2-dsr"}
    assert family.tp_plan.rule("layers.3.high_attention.query_key_value.weight") == (0, 3)
    assert family.tp_plan.rule("layers.3.high_attention.dense.weight") == (1, 1)
    assert family.tp_plan.rule("high_position_embeddings.weight") is None


def test_the_local_path_trains_as_the_dense_path():
    """Gradients of DSR's parameters through the local windows equal the dense-mask path's
    (float64, a training step's loss on the high-res codes)."""
    cfg = TINY.replace(train_backbone=True)
    tokens = dsr_tokens(cfg, (0, 3))
    targets = torch.randint(
        cfg.vocab.num_image_tokens, (2, cfg.high_tokens), generator=torch.Generator().manual_seed(1)
    )
    grads = {}
    for dense in (False, True):
        model = randomised(cfg)
        model.dense_attention = dense
        high_res_loss(cfg, model(tokens), targets).backward()
        grads[dense] = {n: p.grad for n, p in model.named_parameters()}
    for name, expected in grads[True].items():
        assert (grads[False][name] - expected).abs().max().item() <= 1e-10 * (
            expected.abs().max().item() + 1e-30
        ), name


class _Ids:
    """A text tokenizer stand-in: fixed ids for any prompt."""

    def __init__(self, ids):
        self.ids = ids

    def encode(self, prompt):
        return self.ids


class _Greedy:
    def sample(self, logits, draw):
        return logits.argmax(-1)


@pytest.mark.parametrize("slots", ["boi", "low_res"])
def test_sampling_feeds_the_model_what_training_trains_it_on(slots, monkeypatch):
    """The SR sampler's input sequence for a frame equals the training example the family builds
    from the same frame pair (text, low-res codes, high-res slots), for either slot input; a
    sampler that builds `<start_of_image>` slots for a low_res model is caught."""
    from cogvideo.models.dsr import sampler as sr_sampler
    from cogvideo.shards import ClipMeta, Sample

    cfg = TINY.replace(high_slots=slots).validate()
    g = torch.Generator().manual_seed(3)
    low = torch.randint(cfg.vocab.num_image_tokens, (2, cfg.frame_tokens, cfg.frame_tokens), generator=g)
    text = [cfg.vocab.text_offset + 2, cfg.vocab.text_offset + 7]
    meta = ClipMeta(1.0, 1.0, 1, "v", 0.0, 1.0, 2)
    arrays = {"frames": low.numpy(), "sr_frames": np.zeros((2, 12, 12), np.int64)}
    trained = [
        get_family("dsr").example(cfg, Sample("k", arrays, "c", meta), text, seed)["tokens"]
        for seed in (0, 1)
    ]
    seen = []

    def fed(cfg):
        model = randomised(cfg)
        forward = model.forward
        model.forward = lambda tokens, **kw: (seen.append(tokens.clone()), forward(tokens, **kw))[1]
        return sr_sampler.SuperResolution(model, _Ids(text), _Greedy(), seed=0)

    fed(cfg)(["a prompt"], [low])
    assert torch.equal(seen[-1], torch.stack(trained))
    if slots == "low_res":  # plant: the sampler builds the release's slots whatever the model reads
        boi = cfg.replace(high_slots="boi")
        monkeypatch.setattr(sr_sampler, "build_example", lambda c, *a: layout.build_example(boi, *a))
        fed(cfg)(["a prompt"], [low])
        assert not torch.equal(seen[-1], torch.stack(trained))
