"""Attention layouts: blocked/windowed paths equal dense explicit masks, and the masks equal
the published visibility rules cell by cell."""

import pytest
import torch
from model_helpers import PUBLISHED_WINDOWS, random_batch, random_model

from cogvideo.models.cogvideo.attention import window_gather_index
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sequence import TokenMeta, position_ids, visible, window_id


@pytest.mark.parametrize("preset", ["tiny", "tiny-stage2"])
@pytest.mark.parametrize("text_bias", [0.0, 1.4])
def test_blocked_equals_dense(preset, text_bias):
    model = random_model(preset, num_layers=3)
    tokens, _, _ = random_batch(model.cfg)
    with torch.no_grad():
        blocked = model(tokens, text_bias=text_bias)
        model.dense_attention = True
        dense = model(tokens, text_bias=text_bias)
    torch.testing.assert_close(blocked, dense, atol=1e-5, rtol=1e-5)


def _gradients(model, tokens, dense: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.dense_attention = dense
    out = model(tokens)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny", "tiny-stage2"])
def test_blocked_gradients_equal_dense(preset, monkeypatch):
    """The blocks' gathers (index_select: a text key repeated in every frame's block sums its
    gradients in the backward) and the windows' reordering give the dense masks' gradients, in
    float64, every parameter trained (with the backbone frozen no text key's gradient reaches a
    parameter); a planted gather that drops the repeats' gradients fails the same comparison."""
    from cogvideo.models.cogvideo import blocked

    model = random_model(preset, num_layers=2).double().requires_grad_(True)
    tokens, _, _ = random_batch(model.cfg)
    dense = _gradients(model, tokens, dense=True)
    got = _gradients(model, tokens, dense=False)
    assert got.keys() == dense.keys()
    for name in dense:
        torch.testing.assert_close(got[name], dense[name], rtol=1e-10, atol=1e-12, msg=name)

    gather = blocked._gather

    def repeats_without_gradient(t, index, blocks):
        seen, first = set(), []
        for i in index.tolist():
            first.append(i not in seen)
            seen.add(i)
        kept, cut = gather(t, index, blocks), gather(t.detach(), index, blocks)
        shape = (t.shape[0], blocks, *kept.shape[1:])  # [B, nb, H, m, d]
        mask = torch.tensor(first).view(1, blocks, 1, -1, 1)
        return torch.where(mask, kept.reshape(shape), cut.reshape(shape)).reshape(kept.shape)

    monkeypatch.setattr(blocked, "_gather", repeats_without_gradient)
    planted = _gradients(model, tokens, dense=False)
    assert any(not torch.allclose(planted[name], dense[name], rtol=1e-6) for name in dense)


def test_windowed_equals_dense_at_published_window_shape():
    # 20x20 tokens, window 10, shift 5, as in the released stage-2 model (narrow and shallow here)
    model = random_model("tiny-stage2", num_layers=2, **PUBLISHED_WINDOWS)
    tokens, _, _ = random_batch(model.cfg, text_lengths=(5,))
    with torch.no_grad():
        windowed = model(tokens)
        model.dense_attention = True
        dense = model(tokens)
    torch.testing.assert_close(windowed, dense, atol=1e-5, rtol=1e-5)


def _frame_level(cfg, channel):
    """Which frame sees which (any token) in the mask, as a frames x frames table."""
    meta = TokenMeta.layout(cfg, list(range(cfg.num_frames)))
    vis = visible(cfg, meta, meta, channel, shift=0)
    F, n, T = cfg.num_frames, cfg.tokens_per_frame, cfg.text_length
    frames = vis[T:, T:].reshape(F, n, F, n)
    return frames.any(dim=3).any(dim=1), frames


def test_stage2_slot_visibility_table():
    cfg = get_preset("tiny-stage2").replace(window_size=4, window_shift=0)  # one window: pure slot rules
    table, cells = _frame_level(cfg, "temporal")
    expected = torch.tensor(
        [
            # key frame: 0  1  2  3  4
            [1, 0, 1, 0, 1],  # frame 0 (given) sees the given frames
            [1, 1, 1, 0, 1],  # frame 1 sees 0, 2, 4 and itself
            [1, 0, 1, 0, 1],  # frame 2 (given)
            [1, 1, 1, 1, 1],  # frame 3 sees 0, 1, 2, 4 and itself
            [1, 0, 1, 0, 1],  # frame 4 (given)
        ],
        dtype=torch.bool,
    )
    assert torch.equal(table, expected)
    n = cfg.tokens_per_frame
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for f in range(cfg.num_frames):
        inside = cells[f, :, f, :]
        assert torch.equal(inside, causal if f in (1, 3) else torch.ones(n, n, dtype=torch.bool)), f
    # spatial channel: own frame only, causal only on the new frames 1 and 3
    spatial, spatial_cells = _frame_level(cfg, "spatial")
    assert torch.equal(spatial, torch.eye(cfg.num_frames, dtype=torch.bool))
    for f in range(cfg.num_frames):
        assert torch.equal(
            spatial_cells[f, :, f, :], causal if f in (1, 3) else torch.ones(n, n, dtype=torch.bool)
        )


def test_stage1_visibility_is_causal_in_time():
    cfg = get_preset("tiny")
    meta = TokenMeta.layout(cfg, list(range(cfg.num_frames)))
    vis = visible(cfg, meta, meta, "temporal")
    T = cfg.text_length
    assert torch.equal(vis[T:], torch.ones(len(meta), len(meta), dtype=torch.bool).tril()[T:])
    spatial = visible(cfg, meta, meta, "spatial")
    n = cfg.tokens_per_frame
    for f in range(cfg.num_frames):
        rows = spatial[T + f * n : T + (f + 1) * n]
        assert rows[:, :T].all()
        expected = torch.zeros(n, len(meta) - T, dtype=torch.bool)
        expected[:, f * n : (f + 1) * n] = torch.ones(n, n, dtype=torch.bool).tril()
        assert torch.equal(rows[:, T:], expected)


def _swin_region_ids(side, w, s):
    """Swin's own construction: label the 3x3 slice regions of the shifted grid, roll back."""
    img = torch.zeros(side, side, dtype=torch.long)
    label = 0
    for rows in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for cols in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[rows, cols] = label
            label += 1
    windows_of_rolled = torch.arange(side * side).reshape(side, side)
    window = (windows_of_rolled // side // w) * (side // w) + (windows_of_rolled % side) // w
    # position (r, c) of the original grid sits at ((r - s) % side, (c - s) % side) after the roll
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    rr, cc = (r - s) % side, (c - s) % side
    return (window[rr, cc] * 100 + img[rr, cc]).flatten()


@pytest.mark.parametrize("side,w,s", [(4, 2, 1), (20, 10, 5), (8, 4, 2)])
def test_shifted_window_partition_matches_swin_roll_and_region_mask(side, w, s):
    cfg = get_preset("tiny-stage2").replace(
        frame_tokens=side,
        frame_size=side * 4,
        window_size=w,
        window_shift=s,
        max_position_embeddings=8 + side * side,
    )
    pos = torch.arange(side * side)
    ours = window_id(cfg, pos, s)
    swin = _swin_region_ids(side, w, s)
    assert torch.equal(ours[:, None] == ours[None, :], swin[:, None] == swin[None, :])


def test_text_pads_are_never_attended():
    model = random_model("tiny")
    T, pad = model.cfg.text_length, model.cfg.vocab.pad_id
    tokens, _, _ = random_batch(model.cfg, text_lengths=(2,))  # pads at text positions 0..T-3
    assert not (tokens[:, T - 2 :] == pad).any()
    with torch.no_grad():
        base = model(tokens)
        model.word_embeddings.weight[pad].normal_(std=5.0)  # the row only the pads use
        perturbed = model(tokens)
    others = torch.arange(model.cfg.vocab.vocab_size) != pad  # the tied output layer's pad column moves
    torch.testing.assert_close(perturbed[:, T - 2 :, others], base[:, T - 2 :, others], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(perturbed[:, : T - 2], base[:, : T - 2])


@pytest.mark.parametrize("preset", ["tiny", "tiny-stage2"])
@pytest.mark.parametrize("dense", [False, True])
def test_outputs_do_not_depend_on_the_pad_count(preset, dense):
    """The release's text rule: text attends to all non-pad text and the real text tokens take
    position ids 0..n-1, so the same prompt left-padded to another text length gives the same
    logits on its real tokens and frames (with position ids that count the pads it would not).
    The frames' offset is pinned, as the release pins it at 512 for any text length."""
    short = random_model(preset, text_length=5, image_position_offset=8)
    long = random_model(preset, text_length=8, image_position_offset=8)
    long.load_state_dict(short.state_dict())
    short.dense_attention = long.dense_attention = dense
    tokens, _, _ = random_batch(short.cfg, text_lengths=(3, None))
    pads = torch.full((2, 3), short.cfg.vocab.pad_id)
    padded = torch.cat([pads, tokens], dim=1)
    with torch.no_grad():
        out_short, out_long = short(tokens), long(padded)
    torch.testing.assert_close(out_long[:, 3:], out_short, atol=1e-5, rtol=1e-5)


def test_text_block_is_bidirectional_and_position_ids_skip_pads():
    cfg = get_preset("tiny-stage2")
    T = cfg.text_length
    meta = TokenMeta.layout(cfg, list(range(cfg.num_frames)))
    for channel in ("spatial", "temporal"):
        vis = visible(cfg, meta, meta, channel)
        assert vis[:T, :T].all() and not vis[:T, T:].any()
        assert vis[T:, :T].all()
    pad = torch.zeros(2, len(meta), dtype=torch.bool)
    pad[1, : T - 3] = True  # 3 real tokens
    backbone_row, extra_row = position_ids(cfg, meta, pad)
    assert backbone_row[0, :T].tolist() == list(range(T))
    assert backbone_row[1, :T].tolist() == [0] * (T - 3) + [0, 1, 2]
    n = cfg.tokens_per_frame
    frames = cfg.position_offset + torch.arange(n)
    assert torch.equal(backbone_row[:, T : T + n], frames.expand(2, n))
    assert extra_row[T + n :].tolist() == list(range((cfg.num_frames - 1) * n))


@pytest.mark.parametrize("frames", [(0, 1, 2, 3, 4), (0, 2, 4), (4, 0, 2)])
@pytest.mark.parametrize("shift", [0, 5])
def test_window_gather_index_follows_the_frames_laid_out(frames, shift):
    cfg = get_preset("tiny-stage2").replace(
        frame_tokens=20, frame_size=80, window_size=10, window_shift=5, max_position_embeddings=8 + 400
    )
    index, meta = window_gather_index(cfg, frames, shift)
    laid_out = TokenMeta.layout(cfg, list(frames))[cfg.text_length :]
    gathered = laid_out[index.flatten()]
    assert torch.equal(gathered.frame, meta.frame) and torch.equal(gathered.pos, meta.pos)
    assert sorted(index.flatten().tolist()) == list(range(len(laid_out)))  # every token exactly once
    for window in index:  # one window: every frame laid out, the same w*w positions in each
        frame_of, pos_of = laid_out.frame[window], laid_out.pos[window]
        assert sorted(set(frame_of.tolist())) == sorted(frames)
        per_frame = [set(pos_of[frame_of == f].tolist()) for f in frames]
        assert all(p == per_frame[0] for p in per_frame) and len(per_frame[0]) == 100
        # inside the rolled grid the window is a 10x10 square: Swin regions never span two windows
        ids = window_id(cfg, pos_of, shift)
        others = window_id(cfg, laid_out.pos[~torch.isin(torch.arange(len(laid_out)), window)], shift)
        assert not set(ids.tolist()) & set(others.tolist())


@pytest.mark.parametrize("field", ["hidden_dropout", "attention_dropout"])
def test_dropout_is_a_config_value_that_acts_only_in_training(field):
    plain = random_model("tiny-stage2")
    model = random_model("tiny-stage2", **{field: 0.3})
    tokens, _, _ = random_batch(model.cfg)
    with torch.no_grad():
        reference = plain(tokens)
        assert torch.equal(model(tokens), reference)  # eval: off
        model.train()
        torch.manual_seed(0)
        first = model(tokens)
        torch.manual_seed(1)
        second = model(tokens)
        plain.train()
        assert torch.equal(plain(tokens), reference)  # 0.0: nothing to drop
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
