"""cogvideo-plan: the published setup, step-time arithmetic, the layout search and bad input."""
import pytest

from cluster.plan import Hardware, PlanError, main, make_plan, search
from cluster.plan_memory import GiB, Layout
from cogvideo import flops
from cogvideo.config import get_preset

STAGE1 = get_preset("cogvideo-stage1")
PUBLISHED = Layout(gpus=104, gpus_per_node=8, tp=1, zero=2, offload=True, micro_batch=4, act_ckpt=True,
                   dtype="fp16")


def test_published_setup_fits_in_80_gb():
    plan = make_plan(STAGE1, PUBLISHED)
    assert plan.fits and plan.memory.peak < 80 * GiB
    assert plan.global_batch == 416  # 13 nodes x 8 A100 x 4, as published
    states = plan.memory.states
    assert states.gradients == states.optimizer == 0 and states.host > 0
    assert states.weights_frozen == 2 * plan.memory.params.frozen


def test_without_checkpointing_or_zero_it_does_not_fit():
    no_savings = Layout(gpus=104, zero=0, micro_batch=4, dtype="fp16")
    assert not make_plan(STAGE1, no_savings).fits


def test_step_time_and_mfu_arithmetic():
    hw = Hardware(peak_tflops=100.0, efficiency=0.5)
    cfg = get_preset("small")
    plan = make_plan(cfg, Layout(gpus=1, gpus_per_node=1, micro_batch=2, act_ckpt=True, dtype="bf16"), hw)
    model, extra = flops.train_flops(cfg, 2), flops.recompute_flops(cfg.replace(activation_checkpointing=True), 2)
    assert plan.step.compute_s == pytest.approx((model + extra) / (100e12 * 0.5))
    assert plan.step.dp_comm_s == plan.step.tp_comm_s == plan.step.offload_s == 0
    assert plan.mfu == pytest.approx(0.5 * model / (model + extra))


def test_tensor_parallel_splits_compute_and_adds_communication():
    one = make_plan(STAGE1, Layout(gpus=16, micro_batch=1, act_ckpt=True, dtype="bf16"))
    two = make_plan(STAGE1, Layout(gpus=16, tp=2, micro_batch=1, act_ckpt=True, dtype="bf16"))
    assert two.step.model_flops_per_gpu == pytest.approx(one.step.model_flops_per_gpu / 2)
    assert two.step.tp_comm_s > 0 == one.step.tp_comm_s
    assert two.memory.peak < one.memory.peak


def test_search_lists_only_fitting_layouts_fastest_first():
    plans = search(STAGE1, gpus=16, gpus_per_node=8, dtype="bf16", hw=Hardware(gpu_mem_gib=40))
    assert plans and all(p.fits for p in plans)
    rates = [p.samples_per_s for p in plans]
    assert rates == sorted(rates, reverse=True)
    assert {p.layout.tp for p in plans} <= {1, 2, 4, 8}  # 3, 5, 6, 7 do not divide 48 heads
    assert any(p.layout.offload for p in plans) and any(p.layout.zero == 3 for p in plans)
    # a slower layout is never listed above a faster one: the first beats the published one
    published = make_plan(STAGE1, Layout(gpus=16, zero=2, offload=True, micro_batch=4, act_ckpt=True,
                                         dtype="bf16"), Hardware(gpu_mem_gib=40))
    assert published.fits and plans[0].samples_per_s >= published.samples_per_s


@pytest.mark.parametrize("layout, message", [
    (Layout(gpus=104, tp=5), "num_heads: 48 is not divisible by tensor_parallel=5"),
    (Layout(gpus=32, gpus_per_node=8, tp=16), "more than the 8 GPUs of a node"),
    (Layout(gpus=0), "--gpus must be >= 1"),
    (Layout(gpus=12, gpus_per_node=8), "not a whole number of 8-GPU nodes"),
    (Layout(gpus=8, zero=0, offload=True), "--offload needs ZeRO"),
    (Layout(gpus=8, zero=4), "--zero must be 0, 1, 2 or 3"),
    (Layout(gpus=8, micro_batch=0), "--micro-batch must be >= 1"),
    (Layout(gpus=8, dtype="fp8"), "--dtype must be one of"),
])
def test_bad_layouts_are_refused(layout, message):
    with pytest.raises(PlanError, match=message):
        make_plan(STAGE1, layout)


def test_cli_report(capsys):
    main(["--preset", "cogvideo-stage1", "--gpus", "104", "--zero", "2", "--offload", "--micro-batch", "4",
          "--act-ckpt", "--dtype", "fp16"])
    out = capsys.readouterr().out
    assert "7.720B (1.818B trainable, 5.903B frozen)" in out
    assert "of 80 GiB: fits" in out and "global batch 416" in out and "MFU" in out
    assert "cheapest layout that fits" in out


def test_cli_search_and_overrides(capsys):
    main(["--preset", "small", "num_layers=2", "--gpus", "2", "--gpus-per-node", "2", "--gpu-mem", "3", "--search",
          "--limit", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["TP", "ZeRO", "offload", "micro", "ckpt"]
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("...")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "cogvideo-stage1", "--gpus", "8", "--tp", "5"], "not divisible by tensor_parallel=5"),
    (["--preset", "cogvideo-stage1", "--gpus", "0"], "--gpus must be >= 1"),
    (["--preset", "nope", "--gpus", "8"], "unknown preset 'nope'"),
    (["--preset", "small", "hidden=3", "--gpus", "8"], "unknown config key"),
    (["--preset", "small", "--gpus", "8", "--efficiency", "2"], "--efficiency must be in"),
])
def test_cli_errors_name_the_problem(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
