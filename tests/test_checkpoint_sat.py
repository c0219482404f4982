"""SwissArmyTransformer import: tiny CogView2 / CogVideo checkpoints with the real key names,
written here at TP=1 and TP=2, imported and run through our model, against a forward pass
written with plain torch ops from the same raw tensors."""

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from cogvideo.checkpoint import (
    Checkpoint,
    CheckpointError,
    import_sat,
    load_model_config,
    load_model_state,
    reshard,
)
from cogvideo.checkpoint.cli import describe, main
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.params import count_parameters

BASE = get_preset("tiny")  # hidden 32, 4 heads, 2 layers, 8 text tokens, 4x4 tokens per frame
H, LAYERS, HEADS, T, N = (
    BASE.hidden_size,
    BASE.num_layers,
    BASE.num_heads,
    BASE.text_length,
    BASE.tokens_per_frame,
)
VOCAB, MAX_POS, FRAMES = BASE.vocab.vocab_size, BASE.position_rows, BASE.num_frames
ADDITIONAL = FRAMES * N  # CogVideo's extra table: additional_seqlen rows (2000 = 5 x 400 in the release)


def raw_weights(video: bool, seed: int = 0) -> dict:
    """A full SAT state dict with random values (real key names)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "transformer.word_embeddings.weight": rnd(VOCAB, H),
        "transformer.position_embeddings.weight": rnd(MAX_POS, H),
        "transformer.final_layernorm.weight": 1 + rnd(H),
        "transformer.final_layernorm.bias": rnd(H),
    }
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "third_layernorm", "fourth_layernorm"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + rnd(H), rnd(H)
        sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"] = (
            rnd(3 * H, H),
            rnd(3 * H),
        )
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = rnd(H, H), rnd(H)
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = rnd(4 * H, H), rnd(4 * H)
        sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = rnd(H, 4 * H), rnd(H)
        if video:
            sd[f"mixins.attention_plus.query_key_value.{i}.weight"] = rnd(3 * H, H)
            sd[f"mixins.attention_plus.query_key_value.{i}.bias"] = rnd(3 * H)
            sd[f"mixins.attention_plus.dense.{i}.weight"], sd[f"mixins.attention_plus.dense.{i}.bias"] = (
                rnd(H, H),
                rnd(H),
            )
            sd[f"mixins.attention_plus.attn_distribution.{i}"] = rnd(H, scale=1.0)
    if video:
        sd["mixins.extra_position_embedding.position_embeddings.weight"] = rnd(ADDITIONAL, H)
    return sd


def sat_rank_shard(key: str, t: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """How SAT's ColumnParallel(stride 3)/RowParallel/VocabParallel layers hold rank r's part."""
    if "query_key_value" in key:
        return torch.cat([x.chunk(n)[r] for x in t.chunk(3)])
    if "dense_h_to_4h" in key or key.endswith("word_embeddings.weight"):
        return t.chunk(n)[r]
    if key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) or (
        key.startswith("mixins.attention_plus.dense.") and key.endswith(".weight")
    ):
        return t.chunk(n, dim=1)[r]
    return t


def write_sat(path, sd: dict, tp: int, args: dict, iteration: str = "1000") -> None:
    (path / iteration).mkdir(parents=True)
    (path / "latest").write_text(iteration)
    (path / "model_config.json").write_text(json.dumps({"model_parallel_size": tp, **args}))
    for r in range(tp):
        module = {k: sat_rank_shard(k, v, r, tp).clone() for k, v in sd.items()}
        torch.save(
            {"module": module, "iteration": int(iteration) if iteration.isdigit() else 0},
            path / iteration / f"mp_rank_{r:02d}_model_states.pt",
        )


BACKBONE_ARGS = {
    "num_layers": LAYERS,
    "hidden_size": H,
    "num_attention_heads": HEADS,
    "vocab_size": VOCAB,
    "max_sequence_length": MAX_POS,
    "layernorm_order": "sandwich",
}
VIDEO_ARGS = {
    **BACKBONE_ARGS,
    "layout": f"{T}, {T + N}, {T + FRAMES * N}",
    "window_size": -1,
    "additional_seqlen": ADDITIONAL,
    "cogvideo_stage": 1,
}


def frame_positions(frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's frame (-1 for text) and its index within the text or its frame."""
    frame_of = torch.tensor([-1] * T + [f for f in range(frames) for _ in range(N)])
    return frame_of, torch.tensor(list(range(T)) + list(range(N)) * frames)


def reference_masks(tokens: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The release's masks (CogVideo's get_masks_and_position_ids_video), as (causal, spatial,
    key_ok): text attends to all non-pad text; spatial channel: a frame token sees the text and its
    own frame causally; temporal channel (stage 1, `causal`): everything earlier in time."""
    frame_of, _ = frame_positions(frames)
    L = len(frame_of)
    text = frame_of == -1
    causal = torch.ones(L, L).tril().bool() | (text[:, None] & text[None, :])
    spatial = causal & (text[None, :] | (frame_of[None, :] == frame_of[:, None]))
    key_ok = ~(text[None, :] & (tokens == BASE.vocab.pad_id))[:, None, None, :]  # [B, 1, 1, L]
    return causal, spatial, key_ok


def stage2_masks(tokens: torch.Tensor, frames: int, window: int, shift: int, regions: bool = True):
    """The release's stage-2 masks (models/cogvideo_model.py, mode_sequential=False), per layer
    shift, as (spatial, temporal, key_ok). Spatial (attention_mask_local_interp): a frame token sees
    the text and its own frame, whole for the given (even) frames, causally for the others.
    Temporal (WindowAttentionMixin, attn_mask_interp / causal_mask_interp): frames are rolled by
    -shift and cut into window x window windows; a token sees the text and the tokens of its window
    in the frames the interp rule allows: given frames see every given frame and no other; a
    generated frame sees every given frame, the generated frames before it, and its own frame
    causally in the window's raster order; shifted layers also keep the roll's regions apart."""
    frame_of, index = frame_positions(frames)
    L, side = len(frame_of), BASE.frame_tokens
    text, given = frame_of == -1, (frame_of >= 0) & (frame_of % 2 == 0)
    row, col = (index // side - shift) % side, (index % side - shift) % side  # after the roll
    same_frame = frame_of[:, None] == frame_of[None, :]
    own_causal = index[None, :] <= index[:, None]
    spatial = text[:, None] & text[None, :]
    spatial |= ~text[:, None] & (text[None, :] | (same_frame & (given[:, None] | own_causal)))
    window_of = (row // window) * side + col // window
    local = (row % window) * window + col % window  # raster order inside the window
    region = (
        (row >= side - shift).long() * 2 + (col >= side - shift).long()
        if shift and regions
        else torch.zeros(L)
    )
    together = (window_of[:, None] == window_of[None, :]) & (region[:, None] == region[None, :])
    later = frame_of[None, :] > frame_of[:, None]
    frames_ok = torch.where(
        given[:, None],
        given[None, :],
        given[None, :]
        | (~given[None, :] & ~later & ~same_frame)
        | (same_frame & (local[None, :] <= local[:, None])),
    )
    temporal = spatial & text[:, None] | ~text[:, None] & (
        text[None, :] | (~text[None, :] & together & frames_ok)
    )
    key_ok = ~(text[None, :] & (tokens == BASE.vocab.pad_id))[:, None, None, :]
    return spatial, temporal, key_ok


def reference_embeddings(raw: dict, tokens: torch.Tensor, frames: int) -> torch.Tensor:
    """Word plus position embeddings: real text tokens take position ids 0..n-1 (left pads 0, masked
    out); frame 0: CogView2's image rows; frame f >= 1: the extra table's rows at id - (offset + N)."""
    frame_of, pos_in_frame = frame_positions(frames)
    x = raw["transformer.word_embeddings.weight"][tokens]
    n_pads = (tokens[:, :T] == BASE.vocab.pad_id).sum(1)
    for b in range(tokens.shape[0]):
        for i in range(len(frame_of)):
            f, j = int(frame_of[i]), int(pos_in_frame[i])
            if f <= 0:
                row = max(j - int(n_pads[b]), 0) if f < 0 else BASE.position_offset + j
                x[b, i] += raw["transformer.position_embeddings.weight"][row]
            else:
                x[b, i] += raw["mixins.extra_position_embedding.position_embeddings.weight"][N * f + j - N]
    return x


def linear(raw: dict, key: str, v: torch.Tensor) -> torch.Tensor:
    return v @ raw[key + ".weight"].T + raw[key + ".bias"]


def layer_norm(raw: dict, key: str, v: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(v, (H,), raw[key + ".weight"], raw[key + ".bias"], BASE.layernorm_epsilon)


def attend(raw: dict, qkv: str, dense: str, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multi-head attention: SAT's fused query/key/value projection at `qkv`, its output at `dense`."""
    B, L, _ = v.shape
    q, k, val = linear(raw, qkv, v).split(H, dim=-1)
    heads = [z.view(B, L, HEADS, H // HEADS).transpose(1, 2) for z in (q, k, val)]
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(H // HEADS)
    ctx = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ heads[2]
    return linear(raw, dense, ctx.transpose(1, 2).reshape(B, L, H))


def reference_logits(
    raw: dict,
    tokens: torch.Tensor,
    frames: int,
    video: bool,
    window: int | None = None,
    shifted: int = 1,
    regions: bool = True,
) -> torch.Tensor:
    """CogView2 / CogVideo stage 1 (or stage 2, given its `window`) from the raw SAT tensors, plain
    torch ops, with the release's masks and position ids (above); sandwich layernorm; frame outputs
    mix the two channels as sigmoid(p)*spatial + (1-sigmoid(p))*temporal. Stage 2 shifts the windows
    of the layers i with i % 2 == `shifted` (the release: odd), keeping regions apart if `regions`."""
    is_frame = (frame_positions(frames)[0] >= 0)[None, :, None]
    x = reference_embeddings(raw, tokens, frames)
    for i in range(LAYERS):
        if window is None:
            causal, spatial, key_ok = reference_masks(tokens, frames)
        else:
            shift = window // 2 if i % 2 == shifted else 0
            spatial, causal, key_ok = stage2_masks(tokens, frames, window, shift, regions)
        p = f"transformer.layers.{i}."
        h = layer_norm(raw, p + "input_layernorm", x)
        out = attend(raw, p + "attention.query_key_value", p + "attention.dense", h, spatial & key_ok)
        if video:
            m = "mixins.attention_plus."
            temporal = attend(raw, f"{m}query_key_value.{i}", f"{m}dense.{i}", h, causal & key_ok)
            a = torch.sigmoid(raw[f"{m}attn_distribution.{i}"])
            out = torch.where(is_frame, a * out + (1 - a) * temporal, out)
        x = x + layer_norm(raw, p + "third_layernorm", out)
        ffn = F.gelu(
            linear(raw, p + "mlp.dense_h_to_4h", layer_norm(raw, p + "post_attention_layernorm", x)),
            approximate="tanh",
        )
        x = x + layer_norm(raw, p + "fourth_layernorm", linear(raw, p + "mlp.dense_4h_to_h", ffn))
    return layer_norm(raw, "transformer.final_layernorm", x) @ raw["transformer.word_embeddings.weight"].T


def random_tokens(frames: int, seed: int = 0) -> torch.Tensor:
    """Two samples: a full-length prompt and one of 3 tokens left-padded to T."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(BASE.vocab.text_offset + 1, BASE.vocab.text_offset + 90, (2, T), generator=g)
    text[1, : T - 3] = BASE.vocab.pad_id
    return torch.cat([text, torch.randint(0, BASE.vocab.num_image_tokens, (2, frames * N), generator=g)], 1)


def our_logits(ckpt, tokens) -> torch.Tensor:
    model = build_model(load_model_config(ckpt), init_weights=False)
    model.load_state_dict(load_model_state(ckpt))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("tp", [1, 2])
def test_backbone_import_matches_reference_forward(tmp_path, tp):
    raw = raw_weights(video=False)
    write_sat(tmp_path / "sat", raw, tp, BACKBONE_ARGS)
    ckpt = import_sat(tmp_path / "sat", tmp_path / "ours", base=BASE, tensor_parallel=tp)
    cfg = load_model_config(ckpt)
    assert (cfg.stage, cfg.num_frames, cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (
        "backbone",
        1,
        LAYERS,
        H,
        HEADS,
    )
    tokens = random_tokens(frames=1)
    assert torch.allclose(our_logits(ckpt, tokens), reference_logits(raw, tokens, 1, video=False), atol=1e-5)
    report = describe(ckpt)
    assert report["parameters"] == report["trainable_parameters"] == count_parameters(cfg).total


def test_tp2_import_equals_tp1_import(tmp_path):
    raw = raw_weights(video=True, seed=3)
    for tp in (1, 2):
        write_sat(tmp_path / f"sat{tp}", raw, tp, VIDEO_ARGS)
        import_sat(tmp_path / f"sat{tp}", tmp_path / f"ours{tp}", base=BASE)
    one, two = load_model_state(tmp_path / "ours1"), load_model_state(tmp_path / "ours2")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("tp", [1, 2])
def test_export_writes_the_sat_rank_files_it_was_imported_from(tmp_path, tp):
    """import -> export-sat gives SAT's own rank files back (the extra position table's last
    frame, which CogVideo never reads, comes back as zeros), and imports to the same weights."""
    raw = raw_weights(video=True, seed=5)
    write_sat(tmp_path / "sat", raw, tp, VIDEO_ARGS)
    import_sat(tmp_path / "sat", tmp_path / "ours", base=BASE, tensor_parallel=2)
    assert main(["export-sat", str(tmp_path / "ours"), str(tmp_path / "back"), "--tp", str(tp)]) == 0
    assert (tmp_path / "back" / "latest").read_text() == "1000"
    args = json.loads((tmp_path / "back" / "model_config.json").read_text())
    assert {k: args[k] for k in VIDEO_ARGS if k != "layout"} == {
        k: v for k, v in VIDEO_ARGS.items() if k != "layout"
    }
    table = "mixins.extra_position_embedding.position_embeddings.weight"
    for r in range(tp):
        original = torch.load(
            tmp_path / "sat" / "1000" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True
        )
        back = torch.load(tmp_path / "back" / "1000" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)
        assert set(back["module"]) == set(original["module"])
        for key, tensor in original["module"].items():
            if key == table:
                assert (
                    torch.equal(back["module"][key][:-N], tensor[:-N]) and not back["module"][key][-N:].any()
                )
            else:
                assert torch.equal(back["module"][key], tensor), key
    import_sat(tmp_path / "back", tmp_path / "again", base=BASE)
    first, again = load_model_state(tmp_path / "ours"), load_model_state(tmp_path / "again")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_vocabulary_padding_for_tp_round_trips_to_the_sat_rank_file(tmp_path):
    """Megatron's make-vocab-size-divisible-by for released weights: a SAT checkpoint whose 163 ids
    (64 image codes, 96 text pieces, 3 specials) split over no even TP degree imports padded to
    168 rows at TP 2, reshards to TP 4 and exports back to 163 rows at TP 1: SAT's own rank file,
    bit for bit. Cutting into ids in use, or TP 4 without padding, is one clear error."""
    used = BASE.vocab.min_vocab_size
    raw = raw_weights(video=True, seed=6)
    raw["transformer.word_embeddings.weight"] = raw["transformer.word_embeddings.weight"][:used].clone()
    raw["mixins.extra_position_embedding.position_embeddings.weight"][-N:] = 0  # never read (export: zeros)
    write_sat(tmp_path / "sat", raw, 1, {**VIDEO_ARGS, "vocab_size": used})
    with pytest.raises(CheckpointError, match=f"vocab.vocab_size: {used} is not divisible.*--vocab-size"):
        import_sat(tmp_path / "sat", tmp_path / "tp4", base=BASE, tensor_parallel=4)
    padded = import_sat(tmp_path / "sat", tmp_path / "padded", base=BASE, tensor_parallel=2, vocab_size=168)
    tp4 = Checkpoint(reshard(padded, tmp_path / "tp4", 4))
    assert tp4.cfg.vocab.vocab_size == 168 and tp4.readers[0].shape("word_embeddings.weight") == (42, H)
    table = tp4.full("word_embeddings.weight")
    assert torch.equal(table[:used], raw["transformer.word_embeddings.weight"]) and not table[used:].any()
    back = tmp_path / "back"
    assert main(["export-sat", str(tmp_path / "tp4"), str(back), "--tp", "1", "--vocab-size", str(used)]) == 0
    assert json.loads((back / "model_config.json").read_text())["vocab_size"] == used
    original = torch.load(tmp_path / "sat/1000/mp_rank_00_model_states.pt", weights_only=True)["module"]
    exported = torch.load(back / "1000/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert set(exported) == set(original) and all(torch.equal(exported[k], original[k]) for k in original)
    with pytest.raises(CheckpointError, match=f"vocab_size={used - 1} would drop ids in use"):
        reshard(tmp_path / "tp4", tmp_path / "cut", 1, vocab_size=used - 1)
    assert (
        main(["reshard", str(tmp_path / "tp4"), str(tmp_path / "cut"), "--tp", "1", "--vocab-size", "99"])
        == 2
    )
    assert not (tmp_path / "cut").exists()


def test_padding_rows_change_no_logit_loss_or_sample_over_real_ids(tmp_path):
    """The same model at 163 and (converter-padded) 168 vocabulary rows, in float64: equal logits
    over the real ids, equal loss, equal sampler logits (image codes) and so equal samples."""
    from cogvideo.models.cogvideo.stage_model import StageModel

    used = BASE.vocab.min_vocab_size
    raw = raw_weights(video=True, seed=7)
    raw["transformer.word_embeddings.weight"] = raw["transformer.word_embeddings.weight"][:used].clone()
    write_sat(tmp_path / "sat", raw, 1, {**VIDEO_ARGS, "vocab_size": used})
    tokens = random_tokens(frames=FRAMES, seed=2)
    targets = torch.randint(
        0, BASE.vocab.num_image_tokens, tokens.shape, generator=torch.Generator().manual_seed(3)
    )
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, T + N :] = True
    results = []
    for rows in (used, 168):
        ckpt = import_sat(tmp_path / "sat", tmp_path / f"ours{rows}", base=BASE, vocab_size=rows)
        cfg = load_model_config(ckpt)
        model = build_model(cfg, init_weights=False).double()
        model.load_state_dict(load_model_state(ckpt))
        with torch.no_grad():
            logits = model(tokens)
            sampler = StageModel(model, cfg).full(tokens, temporal=True, text_bias=0.0)
            results.append((logits, model.loss(logits, targets, mask), sampler))
    (logits, loss, sampler), (padded_logits, padded_loss, padded_sampler) = results
    assert padded_logits.shape[-1] == 168 and padded_logits.dtype == torch.float64
    torch.testing.assert_close(padded_logits[..., :used], logits, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(padded_loss, loss, rtol=1e-13, atol=0.0)
    assert torch.equal(padded_sampler, sampler)
    draws = [
        torch.multinomial(p.softmax(-1).flatten(0, 1), 1, generator=torch.Generator().manual_seed(0))
        for p in (sampler, padded_sampler)
    ]
    assert torch.equal(*draws)


def test_cogvideo_stage1_import_matches_reference_forward(tmp_path):
    raw = raw_weights(video=True, seed=1)
    write_sat(tmp_path / "sat", raw, 2, VIDEO_ARGS, iteration="release")
    ckpt = import_sat(tmp_path / "sat", tmp_path / "ours", base=BASE)
    cfg = load_model_config(ckpt)
    assert (cfg.stage, cfg.num_frames, cfg.text_length, cfg.frame_tokens) == (
        "stage1",
        FRAMES,
        T,
        BASE.frame_tokens,
    )
    sd = load_model_state(ckpt)
    # frames 1..F-1 use the first (F-1)*N rows of CogVideo's extra table; the last N are unused
    assert torch.equal(
        sd["frame_position_embeddings.weight"],
        raw["mixins.extra_position_embedding.position_embeddings.weight"][: (FRAMES - 1) * N],
    )
    tokens = random_tokens(frames=3, seed=2)
    assert torch.allclose(our_logits(ckpt, tokens), reference_logits(raw, tokens, 3, video=True), atol=1e-5)


STAGE2_ARGS = {**VIDEO_ARGS, "cogvideo_stage": 2, "window_size": 2}


def test_cogvideo_stage2_import_matches_reference_forward(tmp_path):
    """Stage 2 as released: given frames 0, 2, 4 seen whole, frames 1, 3 generated, windows of
    2 x 2 tokens shifted by 1 on odd layers (the release's window_size // 2), the roll's regions
    kept apart; written out from the release's masks above (its class is not in an installed
    package: THUDM/CogVideo's models/cogvideo_model.py)."""
    raw = raw_weights(video=True, seed=8)
    write_sat(tmp_path / "sat", raw, 2, STAGE2_ARGS)
    ckpt = import_sat(tmp_path / "sat", tmp_path / "ours", base=BASE)
    cfg = load_model_config(ckpt)
    assert (cfg.stage, cfg.num_frames, cfg.window_size, cfg.window_shift) == ("stage2", FRAMES, 2, 1)
    tokens = random_tokens(frames=FRAMES, seed=9)
    expected = reference_logits(raw, tokens, FRAMES, video=True, window=2)
    torch.testing.assert_close(our_logits(ckpt, tokens), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "planted",
    [{"window": None}, {"window": 2, "regions": False}, {"window": 2, "shifted": 0}],
    ids=["stage 1's masks", "no regions in shifted windows", "shifts on even layers"],
)
def test_planted_stage2_mask_readings_fail_the_comparison(tmp_path, planted):
    """The stage-2 comparison is sharp: each other plausible reading of the release's masks, put
    in the reference instead, misses our (correct) model by far more than the tolerance."""
    raw = raw_weights(video=True, seed=8)
    write_sat(tmp_path / "sat", raw, 2, STAGE2_ARGS)
    ckpt = import_sat(tmp_path / "sat", tmp_path / "ours", base=BASE)
    tokens = random_tokens(frames=FRAMES, seed=9)
    expected = reference_logits(raw, tokens, FRAMES, video=True, **planted)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(our_logits(ckpt, tokens), expected, atol=1e-5, rtol=0)


def test_backbone_initialises_video_stages_with_one_frame_equivalence(tmp_path):
    raw = raw_weights(video=False, seed=4)
    write_sat(tmp_path / "sat", raw, 2, BACKBONE_ARGS)
    tokens = random_tokens(frames=1, seed=5)
    ckpt = import_sat(tmp_path / "sat", tmp_path / "stage1", base=BASE, stage="stage1", tensor_parallel=2)
    assert (load_model_config(ckpt).stage, load_model_config(ckpt).num_frames) == ("stage1", FRAMES)
    assert torch.allclose(our_logits(ckpt, tokens), reference_logits(raw, tokens, 1, video=False), atol=1e-5)
    # stage 2 sees its given frames bidirectionally, so only the initialised tensors can be compared
    ckpt = import_sat(tmp_path / "sat", tmp_path / "stage2", base=BASE, stage="stage2")
    sd = load_model_state(ckpt)
    assert load_model_config(ckpt).stage == "stage2"
    assert torch.equal(
        sd["layers.1.temporal_attention.dense.weight"], raw["transformer.layers.1.attention.dense.weight"]
    )
    image_rows = raw["transformer.position_embeddings.weight"][BASE.position_offset :][:N]
    assert torch.equal(sd["frame_position_embeddings.weight"], image_rows.repeat(FRAMES - 1, 1))


def test_stage2_config_and_cli_inspect(tmp_path, capsys):
    raw = raw_weights(video=True, seed=6)
    write_sat(tmp_path / "sat", raw, 2, {**VIDEO_ARGS, "cogvideo_stage": 2, "window_size": 2})
    assert main(["inspect", str(tmp_path / "sat"), "--base", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "SwissArmyTransformer" in printed and "stage2" in printed
    assert (
        main(
            [
                "import-sat",
                str(tmp_path / "sat"),
                str(tmp_path / "bad"),
                "--base",
                "tiny",
                "--set",
                "nonsense=1",
            ]
        )
        == 2
    )
    assert "with --set {'nonsense': 1}: gives an invalid model config: unknown" in capsys.readouterr().err
    assert (
        main(["import-sat", str(tmp_path / "sat"), str(tmp_path / "ours"), "--base", "tiny", "--tp", "2"])
        == 0
    )
    cfg = load_model_config(tmp_path / "ours")
    assert (cfg.stage, cfg.window_size, cfg.window_shift) == ("stage2", 2, 1)
    report = describe(tmp_path / "ours")
    assert (
        report["parameters"]
        == sum(v.numel() for k, v in raw.items() if "extra_position" not in k) + (FRAMES - 1) * N * H
    )
    sd = load_model_state(tmp_path / "ours")
    assert torch.equal(sd["layers.1.temporal_gate"], raw["mixins.attention_plus.attn_distribution.1"])
    assert torch.equal(
        sd["layers.0.temporal_attention.query_key_value.weight"],
        raw["mixins.attention_plus.query_key_value.0.weight"],
    )


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_bad_sat_checkpoints_fail_clearly_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = raw_weights(video=False)
    write_sat(tmp_path / "missing_rank", raw, 2, BACKBONE_ARGS)
    (tmp_path / "missing_rank" / "1000" / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="missing rank files.*mp_rank_01"):
        import_sat(tmp_path / "missing_rank", tmp_path / "out", base=BASE)

    write_sat(
        tmp_path / "extra_key",
        {**raw, "transformer.layers.0.attention.rotary.inv_freq": torch.ones(4)},
        1,
        BACKBONE_ARGS,
    )
    with pytest.raises(CheckpointError, match="no counterpart in our model.*rotary.inv_freq"):
        import_sat(tmp_path / "extra_key", tmp_path / "out", base=BASE)

    missing = {k: v for k, v in raw.items() if k != "transformer.layers.1.fourth_layernorm.bias"}
    write_sat(tmp_path / "missing_key", missing, 1, BACKBONE_ARGS)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layers\.1\.fourth_layernorm\.bias"):
        import_sat(tmp_path / "missing_key", tmp_path / "out", base=BASE)

    write_sat(tmp_path / "wrong_shape", raw, 1, {**BACKBONE_ARGS, "hidden_size": 2 * H})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        import_sat(tmp_path / "wrong_shape", tmp_path / "out", base=BASE)

    write_sat(tmp_path / "truncated", raw, 1, BACKBONE_ARGS)
    file = tmp_path / "truncated" / "1000" / "mp_rank_00_model_states.pt"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: cannot be read"):
        import_sat(tmp_path / "truncated", tmp_path / "out", base=BASE)
    report = describe(tmp_path / "truncated", base="tiny")
    assert report["complete"] is False and "mp_rank_00_model_states.pt" in report["problem"]
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2  # not a checkpoint at all

    write_sat(tmp_path / "pickled", raw, 1, BACKBONE_ARGS)
    with open(tmp_path / "pickled" / "1000" / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Exploit()}, f)
    with pytest.raises(CheckpointError, match="pickled.*refused to unpickle") as refused:
        import_sat(tmp_path / "pickled", tmp_path / "out", base=BASE)
    assert "weights_only" not in str(refused.value)
    assert not (tmp_path / "PWNED").exists()

    write_sat(tmp_path / "pre_ln", raw, 1, {**BACKBONE_ARGS, "layernorm_order": "pre"})
    with pytest.raises(CheckpointError, match="layernorm_order='pre'.*sandwich"):
        import_sat(tmp_path / "pre_ln", tmp_path / "out", base=BASE)
    write_sat(tmp_path / "small_vocab", raw, 1, {**BACKBONE_ARGS, "vocab_size": 100})
    with pytest.raises(CheckpointError, match="vocab_size=100 cannot hold"):
        import_sat(tmp_path / "small_vocab", tmp_path / "out", base=BASE)

    with pytest.raises(CheckpointError, match="model_config.json: SAT model config not found"):
        import_sat(tmp_path / "missing_rank" / "1000", tmp_path / "out", base=BASE)

    write_sat(tmp_path / "stage1", raw_weights(video=True), 1, VIDEO_ARGS)
    with pytest.raises(
        CheckpointError, match="stage1.*is a cogvideo stage1 checkpoint; it cannot be imported as stage2"
    ):
        import_sat(tmp_path / "stage1", tmp_path / "out", base=BASE, stage="stage2")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
