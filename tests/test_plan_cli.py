"""cogvideo-plan: the published setup, step-time arithmetic, the layout search and bad input."""

import pytest

from cluster.plan import GPU_KINDS, Hardware, PlanError, main, make_plan, search
from cluster.plan_memory import GiB, Layout
from cogvideo import flops
from cogvideo.config import get_preset

STAGE1 = get_preset("cogvideo-stage1")
PUBLISHED = Layout(
    gpus=104, gpus_per_node=8, tp=1, zero=2, offload=True, micro_batch=4, act_ckpt=True, dtype="fp16"
)


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
    model, extra = (
        flops.train_flops(cfg, 2),
        flops.recompute_flops(cfg.replace(activation_checkpointing=True), 2),
    )
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
    published = make_plan(
        STAGE1,
        Layout(gpus=16, zero=2, offload=True, micro_batch=4, act_ckpt=True, dtype="bf16"),
        Hardware(gpu_mem_gib=40),
    )
    assert published.fits and plans[0].samples_per_s >= published.samples_per_s


@pytest.mark.parametrize(
    "layout, message",
    [
        (Layout(gpus=104, tp=5), "num_heads: 48 is not divisible by tensor_parallel=5"),
        (Layout(gpus=32, gpus_per_node=8, tp=16), "more than the 8 GPUs of a node"),
        (Layout(gpus=0), "--gpus must be >= 1"),
        (Layout(gpus=12, gpus_per_node=8), "not a whole number of 8-GPU nodes"),
        (Layout(gpus=8, zero=0, offload=True), "--offload needs ZeRO"),
        (Layout(gpus=8, zero=4), "--zero must be 0, 1, 2 or 3"),
        (Layout(gpus=8, micro_batch=0), "--micro-batch must be >= 1"),
        (Layout(gpus=8, dtype="fp8"), "--dtype must be one of"),
    ],
)
def test_bad_layouts_are_refused(layout, message):
    with pytest.raises(PlanError, match=message):
        make_plan(STAGE1, layout)


def test_cli_report(capsys):
    main(
        [
            "--preset",
            "cogvideo-stage1",
            "--gpus",
            "104",
            "--zero",
            "2",
            "--offload",
            "--micro-batch",
            "4",
            "--act-ckpt",
            "--dtype",
            "fp16",
        ]
    )
    out = capsys.readouterr().out
    assert "7.720B (1.818B trainable, 5.902B frozen)" in out  # position table 1024 rows (SAT)
    assert "of 80 GiB: fits" in out and "global batch 416" in out and "MFU" in out
    assert "cheapest layout that fits" in out


def test_cli_search_and_overrides(capsys):
    main(
        [
            "--preset",
            "small",
            "num_layers=2",
            "--gpus",
            "2",
            "--gpus-per-node",
            "2",
            "--gpu-mem",
            "3",
            "--search",
            "--limit",
            "3",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["TP", "ZeRO", "offload", "micro", "ckpt"]
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("...")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "cogvideo-stage1", "--gpus", "8", "--tp", "5"], "not divisible by tensor_parallel=5"),
        (["--preset", "cogvideo-stage1", "--gpus", "0"], "--gpus must be >= 1"),
        (["--preset", "nope", "--gpus", "8"], "unknown preset 'nope'"),
        (["--preset", "small", "hidden=3", "--gpus", "8"], "unknown config key"),
        (["--preset", "small", "--gpus", "8", "--efficiency", "2"], "--efficiency must be in"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_layout_that_does_not_fit_exits_nonzero(capsys):
    argv = ["--preset", "cogvideo-stage1", "--gpus", "8", "--zero", "0", "--micro-batch", "4"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "does not fit in 80 GiB" in captured.err
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--preset",
                "cogvideo-stage1",
                "--gpus",
                "1",
                "--gpus-per-node",
                "1",
                "--gpu-mem",
                "4",
                "--search",
            ]
        )
    assert exit_.value.code == 1 and "none: add GPUs or memory" in capsys.readouterr().out


def test_the_gpu_kind_sets_memory_and_peak(capsys):
    main(
        [
            "--preset",
            "cogvideo-stage1",
            "--gpus",
            "104",
            "--offload",
            "--micro-batch",
            "4",
            "--act-ckpt",
            "--gpu",
            "h200",
        ]
    )
    out = capsys.readouterr().out
    assert "of 141 GiB: fits" in out and "peak 989 TFLOP/s (h200 datasheet, dense bf16)" in out
    a100 = make_plan(STAGE1, PUBLISHED, Hardware(gpu="a100-80gb"))
    h100 = make_plan(STAGE1, PUBLISHED, Hardware(gpu="h100"))
    assert h100.step.compute_s == pytest.approx(a100.step.compute_s * 312 / 989)
    with pytest.raises(PlanError, match="v100-32gb has no bf16"):
        make_plan(STAGE1, Layout(gpus=8), Hardware(gpu="v100-32gb", gpu_mem_gib=32))
    assert all(set(kind.peak_tflops) <= {"bf16", "fp16", "fp32"} for kind in GPU_KINDS.values())


def test_a_smaller_card_without_its_kind_is_flagged(capsys):
    with pytest.raises(SystemExit):  # 24 GiB: the published layout does not fit
        main(["--preset", "cogvideo-stage1", "--gpus", "104", "--gpu-mem", "24", "--micro-batch", "4"])
    err = capsys.readouterr().err
    assert "timing a 24 GiB card at a100-80gb peak" in err and "--gpu" in err
    main(["--preset", "small", "--gpus", "1", "--gpus-per-node", "1", "--gpu", "rtx4090"])
    captured = capsys.readouterr()
    assert "note" not in captured.err and "rtx4090 datasheet, dense bf16" in captured.out


def test_config_reads_the_training_yaml(capsys):
    main(["--config", "configs/cogvideo_stage1.yaml", "--gpus", "104"])
    out = capsys.readouterr().out
    # the YAML's layout: ZeRO-2 + offload, micro-batch 8, fp16, activation checkpointing, TP 1
    assert "TP 1 x DP 104, ZeRO-2 + CPU offload, micro-batch 8, fp16, act ckpt" in out
    main(
        [
            "--config",
            "configs/cogvideo_stage1.yaml",
            "--gpus",
            "104",
            "training.micro_batch_size=4",
            "parallel.tensor_parallel=2",
        ]
    )
    out = capsys.readouterr().out
    assert "TP 2 x DP 52, ZeRO-2 + CPU offload, micro-batch 4, fp16, act ckpt" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--config", "configs/cogvideo_stage1.yaml", "--gpus", "8", "--micro-batch", "2"],
            "--micro-batch: with --config the layout comes from configs/cogvideo_stage1.yaml; "
            "override it there or as training.micro_batch_size=",
        ),
        (
            ["--config", "configs/cogvideo_stage1.yaml", "--gpus", "8", "parallel.tensor_paralel=2"],
            "tensor_paralel",
        ),
        (["--config", "nope.yaml", "--gpus", "8"], "nope.yaml"),
    ],
)
def test_config_errors_name_the_key(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
