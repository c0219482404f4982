"""DeepSpeed ZeRO-0/1/2/3 checkpoints written by real engines (two gloo ranks) -> our format:
equal to the engines' live fp32 weights and Adam moments, with bounded peak memory; and resume
on a changed layout (TP=2 x DP=1 <-> TP=1 x DP=2, ZeRO-0 <-> ZeRO-2) with the same losses as the
original run. ZeRO-0 engines step the trainer's optimizer (pretrain.optim.GuardedAdamW)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import run_ok, torchrun_self
from tolerances import adam_weight_atol, loss_rel_tol

from cogvideo.checkpoint import (
    CheckpointError,
    convert_zero,
    load_model_state,
    load_optimizer_state,
    save_model_checkpoint,
)
from cogvideo.checkpoint.cli import describe, main
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset

REPO = Path(__file__).resolve().parents[1]
# big enough that holding the model would dwarf the streaming bound (~9.5M params, 38 MB fp32)
MEDIUM = get_preset("tiny").replace(
    name="medium", hidden_size=384, num_layers=4, num_heads=4, train_backbone=True
)
FROZEN = "position_embeddings.weight"  # frozen by the worker: frozen parameters take another path
TINY = get_preset("tiny")
VARIANTS = ("0", "0bf16", "1", "2", "3")  # ZeRO stage, and ZeRO-0 training a bf16 model (fp32 masters)


def torchrun(mode: str, out: Path) -> None:
    torchrun_self(__file__, [mode, str(out)], timeout=400, DS_ACCELERATOR="cpu")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    torchrun("zero", out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", VARIANTS)
def test_consolidation_equals_live_weights_and_moments(zero_runs, tmp_path, stage):
    live = torch.load(zero_runs / f"live{stage}.pt")
    ours = convert_zero(zero_runs / f"zero{stage}", tmp_path / "ours", MEDIUM, max_shard_bytes=1 << 20)
    weights = load_model_state(ours)
    assert set(weights) == set(live["weights"])
    for name, tensor in live["weights"].items():
        assert torch.equal(weights[name], tensor), name
    optim = load_optimizer_state(ours)
    assert optim["state"]["step"] == 2 and set(optim["exp_avg"]) == set(live["exp_avg"])
    assert FROZEN not in optim["exp_avg"] and FROZEN in weights
    for key in ("exp_avg", "exp_avg_sq"):
        for name, tensor in live[key].items():
            assert torch.equal(optim[key][name], tensor), (key, name)
    # any TP degree from the consolidated checkpoint
    half = load_model_state(ours, 1, 2)
    assert torch.equal(
        half["layers.0.mlp.dense_h_to_4h.weight"], live["weights"]["layers.0.mlp.dense_h_to_4h.weight"][768:]
    )


MEMORY_PROBE = """
import json, sys
from cogvideo.checkpoint.zero import convert_zero
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.configio import from_dict

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

cfg, root, out, shard = from_dict(ModelConfig, json.loads(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4])
convert_zero(f"{root}/zero3", f"{out}/warmup", cfg, max_shard_bytes=shard)  # pages in the code paths once
increase = {}
for stage in sys.argv[5:]:
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    convert_zero(f"{root}/zero{stage}", f"{out}/zero{stage}", cfg, max_shard_bytes=shard)
    increase[stage] = status("VmHWM") - before
print(json.dumps(increase))
"""


@pytest.mark.slow
def test_consolidation_peak_memory_is_bounded(zero_runs, tmp_path):
    """Peak RSS growth while converting weights and Adam moments stays within a few output
    shards plus the largest tensor, far below one rank's optimizer file or the fp32 model."""
    from cogvideo.configio import to_dict

    shard, stages = 2 << 20, ("0", "2", "3")
    cmd = [
        sys.executable,
        "-c",
        MEMORY_PROBE,
        json.dumps(to_dict(MEDIUM)),
        str(zero_runs),
        str(tmp_path),
        str(shard),
        *stages,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    run = run_ok(cmd, env, timeout=300)
    increase = json.loads(run.stdout.strip().splitlines()[-1])
    model_bytes = 4 * sum(t.numel() for t in load_model_state(tmp_path / "zero3").values())
    rank_file = min(f.stat().st_size for f in zero_runs.rglob("*optim_states.pt"))
    largest_tensor = 4 * MEDIUM.ffn_size * MEDIUM.hidden_size
    # input pages touched for one chunk, the pending output shard, its serialised copy, a spare
    # shard of allocator slack, the largest tensor twice (gathered and split), 8 MiB of noise
    bound = 4 * shard + 2 * largest_tensor + (8 << 20)
    for stage in stages:
        print(
            f"ZeRO-{stage}: peak +{increase[stage] / 2**20:.1f} MiB; model {model_bytes / 2**20:.1f} MiB fp32, "
            f"rank file {rank_file / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
        )
        assert increase[stage] < bound < min(rank_file, model_bytes) / 1.5


LAYOUT_LR = 1e-2  # the workers' AdamW learning rate (_engine)


def assert_resumed_like_the_original(out: Path, results: dict, original: str, resumed: str) -> None:
    """Steps 3 and 4 of the resumed run against the original run's: losses within rounding
    (tests/tolerances.py), and the weights after step 4 within the Adam bound: a run that
    resumed without the moments, step count or weights moves elements by whole steps (~lr)."""
    assert results[resumed] == pytest.approx(results[original][2:], rel=loss_rel_tol(TINY.num_layers))
    ours, theirs = (torch.load(out / f"weights_{name}.pt", weights_only=True) for name in (resumed, original))
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=adam_weight_atol(LAYOUT_LR), msg=name)


@pytest.mark.slow
def test_resume_on_changed_layout_gives_the_original_losses_and_weights(tmp_path):
    """ZeRO-2 at TP=2 x DP=1 -> our format -> ZeRO-2 (and ZeRO-3, ZeRO-0) at TP=1 x DP=2, and
    back; ZeRO-0 at TP=2 -> ZeRO-2 at DP=2; the same comparison fails for a resume that drops
    Adam's moments (the planted bug)."""
    torch.manual_seed(0)
    save_model_checkpoint(tmp_path / "w0", build_model(TINY).state_dict(), TINY)
    torchrun("layout", tmp_path)
    r = json.loads((tmp_path / "results.json").read_text())
    for original, resumed in (
        ("tp2", "tp1_from_tp2"),
        ("tp1", "tp2_from_tp1"),
        ("tp2", "tp1_zero3_from_tp2"),
        ("tp2", "tp1_zero0_from_tp2"),
        ("tp2_zero0", "tp1_from_tp2_zero0"),
    ):
        assert_resumed_like_the_original(tmp_path, r, original, resumed)
    for original, resumed in (  # planted: the moments dropped on resume
        ("tp2", "tp1_from_tp2_no_optimizer"),
        ("tp2_zero0", "tp1_zero0_from_tp2_zero0_no_optimizer"),
    ):
        with pytest.raises(AssertionError):
            assert_resumed_like_the_original(tmp_path, r, original, resumed)
    report = describe(tmp_path / "ds_tp2")
    assert (report["format"], report["tensor_parallel"], report["data_parallel"], report["iteration"]) == (
        "DeepSpeed ZeRO-2",
        2,
        1,
        2,
    )


def test_bad_zero_checkpoints_fail_clearly(zero_runs, tmp_path):
    src = zero_runs / "zero2"
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(src), str(broken)], check=True)
    tag = broken / (broken / "latest").read_text().strip()
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing rank files for \(tp, dp\) ranks \[\(0, 1\)\]"):
        convert_zero(broken, tmp_path / "out", MEDIUM)
    report = describe(broken)
    assert report["complete"] is False and "missing rank files" in report["problem"]
    subprocess.run(
        ["cp", str(src / tag.name / "zero_pp_rank_1_mp_rank_00_optim_states.pt"), str(tag)], check=True
    )
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: cannot be read"):
        convert_zero(broken, tmp_path / "out", MEDIUM)
    with pytest.raises(
        CheckpointError, match=r"does not fit model 'tiny'.*missing keys \(42\): layers\.4\.temporal_gate"
    ):
        convert_zero(src, tmp_path / "out", TINY.replace(num_layers=6))
    with pytest.raises(CheckpointError, match="train_config.yaml: missing"):
        convert_zero(src, tmp_path / "out")
    unnamed = tmp_path / "unnamed"  # ZeRO-0 written around a torch optimizer that names nothing
    subprocess.run(["cp", "-r", str(zero_runs / "zero0"), str(unnamed)], check=True)
    states = next(unnamed.rglob("mp_rank_00_model_states.pt"))
    data = torch.load(states, weights_only=True)
    for group in data["optimizer"]["param_groups"]:
        del group["param_names"]
    torch.save(data, states)
    with pytest.raises(CheckpointError, match="optimizer state does not name its parameters"):
        convert_zero(unnamed, tmp_path / "out", MEDIUM)
    assert main(["zero", str(src), str(tmp_path / "out"), "--set", "preset=tiny"]) == 2
    assert not (tmp_path / "out").exists()
    assert (
        main(
            [
                "zero",
                str(src),
                str(tmp_path / "out"),
                "--set",
                "preset=tiny",
                "--set",
                "hidden_size=384",
                "--set",
                "num_layers=4",
                "--set",
                "name=medium",
                "--no-optimizer",
                "--tp",
                "2",
            ]
        )
        == 0
    )
    assert (
        not (tmp_path / "out" / "optimizer").exists() and describe(tmp_path / "out")["tensor_parallel"] == 2
    )


# ---- torchrun workers ----------------------------------------------------------------------


def _engine(model, zero_stage: int, dp: int, decay_groups: bool = False, bf16: bool = False):
    """A DeepSpeed engine over `model` (fp32; at ZeRO-0 with `bf16` the model cast to bf16 and
    the optimizer stepping fp32 masters, as the trainer does)."""
    import deepspeed

    from cogvideo import parallel
    from pretrain.optim import GuardedAdamW

    adamw = {"lr": LAYOUT_LR, "weight_decay": 0.01}
    config = {
        "train_micro_batch_size_per_gpu": 2 // dp,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {**adamw, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": trainable}]
    if decay_groups:  # two param groups, as the trainer's decay / no-decay split
        groups = [
            {"params": [(n, p) for n, p in trainable if p.dim() > 1]},
            {"params": [(n, p) for n, p in trainable if p.dim() <= 1], "weight_decay": 0.0},
        ]
    if zero_stage == 0:  # DeepSpeed steps the optimizer it is given: the trainer's, naming its params
        del config["optimizer"]
        optimizer = GuardedAdamW(groups, clip=0.0, tp_group=parallel.tp_group(), master_weights=bf16, **adamw)
        model.to(torch.bfloat16 if bf16 else torch.float32)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=parallel.mpu())[0]
    unnamed = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
    return deepspeed.initialize(model=model, model_parameters=unnamed, config=config, mpu=parallel.mpu())[0]


def _fp32(engine, name: str, param, key: str | None = None) -> torch.Tensor:
    """A parameter's full fp32 master weight (or Adam state `key`) as `engine` holds it: the
    optimizer's own parameter (the model's, or its fp32 master) at ZeRO-0, DeepSpeed's fragments above."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        optimizer = engine.optimizer
        names = [n for group in optimizer.param_groups for n in group["param_names"]]
        master = optimizer.masters[names.index(name)]
        return (master.detach() if key is None else optimizer.state[master][key]).clone()
    return (
        safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    ).clone()


def _train_step(engine, cfg, step: int) -> float:
    """One step on global batch `step` (2 samples; DP rank r takes its share); the global loss."""
    import torch.distributed as dist

    from cogvideo import parallel

    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(
        0, cfg.vocab.num_image_tokens, (2, cfg.text_length + 2 * cfg.tokens_per_frame), generator=g
    )
    per_rank = 2 // parallel.dp_size()
    mine = slice(parallel.dp_rank() * per_rank, (parallel.dp_rank() + 1) * per_rank)
    logits = engine(tokens[mine])
    loss = engine.module.loss(logits[:, :-1], tokens[mine, 1:], torch.ones_like(tokens[mine, 1:]))
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total, group=parallel.dp_group())
    return total.item() / parallel.dp_size()


def _zero_worker(out: Path) -> None:
    import torch.distributed as dist

    from cogvideo import parallel

    parallel.init_distributed(1, backend="gloo")
    for variant in VARIANTS:
        stage, bf16 = int(variant[0]), variant.endswith("bf16")
        torch.manual_seed(0)
        model = build_model(MEDIUM)
        getattr(model, FROZEN.split(".")[0]).weight.requires_grad_(False)
        dtype = (
            torch.bfloat16 if bf16 else torch.float32
        )  # ZeRO-3 partitions the frozen ones too: read them first
        frozen = {n: p.detach().to(dtype).float() for n, p in model.named_parameters() if not p.requires_grad}
        engine = _engine(model, stage, dp=2, bf16=bf16)
        for step in range(2):
            _train_step(engine, MEDIUM, step)
        engine.save_checkpoint(str(out / f"zero{variant}"), tag="global_step2")
        live = {"weights": dict(frozen), "exp_avg": {}, "exp_avg_sq": {}}
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                live["weights"][name] = _fp32(engine, name, param)
                for key in ("exp_avg", "exp_avg_sq"):
                    live[key][name] = _fp32(engine, name, param, key)
        if dist.get_rank() == 0:
            torch.save(live, out / f"live{variant}.pt")
        dist.barrier()
    parallel.destroy()


def _layout_worker(out: Path) -> None:
    """TP=2 x DP=1 and TP=1 x DP=2 in turn on the same two ranks: train, checkpoint, convert,
    resume in the other layout; losses go to results.json."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state

    from cogvideo import parallel
    from cogvideo.checkpoint import convert_zero, restore_optimizer_state
    from cogvideo.models.cogvideo.model import TP_PLAN

    results = {}

    def layout(tp: int) -> None:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel.init_distributed(tp, backend="gloo")

    def engine_from(path: Path, optimizer: bool, zero_stage: int = 2):
        model = build_model(TINY)
        model.load_state_dict(load_model_state(path, parallel.tp_rank(), parallel.tp_size()))
        engine = _engine(model, zero_stage, parallel.dp_size(), decay_groups=True)
        if optimizer:
            restore_optimizer_state(engine, path, parallel.tp_rank(), parallel.tp_size())
        return engine

    def save_weights(engine, name: str) -> None:
        """The full fp32 weights (ZeRO's master, merged over TP) to weights_NAME.pt."""
        local = {n: _fp32(engine, n, p) for n, p in engine.module.named_parameters() if p.requires_grad}
        frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen]):  # ZeRO-3 partitions them too
            local.update({n: p.detach().clone() for n, p in frozen})
        parts = [None] * parallel.tp_size()
        dist.all_gather_object(parts, local, group=parallel.tp_group())
        if dist.get_rank() == 0:
            torch.save(TP_PLAN.merge_state_dicts(parts), out / f"weights_{name}.pt")

    def train_and_save(name: str, zero_stage: int = 2) -> None:
        engine = engine_from(out / "w0", optimizer=False, zero_stage=zero_stage)
        results[name] = [_train_step(engine, TINY, 0), _train_step(engine, TINY, 1)]
        engine.save_checkpoint(str(out / f"ds_{name}"), tag="step2")
        results[name] += [_train_step(engine, TINY, 2), _train_step(engine, TINY, 3)]
        save_weights(engine, name)
        dist.barrier()
        if dist.get_rank() == 0:
            convert_zero(out / f"ds_{name}", out / f"ours_{name}", TINY)
        dist.barrier()

    def resume(name: str, source: str, optimizer: bool = True, zero_stage: int = 2) -> None:
        engine = engine_from(out / f"ours_{source}", optimizer, zero_stage)
        results[name] = [_train_step(engine, TINY, 2), _train_step(engine, TINY, 3)]
        save_weights(engine, name)

    layout(2)
    train_and_save("tp2")
    train_and_save("tp2_zero0", zero_stage=0)
    layout(1)
    resume("tp1_from_tp2", "tp2")
    resume("tp1_from_tp2_no_optimizer", "tp2", optimizer=False)
    resume("tp1_zero3_from_tp2", "tp2", zero_stage=3)
    resume("tp1_zero0_from_tp2", "tp2", zero_stage=0)
    resume("tp1_from_tp2_zero0", "tp2_zero0")
    resume("tp1_zero0_from_tp2_zero0_no_optimizer", "tp2_zero0", optimizer=False, zero_stage=0)
    train_and_save("tp1")
    layout(2)
    resume("tp2_from_tp1", "tp1")
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    parallel.destroy()


if __name__ == "__main__":
    {"zero": _zero_worker, "layout": _layout_worker}[sys.argv[1]](Path(sys.argv[2]))
