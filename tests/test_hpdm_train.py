"""HPDM end to end on the project's stack: raw-frame shards read by `cogvideo-train`
(model.family=hpdm, DeepSpeed ZeRO-2 on CPU ranks), whose losses and weights an exact resume after
kill -9 reproduces bit for bit, whose TP=2 run equals the TP=1 run, and whose DeepSpeed checkpoint
`cogvideo-convert zero` turns into a model checkpoint resharded by HPDM's own TP plan."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from process_helpers import trainer_command, write_kill_in_save_script
from test_pretrain_data import write_caption_tokenizer
from test_pretrain_dist import losses
from tolerances import adam_weight_atol, loss_rel_tol

from cogvideo.checkpoint import Checkpoint, reshard
from cogvideo.checkpoint.cli import main as convert_main
from cogvideo.checkpoint.training import EMA_PREFIX
from cogvideo.family import resolve_model_section
from cogvideo.jsonl import read_jsonl
from cogvideo.models.hpdm.model import TP_PLAN
from cogvideo.shards import ClipMeta, encode_sample
from pretrain.launch import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# a two-level text-conditioned pyramid of 2x8x8 patches up to 2x16x16 frames
MODEL = [
    "model.family=hpdm",
    "model.preset=hpdm-demo",
    "model.condition=text",
    "model.patch=[2,8,8]",
    "model.block_levels=[1,2]",
    "model.interface_dim=32",
    "model.latent_dim=32",
    "model.num_latents=4",
    "model.head_dim=8",
    "model.cond_dim=16",
    "model.text_dim=16",
    "model.text_length=6",
    "model.vocab.num_image_tokens=1",
    "model.vocab.num_text_tokens=96",
    "model.vocab.text_offset=1",
    "model.vocab.vocab_size=128",
    "model.vocab.pad_piece_id=0",
]


def write_frame_shards(root: Path) -> list[str]:
    """16 clips of 2 random 16x16 frames in 4 shards, captioned as write_caption_tokenizer expects."""
    rng, paths = np.random.default_rng(0), []
    for s in range(4):
        path = root / f"frames-{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(4):
                pixels = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
                meta = ClipMeta(1.0, 1.0, 1, f"v{s}.mp4", 0.0, 1.0, 2, kind="frames")
                sink.write(encode_sample(f"s{s}c{i}", {"pixels": pixels}, f"clip {s} {i}", meta))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpdm_train")
    return {"root": root, "shards": write_frame_shards(root), "tokenizer": write_caption_tokenizer(root)}


def args(ws, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/tiny_test.yaml"),
        *MODEL,
        f"data.shards=[{','.join(ws['shards'])}]",
        f"data.text_tokenizer={ws['tokenizer']}",
        "data.max_cut_text=1",
        f"checkpoint.dir={run}",
        "checkpoint.every_steps=2",
        "checkpoint.export_full=true",
        f"training.max_steps={STEPS}",
        "parallel.precision=fp32",
        "optim.ema_decay=0.9",
        *extra,
    ]


def run(ws, name: str, nproc: int = 1, *extra: str, script: str | None = None):
    """The trainer on `nproc` ranks (a world of one without a launcher), on a free port."""
    cmd, env = trainer_command(nproc, free_port(), script)
    path = ws["root"] / name
    proc = subprocess.run(
        [*cmd, *args(ws, path, *extra)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    return proc, path


@pytest.fixture(scope="module")
def resumed(ws):
    """One run killed in its last save (step STEPS's checkpoint written, not marked complete: all
    its losses and that checkpoint's weights are an uninterrupted run's), then resumed by the same
    command from the checkpoint before. Returns the run folder, the first attempt's losses and
    last weights, and the resumed run's output."""
    script = write_kill_in_save_script(ws["root"] / "kill.py", step=STEPS)
    killed, path = run(ws, "resumed", 1, "--resume", "auto", script=str(script))
    assert killed.returncode != 0 and (path / "latest").read_text() == f"step{STEPS - 2:08d}"
    first = losses(path)
    exported, averaged = path / f"step{STEPS:08d}/model_full.pt", path / f"step{STEPS:08d}/ema_rank0.pt"
    weights, average = (torch.load(f, weights_only=True) for f in (exported, averaged))
    exported.unlink()  # the resumed run must write its own
    averaged.unlink()
    finished, _ = run(ws, "resumed", 1, "--resume", "auto")
    assert finished.returncode == 0, finished.stderr[-4000:]
    return {
        "path": path,
        "losses": first,
        "weights": weights,
        "average": average,
        "output": finished.stdout + finished.stderr,
    }


def test_training_runs_and_resumes_exactly_after_kill_9(resumed):
    reference = resumed["losses"]
    assert sorted(reference) == list(range(1, STEPS + 1)) and all(np.isfinite(list(reference.values())))
    assert "resumed from" in resumed["output"]
    # resuming from step STEPS - 2 drops the first attempt's later rows: the last two are the resumed run's
    rows = read_jsonl(resumed["path"] / "logs/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == sorted(reference.items())
    last = torch.load(resumed["path"] / f"step{STEPS:08d}/model_full.pt", weights_only=True)
    a = resumed["weights"]
    assert set(a) == set(last) and all(torch.equal(a[n], last[n]) for n in a)
    # the average of the weights (optim.ema_decay) goes on as if never interrupted
    average = torch.load(resumed["path"] / f"step{STEPS:08d}/ema_rank0.pt", weights_only=True)
    b = resumed["average"]
    assert b["updates"] == STEPS and set(b) == set(average)
    assert all(torch.equal(b[k], average[k]) for k in b if k.startswith(EMA_PREFIX))


@pytest.fixture(scope="module")
def tp2(ws):
    proc, path = run(ws, "tp2", 2, "parallel.tensor_parallel=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return path


def test_tp2_trains_as_tp1(ws, resumed, tp2):
    one, two = resumed["losses"], losses(tp2)
    for step in range(1, STEPS + 1):  # Adam moves both runs alike; rounding grows a little per step
        assert abs(two[step] / one[step] - 1) < step * loss_rel_tol(2), (step, one[step], two[step])


def test_the_deepspeed_checkpoint_converts_and_reshards_by_hpdms_plan(ws, resumed, tmp_path):
    out = tmp_path / "converted"
    convert_main(["zero", str(resumed["path"]), str(out), "--no-ema"])
    record = json.loads((out / "config.json").read_text())["model"]
    assert record["family"] == "hpdm" and record["condition"] == "text"
    cfg = resolve_model_section(
        {"family": "hpdm", "preset": "hpdm-demo"} | {k: v for k, v in record.items() if k != "family"}
    )
    full = torch.load(resumed["path"] / f"step{STEPS:08d}/model_full.pt", weights_only=True)
    tp2 = Checkpoint(reshard(out, tmp_path / "tp2", 2))
    assert tp2.cfg == cfg
    for rank in range(2):
        for name, tensor in full.items():
            assert torch.equal(tp2.readers[rank].get(name), TP_PLAN.shard_tensor(name, tensor, rank, 2)), name
    # the plan splits what it names: the latent self-attention's qkv by heads, [Q_r; K_r; V_r]
    qkv = "blocks.0.latent_layers.0.attn.qkv.weight"
    assert tp2.readers[0].get(qkv).shape[0] == full[qkv].shape[0] // 2


def test_conversion_exports_the_average_of_the_weights_merged_over_tp(ws, resumed, tp2, tmp_path):
    """A run with optim.ema_decay converts to its average (the raw weights with --no-ema, above);
    a TP=2 run's two averages merge by the plan into what the TP=1 run averaged."""
    tag = resumed["path"] / f"step{STEPS:08d}"
    average = torch.load(tag / "ema_rank0.pt", weights_only=True)
    raw = torch.load(tag / "model_full.pt", weights_only=True)
    convert_main(["zero", str(resumed["path"]), str(tmp_path / "ema")])
    converted = Checkpoint(tmp_path / "ema").readers[0]
    for name in raw:
        expected = average.get(EMA_PREFIX + name, raw[name])  # untrained buffers stay as they are
        assert torch.equal(converted.get(name), expected), name
    assert any(not torch.equal(average[EMA_PREFIX + n], raw[n]) for n in raw if EMA_PREFIX + n in average)
    convert_main(["zero", str(tp2), str(tmp_path / "ema_tp2")])
    merged = Checkpoint(tmp_path / "ema_tp2").readers[0]
    for name in raw:
        torch.testing.assert_close(merged.get(name), converted.get(name), rtol=0, atol=adam_weight_atol(1e-3))
