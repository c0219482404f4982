"""`auto` in training decides by the run's own step: the decision from step times (fake figures),
the alternating timer (fake clock), that the step is timed only where auto needs it, and that the
timed step is the training step (fp32: bit-comparable to a hand-written AdamW step; bf16: fp32
master weights moved by Adam's first step, the model holding their bf16 rounding)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import yaml
from test_pretrain_data import write_caption_tokenizer, write_shards
from test_sdpa import recorded_dtypes
from tolerances import adam_weight_atol

from cogvideo import parallel, precision
from cogvideo.checkpoint.training import TRAIN_CONFIG
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import image_token_loss
from cogvideo.precision import (
    STEP_MIN_SPEEDUP,
    ProbeFigures,
    choose_precision,
    decide,
    fp32_attention_step,
    resolve,
)
from cogvideo.tokenizers.text import TextTokenizer
from pretrain.config import DataConfig, OptimConfig, ParallelConfig, TrainConfig, TrainingConfig
from pretrain.launch import free_port
from pretrain.optim import param_groups
from pretrain.step_probe import StepProbe, probe_batch
from pretrain.train import run_precision

SHAPE = (128, 256, 1024)


def cpu(fp32_step: float, bf16_step: float, gflops=(100.0, 220.0)) -> ProbeFigures:
    return ProbeFigures(
        "cpu",
        dict(zip(("fp32", "bf16"), gflops)),
        SHAPE,
        1,
        step_seconds={"fp32": fp32_step, "bf16": bf16_step},
    )


def cuda(major: int, bf16: bool, steps: dict) -> ProbeFigures:
    return ProbeFigures("cuda", {"fp32": 50e3}, SHAPE, 0, (major, 0), bf16, steps)


@pytest.mark.parametrize(
    "figures, excluded, expected",
    [
        (cpu(0.70, 0.40), (), "bf16"),  # 1.75x faster
        (cpu(0.727, 0.568), (), "fp32"),  # the demo's stage 1 on AVX-512 BF16: 1.28x, not clearly
        (cpu(0.70, 0.70, gflops=(210.0, 680.0)), (), "fp32"),  # AMX: matmul 3.2x, the step no faster
        (cpu(0.70, 0.30), ("bf16",), "fp32"),  # known to cost quality: never, however fast
        (cpu(0.54, 5.0, gflops=(20.0, 0.3)), (), "fp32"),  # AVX2 only: bf16 emulated
        (cuda(8, True, {"fp32": 1.0, "bf16": 0.3}), (), "bf16"),  # A100 on a large step
        (cuda(8, True, {"fp32": 1.0, "bf16": 0.95}), (), "fp32"),  # a tiny model: launch-bound
        (cuda(7, False, {"fp32": 1.0, "fp16": 0.4}), (), "fp16"),  # V100: its low precision is fp16
        (cuda(7, False, {"fp32": 1.0, "fp16": 0.4}), ("fp16",), "fp32"),
        (cuda(6, False, {"fp32": 1.0}), (), "fp32"),  # P40: nothing below fp32 to time
    ],
)
def test_decision_from_step_times(figures, excluded, expected):
    assert decide(figures, excluded) == expected
    choice = resolve("auto", figures, excluded)
    assert choice.precision == expected
    record = choice.to_dict()
    assert record["step_seconds"] == pytest.approx(figures.step_seconds, rel=1e-3)
    assert "own step s" in choice.describe()
    if excluded and figures.low_precision in excluded:
        assert "excluded" in choice.reason


def test_step_threshold_is_the_documented_speedup():
    assert decide(cpu(STEP_MIN_SPEEDUP, 1.0)) == "bf16"
    assert decide(cpu(STEP_MIN_SPEEDUP * 0.99, 1.0)) == "fp32"


def test_exclusion_also_holds_without_step_times():
    matmul_only = ProbeFigures("cpu", {"fp32": 100.0, "bf16": 220.0}, SHAPE, 1)
    assert decide(matmul_only) == "bf16" and decide(matmul_only, ("bf16",)) == "fp32"


def test_step_figures_round_trip_through_the_broadcast_vector():
    for figures in (cpu(0.7, 0.5), cuda(7, False, {"fp32": 1.0, "fp16": 0.4}), cpu(0.7, 0.5)):
        assert ProbeFigures.from_vector(figures.to_vector()) == figures


def test_time_steps_alternates_and_takes_each_precisions_median(monkeypatch):
    calls = []
    # timed calls alternate fp32, bf16: fp32 takes 3, 1, 2 s; bf16 5, 9, 4 s (median 2 and 5)
    durations = iter([3.0, 5.0, 1.0, 9.0, 2.0, 4.0])
    now = [0.0]

    def step(name):
        calls.append(name)
        if len(calls) > 2:  # after one warm-up call each
            now[0] += next(durations)

    monkeypatch.setattr(precision, "_clock", lambda device: lambda: now[0])
    seconds = precision.time_steps(step, ["fp32", "bf16"], warmup=1, repeats=3)
    assert calls == ["fp32", "bf16"] + ["fp32", "bf16"] * 3
    assert seconds == {"fp32": 2.0, "bf16": 5.0}


def test_the_step_is_timed_only_where_auto_needs_it(monkeypatch):
    monkeypatch.setattr(
        precision, "probe", lambda device, shape: ProbeFigures("cpu", {"fp32": 1.0, "bf16": 1.0}, shape, 1)
    )
    calls = []
    choice = choose_precision("auto", "cpu", SHAPE, step=calls.append)
    steps = precision.STEP_WARMUP + precision.STEP_REPEATS
    assert sorted(calls) == ["bf16"] * steps + ["fp32"] * steps
    assert set(choice.figures.step_seconds) == {"fp32", "bf16"}
    calls.clear()
    assert choose_precision("fp32", "cpu", SHAPE, step=calls.append).precision == "fp32" and calls == []
    choice = choose_precision("auto", "cpu", SHAPE, step=calls.append, excluded=("bf16",))
    assert choice.precision == "fp32" and calls == [] and "excluded" in choice.reason


# ---- a low precision's step also timed with its attention in fp32 (cogvideo.sdpa) --------------


def fake_timing(monkeypatch, figures: ProbeFigures, seconds: dict) -> list[str]:
    """choose_precision on `figures` with steps that take `seconds`; the names it timed."""
    timed = []
    monkeypatch.setattr(precision, "probe", lambda device, shape: replace(figures, step_seconds={}))

    def time_steps(step, names, device):
        timed.extend(names)
        return {name: seconds[name] for name in names}

    monkeypatch.setattr(precision, "time_steps", time_steps)
    return timed


UPCAST = fp32_attention_step("bf16")


@pytest.mark.parametrize(
    "bf16, upcast, expected, attention",
    [
        (0.50, 0.35, "bf16", "fp32"),  # bf16 1.4x fp32 alone (not chosen), 2.0x with fp32 attention
        (0.40, 0.45, "bf16", "bf16"),  # fp32 attention slower here (bf16 units): kept in bf16
        (0.60, 0.55, "fp32", "fp32"),  # neither clearly faster than fp32's step: fp32 throughout
    ],
)
def test_auto_times_the_low_precisions_step_with_fp32_attention_too(
    monkeypatch, bf16, upcast, expected, attention
):
    timed = fake_timing(monkeypatch, cpu(0.7, 0.7), {"fp32": 0.70, "bf16": bf16, UPCAST: upcast})
    choice = choose_precision("auto", "cpu", SHAPE, step=lambda name: None, attention="auto")
    assert timed == ["fp32", "bf16", UPCAST]
    assert (choice.precision, choice.attention) == (expected, attention)
    assert choice.fp32_attention == (expected == "bf16" and attention == "fp32")
    assert choice.to_dict()["attention"] == attention and choice.to_dict()["step_seconds"][UPCAST] == upcast
    if expected == "bf16":
        assert "with fp32 attention" in choice.reason and f"attention in {attention}" in choice.reason
    assert ("attention in fp32 (" in choice.describe()) == choice.fp32_attention


@pytest.mark.parametrize(
    "requested, device, excluded, attention, expected",
    [
        ("auto", "cpu", (), "auto", ["fp32", "bf16", UPCAST]),
        ("auto", "cpu", (), "same", ["fp32", "bf16"]),
        ("auto", "cpu", (), "fp32", ["fp32", UPCAST]),
        ("auto", "cpu", ("bf16",), "auto", []),
        ("auto", "cuda", (), "auto", ["fp32", "bf16"]),  # CUDA keeps its fused bf16 kernels
        ("bf16", "cpu", (), "auto", ["bf16", UPCAST]),  # explicit bf16: only the attention to decide
        ("bf16", "cpu", (), "fp32", []),
        ("bf16", "cpu", (), "same", []),
        ("fp32", "cpu", (), "auto", []),
    ],
)
def test_what_is_timed(requested, device, excluded, attention, expected):
    figures = cpu(0.7, 0.5) if device == "cpu" else cuda(8, True, {})
    assert precision.steps_to_time(requested, figures, excluded, attention) == expected


def test_explicit_attention_holds_without_timing(monkeypatch):
    timed = fake_timing(monkeypatch, cpu(0.7, 0.7), {})
    assert choose_precision("bf16", "cpu", SHAPE, step=lambda name: None, attention="fp32").fp32_attention
    assert not choose_precision("bf16", "cpu", SHAPE, step=lambda name: None, attention="same").fp32_attention
    fp32 = choose_precision("fp32", "cpu", SHAPE, step=lambda name: None, attention="auto")
    assert not fp32.fp32_attention and timed == []


def test_attention_step_figures_round_trip_through_the_broadcast_vector():
    figures = replace(cpu(0.7, 0.5), step_seconds={"fp32": 0.7, "bf16": 0.5, UPCAST: 0.4})
    assert ProbeFigures.from_vector(figures.to_vector()) == figures
    assert precision.split_step_name(UPCAST) == ("bf16", True)
    assert precision.split_step_name("bf16") == ("bf16", False)


@pytest.mark.parametrize(
    "recorded, asked, fp32_attention",
    [
        ({"precision": "bf16", "attention_precision": "fp32"}, "auto", True),
        ({"precision": "bf16"}, "auto", False),  # trained before the attention was chosen: as it ran
        ({"precision": "bf16", "attention_precision": "fp32"}, "same", False),  # asked for: as asked
    ],
)
def test_a_resumed_run_keeps_the_attention_it_trained_with(tmp_path, recorded, asked, fp32_attention):
    (tmp_path / TRAIN_CONFIG).write_text(yaml.safe_dump({"parallel": recorded}))
    cfg = TrainConfig(parallel=ParallelConfig(precision="auto", attention_precision=asked))

    def never():
        raise AssertionError("a resumed run times no step")

    choice = run_precision(cfg, get_preset("tiny"), tmp_path, never)
    assert choice.precision == "bf16" and choice.fp32_attention == fp32_attention
    assert "as trained in" in choice.reason


def test_the_probe_steps_with_the_attention_it_is_asked_for(probe_setup, monkeypatch):
    """The timed step runs every attention call in fp32 when its name says so, else in bf16."""
    cfg, model_cfg, batch = probe_setup
    calls = recorded_dtypes(monkeypatch)
    probe = StepProbe(cfg, model_cfg, batch)
    try:
        probe(UPCAST)
        upcast, calls[:] = list(calls), []
        probe("bf16")
    finally:
        probe.close()
    assert upcast and set(upcast) == {torch.float32}
    assert calls and set(calls) == {torch.bfloat16}


# ---- the timed step is the training step ---------------------------------------------------


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    """A world of one (torch.distributed in this process, as the trainer's rank), the tiny model's
    config and a batch of its shards."""
    root = tmp_path_factory.mktemp("probe")
    shards = write_shards(root)
    tokenizer = write_caption_tokenizer(root)
    model_cfg = get_preset("tiny").replace(train_backbone=True)
    cfg = TrainConfig(
        parallel=ParallelConfig(zero_stage=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.01, grad_clip=0.5),
        training=TrainingConfig(micro_batch_size=3, seed=5, max_steps=10),
        data=DataConfig(shards=shards, stage=1, max_cut_text=1.0),
    )
    saved = dict(os.environ)
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    parallel.init_distributed(1)
    encode = TextTokenizer(tokenizer, model_cfg.vocab).encode
    yield cfg, model_cfg, probe_batch(cfg, model_cfg, shards, encode)
    parallel.destroy()
    os.environ.clear()
    os.environ.update(saved)


def initial_weights(cfg, model_cfg) -> dict[str, torch.Tensor]:
    parallel.manual_seed(cfg.training.seed)
    return build_model(model_cfg).state_dict()


def reference_step(cfg, model_cfg, batch) -> dict[str, torch.Tensor]:
    """One hand-written fp32 step: the same seed's model, loss, clip and torch AdamW."""
    parallel.manual_seed(cfg.training.seed)
    model = build_model(model_cfg)
    loss = image_token_loss(
        model_cfg, model(batch.tensors["tokens"]), batch.tensors["targets"], batch.tensors["loss_mask"]
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    o = cfg.optim
    torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps).step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def probe_weights(probe: StepProbe, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in probe.engine(name).first.module.state_dict().items()}


def test_the_fp32_probe_step_is_a_training_step(probe_setup):
    cfg, model_cfg, batch = probe_setup
    assert (
        batch.tensors["tokens"].shape[0] == cfg.training.micro_batch_size and batch.tensors["loss_mask"].any()
    )
    initial = initial_weights(cfg, model_cfg)
    expected = reference_step(cfg, model_cfg, batch)
    probe = StepProbe(cfg, model_cfg, batch)
    try:
        probe("fp32")
        got = probe_weights(probe, "fp32")
    finally:
        probe.close()
    assert got.keys() == expected.keys() == initial.keys()
    for name, value in expected.items():  # as the trainer's own test holds its steps (tolerances.py)
        torch.testing.assert_close(got[name], value, rtol=0, atol=adam_weight_atol(cfg.optim.lr), msg=name)
    assert sum(not torch.equal(initial[k], v) for k, v in expected.items()) > len(expected) // 2


def test_the_bf16_probe_step_trains_in_bf16_on_fp32_masters(probe_setup):
    cfg, model_cfg, batch = probe_setup
    lr, u = cfg.optim.lr, 2.0**-8
    start = {k: v.to(torch.bfloat16).float() for k, v in initial_weights(cfg, model_cfg).items()}
    expected = reference_step(cfg, model_cfg, batch)
    probe = StepProbe(cfg, model_cfg, batch)
    try:
        probe("bf16")
        engine = probe.engine("bf16").first
        assert engine.bfloat16_enabled() and next(engine.module.parameters()).dtype == torch.bfloat16
        got = probe_weights(probe, "bf16")
    finally:
        probe.close()
    moved = total = 0
    for name, value in expected.items():
        # Adam's first step moves a weight by at most lr (sign(g) may differ from fp32's: 2 lr), and
        # the start and the result are each rounded to bf16 (half a unit u each)
        torch.testing.assert_close(got[name], value, rtol=u, atol=2 * lr * (1 + 1e-3), msg=name)
        moved += int(((got[name] - start[name]).abs() >= 0.5 * lr).sum())
        total += value.numel()
    assert moved > 0.5 * total  # the update was applied (an lr step is several bf16 units here)
    reference = {k: expected[k] - v for k, v in initial_weights(cfg, model_cfg).items()}
    assert same_direction(got, start, reference) >= 0.9
    # planted: the same step taken the wrong way passes the 2 lr bound above, not this one
    flipped = {k: 2 * start[k] - v for k, v in got.items()}
    assert same_direction(flipped, start, reference) < 0.1


def same_direction(got: dict, start: dict, reference: dict) -> float:
    """The share of weights whose update has the fp32 reference update's sign, among those the
    reference moves by at least half a step (Adam's first step is +-lr per weight: bf16 gradients
    flip the sign only where the gradient is near zero, which such weights' are not)."""
    agree = counted = 0
    for name, ref in reference.items():
        big = ref.abs() >= 0.5 * (ref.abs().max() if ref.numel() else 0)
        delta = got[name] - start[name]
        agree += int((torch.sign(delta[big]) == torch.sign(ref[big])).sum())
        counted += int(big.sum())
    return agree / max(counted, 1)


def test_a_probe_that_skips_the_update_fails_the_comparison(probe_setup, monkeypatch):
    cfg, model_cfg, batch = probe_setup
    expected = reference_step(cfg, model_cfg, batch)
    probe = StepProbe(cfg, model_cfg, batch)
    try:
        engine = probe.engine("fp32").first
        monkeypatch.setattr(engine, "step", lambda: None)  # the planted bug: no optimizer step
        probe("fp32")
        got = probe_weights(probe, "fp32")
    finally:
        probe.close()
    atol = adam_weight_atol(cfg.optim.lr)
    assert any(not torch.allclose(got[k], v, rtol=0, atol=atol) for k, v in expected.items())
