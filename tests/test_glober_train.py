"""GLOBER end to end on the project's stack: latent shards read by `cogvideo-train`
(model.family=glober, DeepSpeed ZeRO-2 on CPU ranks) through both phases. Phase autoencoder
alternates its two optimised parts (the auto-encoder, then the CRA discriminator, each with its
own engine); its DeepSpeed checkpoint converts (`cogvideo-convert zero`) into the starting point
of phase generator (init.backbone), whose DiT trains over the frozen auto-encoder. Both phases
resume bit for bit after kill -9 in a checkpoint save, and phase generator's TP=2 run equals its
TP=1 run in losses and gradient norms."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from process_helpers import trainer_command, write_kill_in_save_script
from test_pretrain_data import write_caption_tokenizer
from test_pretrain_dist import losses
from tolerances import loss_rel_tol

from cogvideo.checkpoint import load_model_state
from cogvideo.checkpoint.cli import main as convert_main
from cogvideo.checkpoint.training import tag_for as ckpt_tag
from cogvideo.jsonl import read_jsonl
from cogvideo.shards import ClipMeta, encode_sample
from pretrain.launch import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # two turns of each part; the resume tests die in the save of step KILLED
KILLED = 3
PHASE2 = ["model.phase=generator", "model.dit.num_heads=4"]
# the encoder frozen for the auto-encoder's first step (trainer step 1), trained from its second
# (step 3): the resumed run restarts after step 2 and must read its engine's restored step count
PHASE1 = ["model.encoder_frozen_steps=1"]


def write_latent_shards(root: Path) -> list[str]:
    """24 clips of glober-tiny's KL-VAE moments [5 frames, 2 x 4, 8, 8] in 4 shards, captioned as
    write_caption_tokenizer expects."""
    rng, paths = np.random.default_rng(0), []
    for s in range(4):
        path = root / f"latents-{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(6):
                mean = rng.standard_normal((5, 4, 8, 8))
                moments = np.concatenate([mean, np.full_like(mean, -4.0)], axis=1).astype(np.float32)
                meta = ClipMeta(4.0, 1.0, 1, f"v{s}.mp4", i, i + 4.0, 5, kind="latents")
                sink.write(encode_sample(f"s{s}_{i}", {"latents": moments}, f"clip {s} {i}", meta))
        paths.append(str(path))
    return paths


@dataclass
class Run:
    """One `cogvideo-train` process (or torchrun of several) writing checkpoint.dir `path`."""

    path: Path
    process: subprocess.Popen
    log: Path

    def wait(self) -> int:
        return self.process.wait(timeout=900)

    def ok(self) -> Path:
        assert self.wait() == 0, self.log.read_text()[-6000:]
        return self.path


STARTED: list[Run] = []  # killed at the module's end if still running (a failed run's siblings)


def launch(root: Path, name: str, *extra: str, nproc: int = 1, script: Path | None = None) -> Run:
    """Start `cogvideo-train` on `nproc` CPU ranks (a world of one without a launcher) in the
    background: the runs that do not depend on each other share the machine's cores."""
    cmd, env = trainer_command(nproc, free_port(), str(script) if script else None)
    path = root / name
    args = [
        "--config",
        str(ROOT / "configs/glober_tiny_test.yaml"),
        f"data.shards=[{','.join(str(p) for p in sorted(root.glob('latents-*.tar')))}]",
        f"data.text_tokenizer={root / 'text.model'}",
        "data.max_cut_text=1",
        f"checkpoint.dir={path}",
        "checkpoint.every_steps=1",
        f"checkpoint.keep_last={STEPS}",
        "checkpoint.export_full=true",
        f"training.max_steps={STEPS}",
        *extra,
    ]
    log = root / f"{name}-{len(list(root.glob(f'{name}-*.log')))}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*cmd, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    STARTED.append(Run(path, process, log))
    return STARTED[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run the tests read, each started as soon as what it starts from exists: phase
    autoencoder uninterrupted and killed in the save of step KILLED; the uninterrupted one
    converted; phase generator from it uninterrupted, at TP 2 and killed; each killed run resumed."""
    root = tmp_path_factory.mktemp("glober_train")
    write_latent_shards(root)
    write_caption_tokenizer(root)
    try:
        kill = write_kill_in_save_script(root / "kill.py", step=KILLED)
        phase1 = launch(root, "phase1", *PHASE1)
        killed1 = launch(root, "resumed-autoencoder", *PHASE1, "--resume", "auto", script=kill)
        autoencoder = root / "autoencoder"
        convert_main(["zero", str(phase1.ok()), str(autoencoder)])
        phase2_args = [*PHASE2, f"init.backbone={autoencoder}"]
        killed2 = launch(root, "resumed-generator", *phase2_args, "--resume", "auto", script=kill)
        phase2 = launch(root, "phase2", *phase2_args)
        tp2 = launch(root, "phase2-tp2", *phase2_args, "parallel.tensor_parallel=2", nproc=2)
        out = {"phase1": phase1.path, "autoencoder": autoencoder, "killed": {}, "resumed": {}}
        for phase, killed, extra in (("autoencoder", killed1, PHASE1), ("generator", killed2, phase2_args)):
            out["killed"][phase] = (killed.wait(), (killed.path / "latest").read_text())
            out["resumed"][phase] = launch(root, f"resumed-{phase}", *extra, "--resume", "auto")
        out["resumed"] = {phase: run.ok() for phase, run in out["resumed"].items()}
        out["phase2"], out["tp2"] = phase2.ok(), tp2.ok()
        yield out
    finally:
        for run in STARTED:  # what still runs after a failure
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()


def full(path: Path, step: int) -> dict:
    return torch.load(path / f"step{step:08d}/model_full.pt", weights_only=True)


def _changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))


def test_phase_autoencoder_alternates_its_two_parts(runs):
    phase1 = runs["phase1"]
    rows = read_jsonl(phase1 / "logs/metrics.jsonl")
    assert [("loss_autoencoder" in r, "loss_discriminator" in r) for r in rows] == [
        (True, False),
        (False, True),
    ] * (STEPS // 2)
    assert all(np.isfinite(r["loss"]) for r in rows)
    tag = phase1 / f"step{STEPS:08d}"
    assert all(any((tag / part).glob("*model_states.pt")) for part in ("autoencoder", "discriminator"))
    states = [full(phase1, step) for step in range(1, 4)]
    # step 2 is the discriminator's: the auto-encoder stands still; step 3 the auto-encoder's
    assert not _changed(states[0], states[1], "autoencoder.") and _changed(
        states[0], states[1], "discriminator."
    )
    assert _changed(states[1], states[2], "autoencoder.") and not _changed(
        states[1], states[2], "discriminator."
    )
    assert _changed(states[1], states[2], "autoencoder.encoder.")  # unfrozen after encoder_frozen_steps
    assert not _changed(states[0], states[2], "autoencoder.vae.")  # the KL-VAE is frozen


def test_the_parts_convert_into_one_checkpoint_of_the_whole_model(runs):
    from cogvideo.checkpoint.cli import describe

    info = describe(runs["phase1"])
    assert info["optimised_parts"] == ["autoencoder", "discriminator"] and info["iteration"] == STEPS
    merged, exported = load_model_state(runs["autoencoder"]), full(runs["phase1"], STEPS)
    assert set(merged) == set(exported) and all(torch.equal(merged[n], exported[n]) for n in merged)


def test_phase_generator_trains_the_dit_over_the_frozen_autoencoder(runs):
    start, end = load_model_state(runs["autoencoder"]), full(runs["phase2"], STEPS)
    assert all(torch.equal(end[n], start[n]) for n in end if n.startswith("autoencoder."))
    assert "discriminator.blocks" not in " ".join(end) and any(n.startswith("dit.") for n in end)
    assert _changed(full(runs["phase2"], 1), end, "dit.")


@pytest.mark.parametrize("phase", ["autoencoder", "generator"])
def test_both_phases_resume_exactly_after_kill_9(runs, phase):
    returncode, latest = runs["killed"][phase]
    assert returncode != 0 and latest == ckpt_tag(KILLED - 1)
    uninterrupted = runs["phase1" if phase == "autoencoder" else "phase2"]
    path = runs["resumed"][phase]
    reference, resumed = losses(uninterrupted), losses(path)
    assert [resumed[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]
    a, b = full(uninterrupted, STEPS), full(path, STEPS)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_phase_generator_at_tp2_trains_as_at_tp1(runs):
    rows_one = read_jsonl(runs["phase2"] / "logs/metrics.jsonl")
    rows_two = read_jsonl(runs["tp2"] / "logs/metrics.jsonl")
    assert len(rows_one) == len(rows_two) == STEPS
    depth = 2  # glober-tiny's DiT
    for step, (one, tp2) in enumerate(zip(rows_one, rows_two), start=1):
        # the same weights and batches: rounding of the split reductions, growing a little per step
        assert abs(tp2["loss"] / one["loss"] - 1) < step * loss_rel_tol(depth), (step, one, tp2)
        assert abs(tp2["grad_norm"] / one["grad_norm"] - 1) < step * loss_rel_tol(depth), (step, one, tp2)
    a, b = full(runs["phase2"], STEPS), full(runs["tp2"], STEPS)
    assert set(a) == set(b)
