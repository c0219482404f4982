"""DSR against the release, under SwissArmyTransformer 0.2.9 itself (tests/sat_dsr_reference.py,
in its own process), at the published grid pair (20 x 20 -> 60 x 60) and a small one (4 -> 12):

- the CUDA kernels' stand-in (tests/local_attention_shim.py) equals a literal transcription of
  the kernels' index arithmetic (src/kernels.cuh `cc2k`, `ck2c_ori`; the batch loops of
  src/similar.cu and src/weighting.cu);
- the release's DsrModel forward (full and left-padded prompt) equals ours to 1e-12 in float64.
  The release's class is not in the sat package: it lives in THUDM/CogView2 (and THUDM/CogVideo
  branch CogVideo) `sr_pipeline/dsr_model.py`, which this project does not copy. The test loads
  it from a checkout named by COGVIEW2_SOURCE (the folder holding sr_pipeline/) and is skipped
  without one;
- checkpoints SAT writes with DSR's mixins (the release's class, or without it SAT's own
  Cuda2dModel, which has the same two mixins) import through `cogvideo-convert import-sat` at
  any TP degree, and `export-sat` writes SAT's rank files back bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from local_attention_shim import similar_forward, weighting_forward
from test_checkpoint_sat import sat_rank_shard

from cogvideo.checkpoint import load_model_config, load_model_state
from cogvideo.checkpoint.cli import describe, main
from cogvideo.family import build_model
from cogvideo.models.dsr.config import PRESETS
from cogvideo.models.dsr.sat import DSR_SAT

TINY = PRESETS["dsr-tiny"]().validate()
RELEASE = os.environ.get("COGVIEW2_SOURCE")
GRIDS = {"4->12": (4, 12, TINY.max_position_embeddings), "20->60": (20, 60, 420)}


# ---- the kernels' definition, transcribed index for index ---------------------------------------
def cc2k(x_ori, x_loc, kH, kW):
    """similar_cuda_forward: the batch loop of similar.cu around kernels.cuh's cc2k (non-causal)."""
    B, C, H, W = x_ori.shape
    Bl, _, height, width = x_loc.shape
    ah, aw = H // height, W // width
    rH, rW, patch = kH >> 1, kW >> 1, kH * kW
    per_channel, per_channel_ori = height * width, height * width * ah * aw
    ori, loc = x_ori.flatten(), x_loc.flatten()
    y = torch.empty(B * H * W * patch, dtype=x_ori.dtype)
    start_inp = start_out = start_loc = 0
    for _j in range(Bl):
        for _i in range(B // Bl):
            for index_raw in range(per_channel_ori * patch):
                indexO, indexK = index_raw // patch // (aw * ah), index_raw % patch
                idx_inner = index_raw // patch % (aw * ah)
                w_this, h_this = indexO % width, indexO // width
                idx_seq = (w_this * aw + idx_inner % aw) + (h_this * ah + idx_inner // aw) * width * aw
                w, h = indexO % width - rW + indexK % kW, indexO // width - rH + indexK // kW
                val = 0.0
                if -1 < h < height and -1 < w < width:
                    for c in range(C):
                        val += (
                            ori[start_inp + idx_seq + c * per_channel_ori]
                            * loc[start_loc + h * width + w + c * per_channel]
                        )
                else:
                    val = -10000.0
                y[start_out + idx_seq * patch + indexK] = val
            start_inp += H * W * C
            start_out += H * W * patch
        start_loc += per_channel * C
    return y.view(B, H, W, patch)


def ck2c_ori(x_loc, x_weight, kH, kW):
    """weighting_cuda_forward: the batch loop of weighting.cu around kernels.cuh's ck2c_ori."""
    B, H, W, patch = x_weight.shape
    Bl, C, height, width = x_loc.shape
    ah, aw = H // height, W // width
    rH, rW = kH >> 1, kW >> 1
    per_channel = height * width
    per_channel_ori, per_inp = per_channel * aw * ah, per_channel * C
    loc, weight = x_loc.flatten(), x_weight.flatten()
    y = torch.empty(B * C * H * W, dtype=x_loc.dtype)
    start_inp = start_out = start_loc = 0
    for _j in range(Bl):
        for _i in range(B // Bl):
            for index_raw in range(per_inp * aw * ah):
                index = index_raw // (aw * ah)
                index_ = index % per_channel
                idx_blk = index_raw % per_channel_ori
                idx_inner = idx_blk % (ah * aw)
                w_this, h_this = index_ % width, index_ // width
                idx_seq = (w_this * aw + idx_inner % aw) + (h_this * ah + idx_inner // aw) * width * aw
                w_ori, h_ori = index_ % width - rW, index_ // width - rH
                val = 0.0
                for indexK in range(patch):
                    w, h = w_ori + indexK % kW, h_ori + indexK // kW
                    if -1 < h < height and -1 < w < width:
                        val += (
                            loc[start_loc + index - index_ + width * h + w]
                            * weight[start_out + idx_seq * patch + indexK]
                        )
                y[start_inp + index_raw - idx_blk + idx_seq] = val
            start_inp += C * H * W
            start_out += H * W * patch
        start_loc += per_inp
    return y.view(B, C, H, W)


CASES = {  # (queries [B, C, H, W], keys [B', C, h, w], kH, kW): DSR's two calls, small
    "high-res 9 x 5": ((2, 3, 6, 6), (2, 3, 6, 6), 9, 5),
    "low-res 5 x 5 at scale 3": ((2, 3, 6, 9), (2, 3, 2, 3), 5, 5),
    "auto-expanded batch": ((4, 2, 6, 6), (2, 2, 3, 3), 3, 3),
}


@pytest.mark.parametrize("case", CASES)
def test_the_kernels_stand_in_equals_their_definition(case):
    q_shape, k_shape, kH, kW = CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(q_shape, generator=g, dtype=torch.float64),
        torch.randn(k_shape, generator=g, dtype=torch.float64),
    )
    scores = similar_forward(q, k, kH, kW)
    assert torch.allclose(scores, cc2k(q, k, kH, kW), rtol=1e-12, atol=1e-12)
    weights = torch.randn(scores.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(
        weighting_forward(k, weights, kH, kW), ck2c_ori(k, weights, kH, kW), rtol=1e-12, atol=1e-12
    )


def test_a_stand_in_with_a_shifted_window_is_caught(monkeypatch):
    import local_attention_shim

    q_shape, k_shape, kH, kW = CASES["low-res 5 x 5 at scale 3"]
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(q_shape, generator=g, dtype=torch.float64),
        torch.randn(k_shape, generator=g, dtype=torch.float64),
    )
    real_pad = F.pad
    monkeypatch.setattr(
        local_attention_shim.F, "pad", lambda x, p, *a: real_pad(x, (p[0] + 1, p[1] - 1, *p[2:]), *a)
    )
    assert not torch.allclose(similar_forward(q, k, kH, kW), cc2k(q, k, kH, kW))


# ---- SAT's own run --------------------------------------------------------------------------
def spec(grid: str, release: str | None) -> dict:
    low, high, max_pos = GRIDS[grid]
    v = TINY.vocab
    g = torch.Generator().manual_seed(3)
    return {
        "num_layers": TINY.num_layers,
        "hidden_size": TINY.hidden_size,
        "num_heads": TINY.num_heads,
        "vocab_size": v.vocab_size,
        "max_sequence_length": max_pos,
        "text_length": TINY.text_length,
        "low_side": low,
        "high_side": high,
        "low_position_offset": TINY.low_position_offset,
        "boi_id": v.boi_id,
        "seed": 7,
        "prompts": [  # a full-length prompt and a 3-token one (left-padded by the reference)
            [
                v.text_offset + int(i)
                for i in torch.randint(v.num_text_tokens, (TINY.text_length,), generator=g)
            ],
            [v.text_offset + int(i) for i in torch.randint(v.num_text_tokens, (3,), generator=g)],
        ],
        "low_codes": [
            torch.randint(v.num_image_tokens, (low * low,), generator=g).tolist() for _ in range(2)
        ],
        **({"release_source": release} if release else {}),
    }


def run_reference(out: Path, spec: dict) -> Path:
    (out / "spec.json").write_text(json.dumps(spec))
    script = Path(__file__).with_name("sat_dsr_reference.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    done = subprocess.run(
        [sys.executable, str(script), str(out / "spec.json"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sat_runs(tmp_path_factory) -> dict[str, Path]:
    return {
        grid: run_reference(tmp_path_factory.mktemp(f"sat_dsr_{grid[:2]}"), spec(grid, RELEASE))
        for grid in GRIDS
    }


def import_cli(src: Path, dst: Path, *extra: str) -> int:
    return main(["import-sat", str(src), str(dst), "--base", "dsr-tiny", *extra])


def imported(run: Path, dst: Path):
    assert import_cli(run / "sat", dst) == 0
    cfg = load_model_config(dst)
    model = build_model(cfg, device="cpu", init_weights=False)
    model.load_state_dict(load_model_state(dst))
    return cfg, model.eval()


def fp32_tolerance(cfg, scale: float) -> float:
    """As tests/test_parity_sat.py: per-product rounding k * eps * |terms|, compounding over layers."""
    return (4 * cfg.num_layers + 1) * cfg.ffn_size * torch.finfo(torch.float32).eps * scale


@pytest.mark.slow
@pytest.mark.skipif(
    not RELEASE, reason="set COGVIEW2_SOURCE to a THUDM/CogView2 checkout (holding sr_pipeline/dsr_model.py)"
)
@pytest.mark.parametrize("grid", GRIDS)
def test_the_release_dsr_forward_equals_ours(sat_runs, tmp_path, grid):
    cfg, model = imported(sat_runs[grid], tmp_path / "ours")
    assert (cfg.frame_tokens, cfg.high_frame_tokens, cfg.text_length) == GRIDS[grid][:2] + (TINY.text_length,)
    tokens = torch.load(sat_runs[grid] / "inputs.pt")["tokens"]
    assert (tokens[1, : TINY.text_length - 3] == 0).all()  # the second prompt is left-padded
    release = torch.load(sat_runs[grid] / "logits.pt")
    hidden = []
    model.final_layernorm.register_forward_hook(lambda m, i, o: hidden.append(o))
    with torch.no_grad():
        ours32 = model(tokens, image_only=True)
        ours64 = model.double()(tokens, image_only=True)
    start, K = cfg.high_start, cfg.vocab.num_image_tokens
    sat64 = release["torch.float64"]["hidden"][:, start:]
    assert (hidden[1] - sat64).abs().max().item() <= 1e-12 * sat64.abs().max().item()
    for ours, dtype in ((ours64, "torch.float64"), (ours32, "torch.float32")):
        theirs = release[dtype]["logits"][:, start:, :K]  # the release's head: float32 (over 20000 ids)
        assert ours.dtype == theirs.dtype == torch.float32
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= fp32_tolerance(cfg, scale)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sat_dsr_rank_files_import_bit_equal_and_export_back(sat_runs, tmp_path, tp):
    """SAT's own rank file (module + DeepSpeed fields + RNG state), split into TP rank files as
    SAT's parallel layers hold them, imports bit-equal; export-sat at that TP writes the same
    rank files' tensors back; inspect reads it by the DSR plan."""
    run = sat_runs["20->60"]
    saved = torch.load(run / "sat" / "1000" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {"np_rng_state", "random_rng_state", "torch_rng_state"} <= set(saved)
    full = saved["module"]
    assert "mixins.extra_position_embedding.position_embeddings.weight" in full
    src = tmp_path / "sat"
    (src / "1000").mkdir(parents=True)
    (src / "latest").write_text("1000")
    config = json.loads((run / "sat" / "model_config.json").read_text())
    (src / "model_config.json").write_text(json.dumps({**config, "model_parallel_size": tp}))
    for rank in range(tp):
        module = {k: sat_rank_shard(k, v, rank, tp).clone() for k, v in full.items()}
        torch.save(
            {**saved, "module": module, "mp_world_size": tp},
            src / "1000" / f"mp_rank_{rank:02d}_model_states.pt",
        )
    report = describe(src, "dsr-tiny")
    assert (report["family"], report["tensor_parallel"], report["complete"]) == ("dsr", tp, True)
    assert import_cli(src, tmp_path / "ours", "--tp", "2") == 0
    cfg = load_model_config(tmp_path / "ours")
    assert (cfg.frame_tokens, cfg.high_frame_tokens, cfg.high_window_rows, cfg.low_window) == (20, 60, 9, 5)
    ours = load_model_state(tmp_path / "ours")
    assert set(ours) == {DSR_SAT.our_name(k) for k in full}
    assert all(torch.equal(ours[DSR_SAT.our_name(k)], v) for k, v in full.items())
    assert main(["export-sat", str(tmp_path / "ours"), str(tmp_path / "back"), "--tp", str(tp)]) == 0
    for rank in range(tp):
        back = torch.load(tmp_path / "back" / "1000" / f"mp_rank_{rank:02d}_model_states.pt")["module"]
        mine = torch.load(src / "1000" / f"mp_rank_{rank:02d}_model_states.pt", weights_only=False)["module"]
        assert set(back) == set(mine) and all(torch.equal(back[k], mine[k]) for k in mine)
    exported = json.loads((tmp_path / "back" / "model_config.json").read_text())
    assert (
        exported["layout"] == config["layout"]
        and exported["new_sequence_length"] == config["new_sequence_length"]
    )
    assert import_cli(tmp_path / "back", tmp_path / "again") == 0
    assert load_model_config(tmp_path / "again") == cfg


@pytest.mark.slow
@pytest.mark.skipif(
    not RELEASE, reason="set COGVIEW2_SOURCE to a THUDM/CogView2 checkout (holding sr_pipeline/dsr_model.py)"
)
def test_low_res_positions_one_row_early_break_parity(sat_runs, tmp_path):
    """The comparison is sharp: the low-res codes at the rows the release's `reinit` tiles from
    (offset 512 instead of 513) change the hidden states far beyond the bound."""
    cfg, model = imported(sat_runs["4->12"], tmp_path / "ours")
    model.cfg = cfg.replace(low_position_offset=cfg.low_position_offset - 1)
    tokens = torch.load(sat_runs["4->12"] / "inputs.pt")["tokens"]
    hidden = []
    model.final_layernorm.register_forward_hook(lambda m, i, o: hidden.append(o))
    with torch.no_grad():
        model.double()(tokens)
    sat64 = torch.load(sat_runs["4->12"] / "logits.pt")["torch.float64"]["hidden"][:, cfg.high_start :]
    assert (hidden[0] - sat64).abs().max().item() > 1e-3 * sat64.abs().max().item()
