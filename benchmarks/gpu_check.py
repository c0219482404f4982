"""One-GPU check: do the CUDA paths run and agree, how fast is a step of the published shape,
and does the planner's memory prediction hold? Prints one JSON summary (the last line).

    python benchmarks/gpu_check.py              # one H100/H200 (80 GB+), under 8 minutes, no network
    python benchmarks/gpu_check.py --dry-run    # the same sections on the CPU at toy shapes (tested in CI)

Sections:
1. checks: blocked vs dense attention (stage 1 and 2, CogVideo's 20x20 layout with 10x10 windows
   shifted by 5, narrow model), KV-cached vs uncached greedy decoding (same tokens), and a
   bf16 and an fp16 training step (loss and gradients) against fp32 within the tolerances below;
2. train: the published stage-1 shape (hidden 3072, 48 heads, 64 + 5 x 400 tokens) with as many
   of the 48 layers as the planner says fit, DeepSpeed ZeRO-2 with CPU offload, fp16 with the
   published loss scaling, micro-batch 4, activation checkpointing: tokens/s, MFU against a
   bf16 matmul timed here (and the datasheet peak when the GPU is in the planner's table), peak
   memory against the planner's prediction;
3. sample: stage-1 decoding at 20 x 20 tokens per frame with the KV cache (tokens/s, memory) and
   without (tokens/s from timed full forwards: one per sampled token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_sampling import GREEDY, sample_uncached  # noqa: E402

from cluster.plan import GPU_KINDS  # noqa: E402
from cluster.plan_memory import GiB, Layout, plan_memory  # noqa: E402
from cogvideo import parallel  # noqa: E402
from cogvideo.family import build_model  # noqa: E402
from cogvideo.models.cogvideo.config import get_preset  # noqa: E402
from cogvideo.models.cogvideo.decode import DecodePass, sample_frames, sample_frames_uncached  # noqa: E402
from cogvideo.models.cogvideo.flops import train_flops  # noqa: E402
from cogvideo.models.cogvideo.hierarchy import row_generator  # noqa: E402
from cogvideo.models.cogvideo.sequence import build_sequence  # noqa: E402
from cogvideo.models.cogvideo.stage_model import StageModel  # noqa: E402
from pretrain.launch import free_port  # noqa: E402

# low-precision step vs fp32, in units of the format's unit roundoff u (bf16 2^-8, fp16 2^-11):
# |loss - loss32| <= 4u |loss32|, ||grad - grad32|| <= 16u ||grad32|| (over all gradients)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOSS_ULPS, GRAD_ULPS = 4, 16
BLOCKED_DENSE_ULPS = 32  # max |logit difference| / max |logit|, blocked vs dense, same dtype


class Setup:
    """Shapes and device of one run: the real ones on a GPU, toy ones for --dry-run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        side = 4 if dry_run else 20
        self.check_side, self.check_window = side, side // 2
        self.train_cfg = get_preset("cogvideo-stage1").replace(activation_checkpointing=True)
        if dry_run:
            self.train_cfg = get_preset("small").replace(
                num_layers=2, train_backbone=False, activation_checkpointing=True
            )
        self.train_dtype = "bf16" if dry_run else "fp16"  # fp16 needs a GPU (DeepSpeed's CPU side has none)
        self.micro_batch = 4
        self.steps = 2 if dry_run else 4  # the first is not timed

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def memory(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        }

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def timed(setup: Setup, fn):
    setup.sync()
    start = time.perf_counter()
    out = fn()
    setup.sync()
    return out, time.perf_counter() - start


def narrow_config(setup: Setup, stage: str, layers: int = 2):
    side = setup.check_side
    return (
        get_preset("small")
        .replace(
            name=f"check-{stage}",
            stage=stage,
            num_layers=layers,
            frame_tokens=side,
            frame_size=8 * side,
            max_position_embeddings=16 + side * side,
            window_size=setup.check_window,
            window_shift=setup.check_window // 2,
            train_backbone=True,
        )
        .validate()
    )


def sample_batch(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    rows = []
    for i in range(batch):
        text = torch.randint(
            v.text_offset, v.text_offset + v.num_text_tokens, (3 + i % cfg.text_length,), generator=g
        )
        frames = torch.randint(
            0, v.num_image_tokens, (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens), generator=g
        )
        rows.append(build_sequence(cfg, text, frames))
    return [torch.stack(x) for x in zip(*rows)]


def frame_one_job(cfg, batch: int, device) -> DecodePass:
    """Decode frame 1 of `batch` random samples (sample_batch) given their text and frame 0."""
    text, frames, _ = sample_batch(cfg, batch)
    n, T = cfg.tokens_per_frame, cfg.text_length
    return DecodePass(
        text=text[:, :T].to(device),
        given={0: frames[:, T + 1 : T + 1 + n].to(device)},
        targets=(1,),
    )


# ---- 1. checks ----------------------------------------------------------------------------------
def blocked_vs_dense(setup: Setup) -> dict:
    out = {}
    for stage in ("stage1", "stage2"):
        cfg = narrow_config(setup, stage)
        torch.manual_seed(0)
        model = build_model(cfg, setup.device).eval()
        tokens = sample_batch(cfg, 2)[0].to(setup.device)
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            with torch.no_grad():
                blocked = model(tokens, text_bias=1.4).float()
                model.dense_attention = True
                dense = model(tokens, text_bias=1.4).float()
                model.dense_attention = False
            u = UNIT_ROUNDOFF.get(dtype, 2.0**-24)
            err = ((blocked - dense).abs().max() / dense.abs().max()).item()
            out[f"{stage}_{str(dtype)[6:]}"] = {
                "rel_err": err,
                "tol": BLOCKED_DENSE_ULPS * u,
                "ok": err <= BLOCKED_DENSE_ULPS * u,
            }
    return out


def cached_vs_uncached(setup: Setup) -> dict:
    cfg = narrow_config(setup, "stage1", layers=1)
    torch.manual_seed(0)
    stage = StageModel(build_model(cfg, setup.device).eval(), cfg)
    job = frame_one_job(cfg, 2, setup.device)
    gens = lambda: [row_generator(0, str(i), "check") for i in range(2)]  # noqa: E731
    cached = sample_frames(stage, job, GREEDY, gens())
    uncached = sample_frames_uncached(stage, job, GREEDY, gens())
    same = all(torch.equal(cached[f], uncached[f]) for f in job.targets)
    return {"tokens": 2 * cfg.tokens_per_frame, "same_tokens": same, "ok": same}


def low_precision_step(setup: Setup) -> dict:
    cfg = narrow_config(setup, "stage2")
    torch.manual_seed(0)
    model = build_model(cfg, setup.device).train()
    tokens, targets, mask = (x.to(setup.device) for x in sample_batch(cfg, 2))

    def step(dtype):
        model.to(dtype).zero_grad(set_to_none=True)
        loss = model.loss(model(tokens), targets, mask)
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss32, grad32 = step(torch.float32)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        model.load_state_dict(state)
        loss, grad = step(dtype)
        u = UNIT_ROUNDOFF[dtype]
        loss_err = abs(loss - loss32) / abs(loss32)
        grad_err = ((grad - grad32).norm() / grad32.norm()).item()
        out[str(dtype)[6:]] = {
            "loss_rel_err": loss_err,
            "loss_tol": LOSS_ULPS * u,
            "grad_rel_err": grad_err,
            "grad_tol": GRAD_ULPS * u,
            "ok": loss_err <= LOSS_ULPS * u and grad_err <= GRAD_ULPS * u,
        }
    return out


# ---- 2. train ------------------------------------------------------------------------------------
def matmul_tflops(setup: Setup, dtype=torch.bfloat16) -> float:
    size = 256 if setup.dry_run else 8192
    a = torch.randn(size, size, device=setup.device, dtype=dtype)
    b = torch.randn(size, size, device=setup.device, dtype=dtype)
    a @ b
    repeats = 3 if setup.dry_run else 20
    _, seconds = timed(setup, lambda: [a @ b for _ in range(repeats)])
    return 2 * size**3 * repeats / seconds / 1e12


def train_layout(setup: Setup, layers: int) -> Layout:
    return Layout(
        gpus=1,
        gpus_per_node=1,
        tp=1,
        zero=2,
        offload=True,
        micro_batch=setup.micro_batch,
        act_ckpt=True,
        dtype=setup.train_dtype,
    )


def layers_that_fit(setup: Setup) -> int:
    """Most layers (<= the preset's) whose planned peak leaves 10% of the GPU free."""
    if setup.dry_run:
        return setup.train_cfg.num_layers
    capacity = torch.cuda.get_device_properties(0).total_memory
    for layers in range(setup.train_cfg.num_layers, 0, -1):
        cfg = setup.train_cfg.replace(num_layers=layers)
        if plan_memory(cfg, train_layout(setup, layers)).peak <= 0.9 * capacity:
            return layers
    raise SystemExit("gpu_check: not even one layer of the published shape fits this GPU")


def deepspeed_engine(setup: Setup, model):
    import deepspeed

    from pretrain.config import TrainConfig
    from pretrain.optim import deepspeed_config, lr_scheduler, param_groups

    train = TrainConfig()
    train.parallel.zero_stage, train.parallel.offload_optimizer = 2, True
    train.parallel.precision = setup.train_dtype
    train.training.micro_batch_size, train.optim.grad_clip = setup.micro_batch, 0.1
    config = deepspeed_config(train, dp_size=1)

    def initialize():
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, 1e-4),
            config=config,
            mpu=parallel.mpu(),
            lr_scheduler=lr_scheduler(train),
        )
        return engine

    try:
        return initialize(), "DeepSpeedCPUAdam" if config["zero_force_ds_cpu_optimizer"] else "torch AdamW"
    except Exception as err:  # the CPU Adam op is JIT-built: no compiler on the box -> torch's AdamW
        print(
            f"gpu_check: DeepSpeed CPU Adam unavailable ({type(err).__name__}: {err}); using torch AdamW",
            file=sys.stderr,
        )
        config["zero_force_ds_cpu_optimizer"] = False
        config["optimizer"]["params"]["torch_adam"] = True
        return initialize(), "torch AdamW (on the CPU)"


def train_step(setup: Setup, peak_tflops: float) -> dict:
    layers = layers_that_fit(setup)
    cfg = setup.train_cfg.replace(num_layers=layers)
    setup.reset_memory()
    parallel.manual_seed(0)
    model = build_model(cfg, setup.device)  # with activation checkpointing on its layers
    engine, optimizer = deepspeed_engine(setup, model)
    tokens, targets, mask = (x.to(setup.device) for x in sample_batch(cfg, setup.micro_batch))
    times, skipped = [], 0
    for step in range(setup.steps):
        if step == 1:
            setup.reset_memory()

        def run():
            loss = engine.module.loss(engine(tokens), targets, mask)
            engine.backward(loss)
            engine.step()

        times.append(timed(setup, run)[1])
        skipped += not engine.was_step_applied()
    seconds = min(times[1:])
    flops = train_flops(cfg, setup.micro_batch)
    planned = plan_memory(cfg, train_layout(setup, layers), context_bytes=0)
    result = {
        "layers": layers,
        "of_layers": setup.train_cfg.num_layers,
        "micro_batch": setup.micro_batch,
        "dtype": setup.train_dtype,
        "optimizer": optimizer,
        "step_s": seconds,
        "steps_timed": len(times) - 1,
        "skipped_steps": skipped,
        "tokens_per_s": setup.micro_batch * cfg.seq_length / seconds,
        "model_tflops_per_step": flops / 1e12,
        "mfu_vs_measured_matmul": flops / seconds / (peak_tflops * 1e12),
        "planned_peak_gib": planned.peak / GiB,
        **setup.memory(),
    }
    kind = gpu_kind()
    if kind:
        result["mfu_vs_datasheet"] = flops / seconds / GPU_KINDS[kind].peak_tflops[setup.train_dtype] / 1e12
    if "max_allocated_gib" in result:
        result["measured_over_planned"] = result["max_allocated_gib"] / result["planned_peak_gib"]
    return result


def gpu_kind() -> str | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    for kind in ("h200", "h100", "a100"):
        if kind in name:
            return "a100-80gb" if kind == "a100" else kind
    return None


# ---- 3. sample -----------------------------------------------------------------------------------
def sampling(setup: Setup) -> dict:
    cfg = setup.train_cfg.replace(activation_checkpointing=False)
    if setup.dry_run:
        cfg = narrow_config(setup, "stage1")
    setup.reset_memory()
    torch.manual_seed(0)
    model = build_model(cfg, setup.device).eval().to(torch.bfloat16)
    stage = StageModel(model, cfg)
    job = frame_one_job(cfg, 1, setup.device)
    n = cfg.tokens_per_frame
    gens = lambda: [row_generator(0, "0", "sample")]  # noqa: E731
    cached, cached_s = timed(setup, lambda: sample_frames(stage, job, GREEDY, gens()))
    cached_memory = setup.memory()
    uncached, uncached_s = timed(setup, lambda: sample_uncached(stage, job, GREEDY, gens()))
    result = {
        "layers": cfg.num_layers,
        "frame_tokens": f"{cfg.frame_tokens}x{cfg.frame_tokens}",
        "dtype": "bf16",
        "tokens": n,
        "cached_tokens_per_s": n / cached_s,
        "uncached_tokens_per_s": n / uncached_s,  # measured: one forward per token over the growing prefix
        "kv_cache_speedup": uncached_s / cached_s,
        "same_tokens": all(torch.equal(cached[f], uncached[f]) for f in job.targets),
        **cached_memory,
    }
    return result


# ---- driver --------------------------------------------------------------------------------------
def init_single_process(setup: Setup) -> None:
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
    )
    parallel.init_distributed(1)


def run(setup: Setup) -> dict:
    start = time.perf_counter()
    summary = {
        "dry_run": setup.dry_run,
        "device": torch.cuda.get_device_name(0) if not setup.dry_run else "cpu",
        "torch": torch.__version__,
    }
    summary["checks"] = {
        "blocked_vs_dense": blocked_vs_dense(setup),
        "kv_cache": cached_vs_uncached(setup),
        "low_precision_step": low_precision_step(setup),
    }
    init_single_process(setup)
    peak = matmul_tflops(setup)
    summary["bf16_matmul_tflops"] = peak
    summary["train"] = train_step(setup, peak)
    summary["sample"] = sampling(setup)
    checks = summary["checks"]
    summary["ok"] = (
        all(c["ok"] for c in checks["blocked_vs_dense"].values())
        and checks["kv_cache"]["ok"]
        and all(c["ok"] for c in checks["low_precision_step"].values())
    )
    summary["seconds"] = time.perf_counter() - start
    parallel.destroy()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy shapes: every section runs, fast")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run on a CPU")
    summary = run(Setup(args.dry_run))
    text = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
