"""The precision probe's decision (fake figures), its timing arithmetic (fake clock), and the
agreement of ranks that measured different figures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cogvideo import precision
from cogvideo.precision import (
    CPU_BF16_MIN_SPEEDUP,
    DTYPES,
    ProbeFigures,
    decide,
    matmul_rates,
    probe_shape,
    resolve,
    torch_dtype,
)
from pretrain.launch import free_port

SHAPE = (128, 256, 1024)


def cuda(major: int, minor: int, bf16: bool) -> ProbeFigures:
    return ProbeFigures(
        "cuda", {"fp32": 50e3, "bf16": 700e3 if bf16 else 1e3, "fp16": 700e3}, SHAPE, 0, (major, minor), bf16
    )


def cpu(fp32: float, bf16: float, threads: int = 1) -> ProbeFigures:
    return ProbeFigures("cpu", {"fp32": fp32, "bf16": bf16}, SHAPE, threads)


@pytest.mark.parametrize(
    "figures, expected",
    [
        (cuda(9, 0, True), "bf16"),  # H100
        (cuda(8, 0, True), "bf16"),  # A100
        (cuda(8, 6, True), "bf16"),  # RTX 30xx / A10
        (cuda(7, 0, False), "fp16"),  # V100: fp16 tensor cores, no bf16
        (cuda(7, 5, False), "fp16"),  # T4
        (cuda(8, 0, False), "fp16"),  # capability alone is not enough: bf16 must be native
        (cuda(6, 1, False), "fp32"),  # P40: neither is fast
        (cpu(100.0, 220.0), "bf16"),  # AVX-512 BF16 (this project's machine)
        (cpu(40.0, 900.0), "bf16"),  # AMX
        (cpu(20.0, 0.3), "fp32"),  # AVX2 only: bf16 emulated
        (cpu(100.0, 120.0), "fp32"),  # bf16 barely faster: not worth its rounding
    ],
)
def test_decision_from_fake_figures(figures, expected):
    assert decide(figures) == expected
    choice = resolve("auto", figures)
    assert (choice.requested, choice.precision, choice.dtype) == ("auto", expected, DTYPES[expected])
    assert choice.warning is None


def test_cpu_threshold_is_the_documented_speedup():
    assert decide(cpu(100.0, 100.0 * CPU_BF16_MIN_SPEEDUP)) == "bf16"
    assert decide(cpu(100.0, 100.0 * CPU_BF16_MIN_SPEEDUP * 0.99)) == "fp32"


def test_explicit_bf16_where_it_is_slow_warns_with_both_figures():
    choice = resolve("bf16", cpu(20.0, 0.3))
    assert choice.precision == "bf16"  # kept: the user asked for it
    assert (
        "66.7x slower" in choice.warning
        and "0.3 GFLOP/s" in choice.warning
        and "20.0 GFLOP/s" in choice.warning
    )
    assert resolve("bf16", cpu(100.0, 45.0)).warning is not None  # just over 2x slower
    assert resolve("bf16", cpu(100.0, 55.0)).warning is None
    assert resolve("bf16", cpu(100.0, 220.0)).warning is None
    assert resolve("fp32", cpu(20.0, 0.3)).warning is None


def test_one_naming():
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="'bfloat16': expected one of fp32, bf16, fp16"):
        torch_dtype("bfloat16")
    with pytest.raises(ValueError, match="expected one of"):
        resolve("bfloat16", cpu(1.0, 1.0))


def test_record_round_trips_through_the_broadcast_vector():
    for figures in (cuda(8, 0, True), cuda(7, 0, False), cpu(97.5, 203.25, threads=3)):
        assert ProbeFigures.from_vector(figures.to_vector()) == figures
    record = resolve("auto", cpu(100.0, 220.0)).to_dict()
    assert record["precision"] == "bf16" and record["gflops"] == {"fp32": 100.0, "bf16": 220.0}


def test_probe_shape_follows_the_run_and_bounds_the_work():
    assert probe_shape(16 * 96, 256, 1024) == (128, 256, 1024)  # the demo's stage 1: cut to ~2^26 FLOP
    assert probe_shape(40, 256, 1024) == (40, 256, 1024)  # fewer rows than the cap: the run's own
    assert probe_shape(10**6, 3072, 12288) == (16, 3072, 12288)  # at least 16 rows


def test_matmul_rates_count_2mkn_over_each_dtypes_fastest_call(monkeypatch):
    # calls alternate fp32, bf16: fp32 takes 4, 2, 3 ms, bf16 1, 5, 1.5 ms; then 1 s each (past min_seconds)
    durations = [0.004, 0.001, 0.002, 0.005, 0.003, 0.0015] + [1.0] * 100
    ticks = iter(t for d in durations for t in (0.0, d))  # each call reads the clock at its start and end
    clock = lambda: next(ticks)  # noqa: E731

    monkeypatch.setattr(precision, "_clock", lambda device: clock)
    fp32, bf16 = matmul_rates([torch.float32, torch.bfloat16], (64, 32, 16), min_seconds=0.005)
    flop = 2 * 64 * 32 * 16
    assert fp32 == pytest.approx(flop / 0.002 / 1e9) and bf16 == pytest.approx(flop / 0.001 / 1e9)


def test_measure_on_this_cpu_times_both_precisions():
    figures = precision.measure("cpu", (32, 64, 64))
    assert set(figures.gflops) == {"fp32", "bf16"} and all(v > 0 for v in figures.gflops.values())
    assert figures.threads == torch.get_num_threads() and decide(figures) in ("fp32", "bf16")


def _rank_worker(rank: int, port: int, results) -> None:
    # each rank "measures" differently: rank 0 sees fast bf16 matmuls and a slow bf16 step that
    # fp32 attention speeds up, rank 1 the opposite
    fake = {0: cpu(100.0, 220.0), 1: cpu(100.0, 10.0)}[rank]
    upcast = precision.fp32_attention_step("bf16")
    steps = {0: {"fp32": 1.0, "bf16": 2.0, upcast: 1.5}, 1: {"fp32": 1.0, "bf16": 0.5, upcast: 0.6}}[rank]
    precision.measure = lambda device, shape: fake
    precision.time_steps = lambda step, names, device: {name: steps[name] for name in names}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        matmul = precision.choose_precision("auto", "cpu", SHAPE)
        step = precision.choose_precision("auto", "cpu", SHAPE, step=lambda name: None)
        attention = precision.choose_precision("bf16", "cpu", SHAPE, step=lambda name: None, attention="auto")
        results[rank] = (
            matmul.precision,
            matmul.figures.gflops["bf16"],
            step.precision,
            step.figures.step_seconds["bf16"],
            attention.attention,
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_rank_zeros_figures():
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(free_port(), results), nprocs=2)
    assert dict(results) == {0: ("bf16", 220.0, "fp32", 2.0, "fp32"), 1: ("bf16", 220.0, "fp32", 2.0, "fp32")}
