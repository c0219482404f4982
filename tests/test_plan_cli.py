"""cogvideo-plan: the published setup, step-time arithmetic, the layout search and bad input."""

import pytest

from cluster.plan import GPU_KINDS, Hardware, PlanError, main, make_plan, report, search
from cluster.plan_memory import GiB, Layout
from cogvideo.models.cogvideo import flops
from cogvideo.models.cogvideo.config import get_preset

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
        (Layout(gpus=8, zero=0, offload=True), "parallel.offload_optimizer needs ZeRO"),
        (Layout(gpus=8, zero=4), "parallel.zero_stage must be 0, 1, 2 or 3"),
        (Layout(gpus=8, micro_batch=0), "training.micro_batch_size must be >= 1"),
        (Layout(gpus=8, dtype="fp8"), "parallel.precision must be one of"),
    ],
)
def test_bad_layouts_are_refused(layout, message):
    with pytest.raises(PlanError, match=message):
        make_plan(STAGE1, layout)


# the published run as overrides: the backbone frozen (as init.backbone would), ZeRO-2 + offload,
# micro-batch 4, activation checkpointing, fp16
PUBLISHED_OVERRIDES = [
    "model.preset=cogvideo-stage1",
    "model.train_backbone=false",
    "parallel.zero_stage=2",
    "parallel.offload_optimizer=true",
    "training.micro_batch_size=4",
    "model.activation_checkpointing=true",
    "parallel.precision=fp16",
]


def test_cli_report(capsys):
    main([*PUBLISHED_OVERRIDES, "--gpus", "104"])
    out = capsys.readouterr().out
    assert "7.720B (1.818B trainable, 5.902B frozen)" in out  # position table 1024 rows (SAT)
    assert "of 80 GiB: fits" in out and "global batch 416" in out and "MFU" in out
    assert "cheapest layout that fits" in out and "set by: parallel.tensor_parallel=" in out


def test_cli_search_and_overrides(capsys):
    argv = ["model.preset=small", "model.num_layers=2", "--gpus", "2", "--gpus-per-node", "2"]
    main([*argv, "--gpu-mem", "3", "--search", "--limit", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["TP", "ZeRO", "offload", "micro", "ckpt"]
    assert len(lines) == 2 + 3 + 2 and lines[-2].startswith("...")
    # the search varies only what training accepts (parallel.zero_stage 0 to 3, 0 not in fp16)
    # and names the overrides of the fastest row, which plan to the very same figures
    assert all(row.split()[1] in ("0", "1", "2", "3") for row in lines[2:5])
    fastest = lines[-1].removeprefix("fastest: ").split()
    assert fastest[0] == f"parallel.tensor_parallel={lines[2].split()[0]}"
    main([*argv, "--gpu-mem", "3", *fastest])
    assert f"{float(lines[2].split()[5]):.2f} GiB   of 3 GiB: fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["model.preset=cogvideo-stage1", "--gpus", "8", "parallel.tensor_parallel=5"],
            "not divisible by tensor_parallel=5",
        ),
        (["model.preset=cogvideo-stage1", "--gpus", "0"], "--gpus must be >= 1"),
        (["model.preset=nope", "--gpus", "8"], "unknown preset 'nope'"),
        (["model.preset=small", "model.hidden=3", "--gpus", "8"], "unknown config key(s): model.hidden"),
        (["model.preset=small", "--gpus", "8", "--efficiency", "2"], "--efficiency must be in"),
        (
            ["--gpus", "8", "parallel.zero_stage=4"],
            "parallel.zero_stage: 4 is not one of ('auto', 0, 1, 2, 3)",
        ),
        (
            ["--gpus", "8", "parallel.precision=bf16", "--gpu", "v100-32gb"],
            "v100-32gb has no bf16 tensor cores; set another parallel.precision",
        ),
        (
            ["--gpus", "8", "parallel.precision=bf16", "parallel.attention_precision=fp32"],
            "parallel.attention_precision=fp32: the planner counts attention's activations",
        ),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--preset", "cogvideo-stage1"], "model.preset=cogvideo-stage1"),
        (["--tp", "8"], "parallel.tensor_parallel=8"),
        (["--tp=2"], "parallel.tensor_parallel=2"),
        (["--zero", "3"], "parallel.zero_stage=3"),
        (["--offload"], "parallel.offload_optimizer=true"),
        (["--micro-batch", "4"], "training.micro_batch_size=4"),
        (["--act-ckpt"], "model.activation_checkpointing=true"),
        (["--dtype", "fp16"], "parallel.precision=fp16"),
    ],
)
def test_removed_layout_flags_name_their_training_key(flags, key, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/cogvideo_stage1.yaml", "--gpus", "104", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"cogvideo-plan: {flags[0].split('=')[0]} was removed: write {key} "
        "(cogvideo-plan reads the training settings as cogvideo-train does: "
        "--config FILE.yaml plus key=value overrides)"
    ]


def test_the_yaml_and_the_same_settings_as_overrides_print_the_same_plan(capsys):
    main(["--config", "configs/cogvideo_stage1.yaml", "--gpus", "104"])
    from_yaml = capsys.readouterr().out
    overrides = [
        "model.preset=cogvideo-stage1",
        "model.activation_checkpointing=true",
        "init.backbone=checkpoints/cogview2-6b",  # from a backbone: the backbone stays frozen
        "parallel.offload_optimizer=true",
        "parallel.precision=fp16",
        "training.micro_batch_size=8",
    ]
    main(["--gpus", "104", *overrides[:3]])  # parallel.zero_stage=2 is the default
    assert "micro-batch 1, bf16" in capsys.readouterr().out  # the defaults (auto: bf16 on an A100)
    main([*overrides[:3], "--gpus", "104", *overrides[3:]])
    assert capsys.readouterr().out == from_yaml
    assert "TP 1 x DP 104, ZeRO-2 + CPU offload, micro-batch 8, fp16, act ckpt" in from_yaml


def test_from_scratch_every_parameter_trains_as_in_training(capsys):
    main(["model.preset=cogvideo-stage1", "--gpus", "104"])  # no init.*: cogvideo-train trains all
    assert "7.720B (7.720B trainable, 0.000B frozen)" in capsys.readouterr().out


def test_a_layout_that_does_not_fit_exits_nonzero(capsys):
    argv = ["model.preset=cogvideo-stage1", "model.train_backbone=false", "--gpus", "8"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "parallel.zero_stage=1", "training.micro_batch_size=4"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "does not fit in 80 GiB" in captured.err
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:2], "--gpus", "1", "--gpus-per-node", "1", "--gpu-mem", "4", "--search"])
    assert exit_.value.code == 1 and "none: add GPUs or memory" in capsys.readouterr().out


def test_the_gpu_kind_sets_memory_and_peak(capsys):
    main([*PUBLISHED_OVERRIDES[:-1], "--gpus", "104", "--gpu", "h200"])  # precision auto: bf16 on H200
    out = capsys.readouterr().out
    assert "of 141 GiB: fits" in out and "peak 989 TFLOP/s (h200 datasheet, dense bf16)" in out
    main([*PUBLISHED_OVERRIDES[:-1], "--gpus", "8", "--gpu", "v100-32gb"])  # auto: fp16 on a V100
    assert "(v100-32gb datasheet, dense fp16)" in capsys.readouterr().out
    a100 = make_plan(STAGE1, PUBLISHED, Hardware(gpu="a100-80gb"))
    h100 = make_plan(STAGE1, PUBLISHED, Hardware(gpu="h100"))
    assert h100.step.compute_s == pytest.approx(a100.step.compute_s * 312 / 989)
    with pytest.raises(PlanError, match="v100-32gb has no bf16"):
        make_plan(STAGE1, Layout(gpus=8), Hardware(gpu="v100-32gb", gpu_mem_gib=32))
    assert all(set(kind.peak_tflops) <= {"bf16", "fp16", "fp32"} for kind in GPU_KINDS.values())


def test_a_smaller_card_without_its_kind_is_flagged(capsys):
    with pytest.raises(SystemExit):  # 24 GiB: the published layout does not fit
        main(
            [
                "model.preset=cogvideo-stage1",
                "--gpus",
                "104",
                "--gpu-mem",
                "24",
                "training.micro_batch_size=4",
            ]
        )
    err = capsys.readouterr().err
    assert "timing a 24 GiB card at a100-80gb peak" in err and "--gpu" in err
    main(["model.preset=small", "--gpus", "1", "--gpus-per-node", "1", "--gpu", "rtx4090"])
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


def test_a_family_without_a_planner_model_is_refused_in_one_line(capsys):
    from test_model_family import FAMILY  # the masked-token family registers no planner model

    assert FAMILY.planner is None
    with pytest.raises(SystemExit) as exit_:
        main(["model.family=masked-video", "model.preset=masked-toy", "--gpus", "8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "model.family: masked-video registers no planner model" in err


def test_a_second_family_is_planned_from_what_it_registers(monkeypatch):
    """The masked-token family with a planner model: parameters from its own model and TP plan,
    compute from its FLOPs, activations and TP traffic from its planner model."""
    import dataclasses

    from test_model_family import FAMILY, MaskedVideoConfig

    from cluster.plan_memory import rank_params
    from cogvideo.family import PlannerModel, plain_model
    from cogvideo.family_spec import REGISTRY

    @dataclasses.dataclass
    class PlannedToyConfig(MaskedVideoConfig):
        name: str = "planned-toy"

    def layer_bytes(cfg, batch, tp, dtype):
        return batch * cfg.seq_length * cfg.hidden_size * 10.0 / tp

    planner = PlannerModel(
        describe=lambda cfg: f"{cfg.name}: {cfg.num_layers} blocks",
        activation_bytes=lambda cfg, b, tp, dtype, ckpt: cfg.num_layers * layer_bytes(cfg, b, tp, dtype),
        layer_activation_bytes=layer_bytes,
        logits_bytes=lambda cfg, b, tp, dtype: 0.0,
        recompute_flops=lambda cfg: 0.0,
        tp_allreduces=lambda cfg, ckpt: (2 * cfg.num_layers, cfg.seq_length * cfg.hidden_size),
    )
    family = dataclasses.replace(
        FAMILY, name="planned-toy", config=PlannedToyConfig, presets={"planned-toy": PlannedToyConfig}
    )
    monkeypatch.setitem(REGISTRY, family.name, dataclasses.replace(family, planner=planner))
    cfg = PlannedToyConfig(num_layers=3)
    model = plain_model(cfg)  # the meta model: shapes alone
    for tp in (1, 2):
        shard = FAMILY.tp_plan.shard_state_dict(model.state_dict(), rank=0, size=tp)
        assert rank_params(cfg, tp).total == sum(t.numel() for t in shard.values())
    layout = Layout(gpus=4, gpus_per_node=4, tp=2, micro_batch=3, dtype="bf16")
    plan = make_plan(cfg, layout)
    assert plan.step.model_flops_per_gpu == pytest.approx(3 * FAMILY.train_flops(cfg) / 2)
    assert plan.memory.activations == 3 * layer_bytes(cfg, 3, 2, "bf16")
    assert plan.step.tp_comm_s > 0 and report(plan).startswith("planned-toy: 3 blocks")
