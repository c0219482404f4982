"""Training with `parallel.precision: auto` on this machine (the run's own step timed in both), and fp32 against bf16 over a few steps.

bf16 rounds to 8 significant bits: unit roundoff u = 2^-8. A forward pass rounds the
inputs and the weights of each of its R = 2 x (6 per layer + 1 logits) matmul operands, so to
first order the logits, and with them the loss, move by at most R u relative to fp32's. Each
further step starts from weights that already differ by the previous steps' rounding, so the
bound grows with the step: |loss_bf16(s) - loss_fp32(s)| <= s R u loss_fp32(s).
"""

from __future__ import annotations

import json

import pytest
import test_pretrain_dist
import yaml
from test_pretrain_dist import STEPS, base_args, losses, torchrun, ws  # noqa: F401  (ws: fixture)

from cogvideo.config import get_preset
from cogvideo.precision import ProbeFigures, decide
from pretrain.launch import free_port

pytestmark = pytest.mark.slow
U = 2.0**-8


def free_ports():
    while True:
        yield free_port()


test_pretrain_dist.PORTS = free_ports()  # not a fixed range: other test runs may share the machine


def run(ws, name: str, *extra: str):  # noqa: F811
    run_dir = ws["root"] / name
    proc = torchrun(
        1, base_args(ws, run_dir, "checkpoint.export_full=false", "logging.sample_keys=false", *extra)
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, proc.stderr


def saved_parallel(run_dir, step: int = STEPS) -> dict:
    return yaml.safe_load((run_dir / f"step{step:08d}" / "train_config.yaml").read_text())["parallel"]


def test_auto_chooses_from_the_probe_and_records_it(ws):  # noqa: F811
    run_dir, log = run(ws, "auto", "parallel.precision=auto")
    parallel = saved_parallel(run_dir)
    probe = parallel["precision_probe"]
    figures = ProbeFigures(
        "cpu", probe["gflops"], tuple(probe["shape"]), probe["threads"], step_seconds=probe["step_seconds"]
    )
    assert probe["requested"] == "auto" and parallel["precision"] == probe["precision"] == decide(figures)
    assert set(probe["gflops"]) == {"fp32", "bf16"} and min(probe["gflops"].values()) > 0
    # the run's own training step was timed in both precisions, and the choice follows it
    assert set(probe["step_seconds"]) == {"fp32", "bf16"} and min(probe["step_seconds"].values()) > 0
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


def test_auto_keeps_the_precision_a_resumed_run_was_trained_in(ws):  # noqa: F811
    run_dir, _ = run(
        ws, "resume", "parallel.precision=fp32", "training.max_steps=2", "checkpoint.every_steps=2"
    )
    _, log = run(
        ws,
        "resume",
        "parallel.precision=auto",
        "training.max_steps=4",
        "checkpoint.every_steps=2",
        "checkpoint.resume=auto",
    )
    assert "precision fp32 (requested auto; as trained in" in log
    assert saved_parallel(run_dir, 4)["precision"] == "fp32"


def test_bf16_and_fp32_losses_agree_within_the_rounding_bound(ws):  # noqa: F811
    layers = get_preset("tiny").num_layers
    rounding = 2 * (6 * layers + 1) * U
    fp32_dir, _ = run(ws, "fp32", "parallel.precision=fp32")
    bf16_dir, _ = run(ws, "bf16", "parallel.precision=bf16")
    assert saved_parallel(bf16_dir)["precision"] == "bf16"
    ref, low = losses(fp32_dir), losses(bf16_dir)
    assert sorted(ref) == sorted(low) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(low[step] - ref[step]) <= step * rounding * ref[step], (step, low[step], ref[step])
    assert low != ref  # bf16 really ran: its rounding shows
    # both applied every update (no step skipped as non-finite). The shards hold uniformly random
    # image tokens, so the loss stays near ln(64) and its trend over 6 steps is batch noise: which
    # of step 1 and step 6 is lower depends on the init's random stream, and asserts nothing.
    for run_dir in (fp32_dir, bf16_dir):
        rows = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
        assert [row["skipped"] for row in rows] == [0] * STEPS
