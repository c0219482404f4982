"""Training with `parallel.precision: auto` on this machine (the run's own step timed in both), and fp32 against bf16 over a few steps.

bf16 rounds to 8 significant bits: unit roundoff u = 2^-8. A forward pass rounds the
inputs and the weights of each of its R = 2 x (6 per layer + 1 logits) matmul operands, so to
first order the logits, and with them the loss, move by at most R u relative to fp32's. Each
further step starts from weights that already differ by the previous steps' rounding, so the
bound grows with the step: |loss_bf16(s) - loss_fp32(s)| <= s R u loss_fp32(s).

That bound (61 % of the loss by step 6) means something only where a run that learns nothing
lands outside it: the shards here use 4 of the 64 image codes, which the tiny model learns within
the 6 steps (the loss falls from ln 64 = 4.16 toward ln 4), so a bf16 path whose output is
constant (ln 64 at every step) or that skips its updates (the initial model's loss on each batch)
fails it; both are planted beside the comparison. The loss path itself (bf16 logits -> fp32 cross
entropy) is held to fp32 rounding by the fast tests/test_precision_loss.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from test_pretrain_dist import STEPS, base_args, losses, make_workspace, reference, step_batches, torchrun

from cogvideo.models.cogvideo.config import get_preset
from cogvideo.precision import ProbeFigures, decide

pytestmark = pytest.mark.slow
U = 2.0**-8


LEARNED_CODES, LEARN_LR = 4, 2e-2


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Shards whose frames use 4 of the 64 image codes: structure the model learns in 6 steps."""
    return make_workspace(tmp_path_factory.mktemp("precision"), codes=LEARNED_CODES)


def run(ws, name: str, *extra: str):
    run_dir = ws["root"] / name
    args = [
        "checkpoint.export_full=false",
        "logging.sample_keys=true",
        f"optim.lr={LEARN_LR}",
        "model.train_backbone=true",  # every parameter learns, as in the reference loop
        *extra,
    ]
    proc = torchrun(1, base_args(ws, run_dir, *args))
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, proc.stderr


def saved_parallel(run_dir, step: int = STEPS) -> dict:
    return yaml.safe_load((run_dir / f"step{step:08d}" / "train_config.yaml").read_text())["parallel"]


def test_auto_chooses_from_the_probe_and_records_it(ws):
    run_dir, log = run(ws, "auto", "parallel.precision=auto")
    parallel = saved_parallel(run_dir)
    probe = parallel["precision_probe"]
    figures = ProbeFigures(
        "cpu", probe["gflops"], tuple(probe["shape"]), probe["threads"], step_seconds=probe["step_seconds"]
    )
    assert probe["requested"] == "auto" and parallel["precision"] == probe["precision"] == decide(figures)
    assert set(probe["gflops"]) == {"fp32", "bf16"} and min(probe["gflops"].values()) > 0
    # the run's own training step was timed in both precisions (bf16's with its attention computed
    # in fp32 too: cogvideo.sdpa), and the choice follows it
    assert set(probe["step_seconds"]) == {"fp32", "bf16", "bf16_attention_fp32"}
    assert min(probe["step_seconds"].values()) > 0
    attention = figures.attention(parallel["precision"], "auto")
    assert probe["attention"] == attention
    upcast = parallel["precision"] == "bf16" and attention == "fp32"
    assert parallel["attention_precision"] == ("fp32" if upcast else "same")
    assert "timing this run's training step" in log
    assert f"precision {parallel['precision']} (requested auto" in log  # printed at start-up
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    assert events.Scalars("precision/gflops_bf16")[0].value == pytest.approx(
        probe["gflops"]["bf16"], rel=1e-3
    )
    assert events.Scalars("precision/step_seconds_bf16")[0].value == pytest.approx(
        probe["step_seconds"]["bf16"], rel=1e-3
    )
    assert "precision/text_summary" in events.Tags()["tensors"]  # the text record


@pytest.fixture(scope="module")
def fp32_run(ws):
    """Six fp32 steps (checkpoints at steps 4 and 6): the bound's reference and the resumed run's start."""
    return run(ws, "fp32", "parallel.precision=fp32")[0]


def test_auto_keeps_the_precision_a_resumed_run_was_trained_in(ws, fp32_run):
    run_dir = ws["root"] / "resume"
    shutil.copytree(fp32_run, run_dir, ignore=shutil.ignore_patterns(f"step{STEPS:08d}"))
    (run_dir / "latest").write_text("step00000004")
    _, log = run(ws, "resume", "parallel.precision=auto", "checkpoint.resume=auto")
    assert "precision fp32 (requested auto; as trained in" in log
    assert saved_parallel(run_dir)["precision"] == "fp32"


def outside_rounding_bound(ref: dict, low: dict, rounding: float) -> list[int]:
    """The steps where |low - ref| > step * R u * ref (module docstring)."""
    return [step for step in ref if not abs(low[step] - ref[step]) <= step * rounding * ref[step]]


@pytest.fixture(scope="module")
def bf16_runs(ws):
    """Six bf16 steps with attention computed in bf16 ("same") and in fp32 (cogvideo.sdpa)."""
    return {
        attention: run(
            ws,
            f"bf16-attention-{attention}",
            "parallel.precision=bf16",
            f"parallel.attention_precision={attention}",
        )[0]
        for attention in ("same", "fp32")
    }


def test_the_attention_choice_reaches_the_training_step(bf16_runs):
    """Computed in fp32, attention rounds differently, so the losses differ; a trainer that ignored
    the choice would repeat the other run's losses bit for bit."""
    assert {a: saved_parallel(d)["attention_precision"] for a, d in bf16_runs.items()} == {
        "same": "same",
        "fp32": "fp32",
    }
    same, fp32 = (losses(bf16_runs[a]) for a in ("same", "fp32"))
    assert [step for step in same if same[step] != fp32[step]] != []


@pytest.mark.parametrize("attention", ["same", "fp32"])
def test_bf16_and_fp32_losses_agree_within_the_rounding_bound(ws, fp32_run, bf16_runs, attention):
    cfg = get_preset("tiny")
    rounding = 2 * (6 * cfg.num_layers + 1) * U
    fp32_dir, bf16_dir = fp32_run, bf16_runs[attention]
    assert saved_parallel(bf16_dir)["precision"] == "bf16"
    ref, low = losses(fp32_dir), losses(bf16_dir)
    assert sorted(ref) == sorted(low) == list(range(1, STEPS + 1))
    assert outside_rounding_bound(ref, low, rounding) == [], (ref, low)
    assert low != ref  # bf16 really ran: its rounding shows
    # the bound is sharp on this data: by the last step the fp32 run has learned enough that a run
    # at ln 64 (no learning) lies outside it
    uniform = math.log(cfg.vocab.num_image_tokens)
    assert ref[STEPS] * (1 + STEPS * rounding) < uniform, ref
    # planted: a bf16 path whose output is constant, and one that skips its updates (the initial
    # weights' loss on each step's batch, computed by the independent reference loop with lr 0)
    constant = {step: uniform for step in ref}
    skipped, _, _ = reference(ws, step_batches(fp32_dir), lr=0.0)
    for planted in (constant, skipped):
        assert outside_rounding_bound(ref, planted, rounding), planted
    # both applied every update (no step skipped as non-finite)
    for run_dir in (fp32_dir, bf16_dir):
        rows = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
        assert [row["skipped"] for row in rows] == [0] * STEPS
