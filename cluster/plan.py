"""`cogvideo-plan`: will a training layout fit in GPU memory, and how fast will it go?

    cogvideo-plan --config configs/cogvideo_stage1.yaml --gpus 104   # the layout a training YAML sets
    cogvideo-plan --config configs/cogvideo_stage1.yaml --gpus 104 training.micro_batch_size=4 --gpu h100
    cogvideo-plan --preset cogvideo-stage1 --gpus 104 --zero 2 --offload --micro-batch 4 \\
        --act-ckpt --dtype fp16          # the published CogVideo run: 13 nodes x 8 A100-80GB
    cogvideo-plan --preset cogvideo-stage1 --gpus 64 --search

Memory per GPU comes from cluster/plan_memory.py (DeepSpeed's model-state accounting + the
activations the model keeps); time from cogvideo/flops.py at the named GPU's datasheet peak
(`--gpu`, A100-80GB unless told) and an efficiency, plus data- and tensor-parallel communication
and the CPU optimizer step, taken as not overlapped with compute (an upper bound on step time).
Exit status: 0 when the layout fits, 1 when it does not (or --search finds none), 2 on bad input.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass

from cluster.plan_memory import DTYPE_BYTES, GiB, Layout, MemoryPlan, plan_memory
from cogvideo.config import ModelConfig
from cogvideo.configio import ConfigError, fields_help, parse_overrides
from cogvideo.family import resolve_model_section
from cogvideo.flops import recompute_flops, train_flops

SEARCH_MICRO_BATCHES = (1, 2, 4, 8, 16)


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class GpuKind:
    name: str
    mem_gib: float
    peak_tflops: dict  # dense, no sparsity: 16-bit tensor cores with fp32 accumulation, and plain fp32


# NVIDIA datasheets (SXM parts where there are several). fp32 is the non-tensor-core rate.
GPU_KINDS = {
    g.name: g
    for g in (
        GpuKind("a100-80gb", 80, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
        GpuKind("a100-40gb", 40, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
        GpuKind("h100", 80, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
        GpuKind("h200", 141, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
        GpuKind("v100-32gb", 32, {"fp16": 125.0, "fp32": 15.7}),
        GpuKind("a10", 24, {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
        GpuKind("l4", 24, {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
        GpuKind("rtx4090", 24, {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
        GpuKind("rtx3090", 24, {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    )
}
DEFAULT_GPU = "a100-80gb"  # the published run


@dataclass(frozen=True)
class Hardware:
    gpu_mem_gib: float = 80.0
    peak_tflops: float | None = None  # None: the GPU kind's datasheet peak for the dtype
    gpu: str = DEFAULT_GPU
    efficiency: float = 0.45  # sustained fraction of peak in large matmuls
    inter_node_gbps: float = 25.0  # per GPU, GB/s (one 200 Gb/s HDR InfiniBand port per GPU)
    intra_node_gbps: float = 150.0  # NVLink, GB/s achieved by NCCL
    pcie_gbps: float = 20.0  # GPU <-> host, offload traffic
    cpu_adam_params_per_s: float = 1e9  # DeepSpeed CPU Adam per node (all ranks of the node)
    context_gib: float = 2.0  # CUDA context, NCCL buffers, allocator slack

    def peak(self, dtype: str) -> float:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        table = GPU_KINDS[self.gpu].peak_tflops
        if dtype not in table:
            raise PlanError(
                f"--gpu {self.gpu} has no {dtype} tensor cores; choose another --dtype or --peak-tflops"
            )
        return table[dtype] * 1e12

    def peak_source(self, dtype: str) -> str:
        if self.peak_tflops:
            return "--peak-tflops"
        return f"{self.gpu} datasheet, dense {dtype}"


@dataclass(frozen=True)
class StepEstimate:
    compute_s: float
    dp_comm_s: float
    tp_comm_s: float
    offload_s: float
    model_flops_per_gpu: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.dp_comm_s + self.tp_comm_s + self.offload_s


@dataclass(frozen=True)
class Plan:
    cfg: ModelConfig
    layout: Layout
    hw: Hardware
    memory: MemoryPlan
    step: StepEstimate

    @property
    def capacity(self) -> float:
        return self.hw.gpu_mem_gib * GiB

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.capacity

    @property
    def global_batch(self) -> int:
        return self.layout.micro_batch * self.layout.dp

    @property
    def samples_per_s(self) -> float:
        return self.global_batch / self.step.step_s

    @property
    def mfu(self) -> float:
        return self.step.model_flops_per_gpu / (self.step.step_s * self.hw.peak(self.layout.dtype))


def check_layout(cfg: ModelConfig, layout: Layout) -> ModelConfig:
    """Clear errors for layouts that cannot run; returns cfg with the layout's checkpointing."""
    if layout.gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {layout.gpus}")
    if layout.gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node must be >= 1, got {layout.gpus_per_node}")
    if layout.tp < 1:
        raise PlanError(f"--tp must be >= 1, got {layout.tp}")
    if layout.tp > layout.gpus_per_node:
        raise PlanError(
            f"--tp {layout.tp} is more than the {layout.gpus_per_node} GPUs of a node: "
            "tensor parallelism needs NVLink, keep it inside one node"
        )
    try:
        cfg.validate(layout.tp)
    except ValueError as err:
        raise PlanError(f"--tp {layout.tp} does not fit preset {cfg.name!r}: {err}") from None
    if layout.gpus % layout.tp:
        raise PlanError(f"--gpus {layout.gpus} is not a multiple of --tp {layout.tp}")
    if layout.gpus > layout.gpus_per_node and layout.gpus % layout.gpus_per_node:
        raise PlanError(f"--gpus {layout.gpus} is not a whole number of {layout.gpus_per_node}-GPU nodes")
    if layout.zero not in (0, 1, 2, 3):
        raise PlanError(f"--zero must be 0, 1, 2 or 3, got {layout.zero}")
    if layout.offload and layout.zero == 0:
        raise PlanError("--offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads the partitioned optimizer)")
    if layout.micro_batch < 1:
        raise PlanError(f"--micro-batch must be >= 1, got {layout.micro_batch}")
    if layout.dtype not in DTYPE_BYTES:
        raise PlanError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {layout.dtype!r}")
    return cfg.replace(activation_checkpointing=layout.act_ckpt)


def _ring_s(nbytes: float, ranks: int, gbps: float) -> float:
    """One all-reduce (or reduce-scatter + all-gather) of `nbytes` over a ring of `ranks`."""
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9)


def estimate_step(cfg: ModelConfig, layout: Layout, memory: MemoryPlan, hw: Hardware) -> StepEstimate:
    b, tp, e = layout.micro_batch, layout.tp, DTYPE_BYTES[layout.dtype]
    model = train_flops(cfg, b) / tp
    compute = (model + recompute_flops(cfg, b) / tp) / (hw.peak(layout.dtype) * hw.efficiency)
    trainable = memory.params.trainable
    dp_link = hw.inter_node_gbps if layout.gpus > layout.gpus_per_node else hw.intra_node_gbps
    dp = _ring_s(trainable * e, layout.dp, dp_link)  # gradients out, updated weights back
    if layout.zero == 3:  # every weight, frozen ones too, is gathered for forward, backward, recompute
        gathers = 3 if layout.act_ckpt else 2
        dp = dp / 2 + gathers * _ring_s(memory.params.total * e, layout.dp, dp_link) / 2
    # row-parallel outputs (spatial, temporal, MLP) in forward and column inputs in backward,
    # again in the recomputed forward
    per_layer = (3 if cfg.has_temporal else 2) * (3 if layout.act_ckpt else 2)
    activation = b * cfg.seq_length * cfg.hidden_size * e
    tp_comm = (cfg.num_layers * per_layer + 2) * _ring_s(activation, tp, hw.intra_node_gbps)
    offload = 0.0
    if layout.offload:
        partition = trainable / (layout.dp if layout.zero else 1)
        per_node = min(layout.gpus, layout.gpus_per_node)
        offload = partition * per_node / hw.cpu_adam_params_per_s + partition * (4 + e) / (hw.pcie_gbps * 1e9)
    return StepEstimate(compute, dp, tp_comm, offload, model)


def make_plan(cfg: ModelConfig, layout: Layout, hw: Hardware = Hardware()) -> Plan:
    cfg = check_layout(cfg, layout)
    memory = plan_memory(cfg, layout, context_bytes=hw.context_gib * GiB)
    return Plan(cfg, layout, hw, memory, estimate_step(cfg, layout, memory, hw))


def search(
    cfg: ModelConfig, gpus: int, gpus_per_node: int, dtype: str, hw: Hardware = Hardware()
) -> list[Plan]:
    """Every (TP, ZeRO, offload, micro-batch, act ckpt) that fits, fastest first."""
    plans = []
    for tp, zero, offload, micro, ckpt in itertools.product(
        range(1, gpus_per_node + 1), range(4), (False, True), SEARCH_MICRO_BATCHES, (False, True)
    ):
        layout = Layout(gpus, gpus_per_node, tp, zero, offload, micro, ckpt, dtype)
        try:
            plan = make_plan(cfg, layout, hw)
        except PlanError:
            continue
        if plan.fits:
            plans.append(plan)
    # fastest first; among equals the one with more memory to spare
    return sorted(plans, key=lambda p: (-round(p.samples_per_s, 6), p.memory.peak))


# ---- report ----------------------------------------------------------------------------
def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f} GiB"


def report(plan: Plan) -> str:
    cfg, lay, mem, st, hw = plan.cfg, plan.layout, plan.memory.states, plan.step, plan.hw
    p = plan.memory.params
    zero3 = " (ZeRO-3 shard)" if lay.zero == 3 else ""
    lines = [
        f"{cfg.name} ({cfg.stage}): {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"sequence {cfg.seq_length} = {cfg.text_length} text + {cfg.num_frames} x {cfg.tokens_per_frame}",
        f"layout: {lay.describe()}",
        f"parameters on each TP rank: {p.total / 1e9:.3f}B ({p.trainable / 1e9:.3f}B trainable, "
        f"{p.frozen / 1e9:.3f}B frozen)",
        "",
        "per GPU",
        f"  weights, trainable{zero3:<17}{_gib(mem.weights_trainable)}",
        f"  weights, frozen{zero3:<20}{_gib(mem.weights_frozen)}",
    ]
    if lay.zero == 3:
        lines.append(f"  largest layer gathered             {_gib(mem.gathered_layer)}")
    lines += [
        f"  gradients (trainable only)         {_gib(mem.gradients)}"
        + ("   (offloaded)" if lay.offload else ""),
        f"  optimizer states (trainable only)  {_gib(mem.optimizer)}"
        + ("   (offloaded)" if lay.offload else ""),
        f"  activations                        {_gib(plan.memory.activations)}"
        f"   (micro-batch {lay.micro_batch}{', checkpointed' if lay.act_ckpt else ''})",
        f"  buffers + context                  {_gib(plan.memory.buffers)}",
        f"  peak                               {_gib(plan.memory.peak)}   of {hw.gpu_mem_gib:g} GiB: "
        + ("fits" if plan.fits else "DOES NOT FIT")
        + f" ({(plan.capacity - plan.memory.peak) / GiB:+.2f} GiB)",
    ]
    if lay.offload:
        node = mem.host * min(lay.gpus, lay.gpus_per_node)
        lines.append(
            f"  host memory per node               {_gib(node)}   offloaded gradients + optimizer states"
        )
    peak = hw.peak(lay.dtype)
    lines += [
        "",
        f"step (global batch {plan.global_batch}; peak {peak / 1e12:g} TFLOP/s ({hw.peak_source(lay.dtype)}) "
        f"x efficiency {hw.efficiency:g}; communication not overlapped)",
        f"  model FLOPs per GPU                {st.model_flops_per_gpu / 1e12:10.1f} TFLOP",
        f"  compute{' (incl. recompute)' if lay.act_ckpt else '':<28}{st.compute_s:10.3f} s",
        f"  data-parallel gradients + weights  {st.dp_comm_s:10.3f} s",
        f"  tensor-parallel all-reduces        {st.tp_comm_s:10.3f} s",
        f"  CPU optimizer (offload)            {st.offload_s:10.3f} s",
        f"  step                               {st.step_s:10.3f} s  -> {plan.samples_per_s:.1f} samples/s, "
        f"MFU {plan.mfu:.1%}",
    ]
    return "\n".join(lines)


def search_table(plans: list[Plan], limit: int) -> str:
    head = (
        f"{'TP':>3} {'ZeRO':>4} {'offload':>7} {'micro':>5} {'ckpt':>4} {'peak GiB':>9} {'step s':>7} "
        f"{'samples/s':>9} {'MFU':>6}"
    )
    rows = [head] + [
        f"{p.layout.tp:>3} {p.layout.zero:>4} {'yes' if p.layout.offload else 'no':>7} {p.layout.micro_batch:>5} "
        f"{'yes' if p.layout.act_ckpt else 'no':>4} {p.memory.peak / GiB:>9.2f} {p.step.step_s:>7.3f} "
        f"{p.samples_per_s:>9.1f} {p.mfu:>6.1%}"
        for p in plans[:limit]
    ]
    if len(plans) > limit:
        rows.append(f"... {len(plans) - limit} more (--limit)")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    from pretrain.config import TrainConfig

    ap = argparse.ArgumentParser(
        prog="cogvideo-plan",
        description=__doc__,
        epilog=fields_help(TrainConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", help="training YAML: model, parallel.*, micro-batch and precision from it"
    )
    source.add_argument(
        "--preset", help="model preset (cogvideo.config.PRESETS), layout from the flags below"
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="with --config: dotted training overrides (parallel.tensor_parallel=8); "
        "with --preset: ModelConfig fields (num_frames=9)",
    )
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument(
        "--gpu",
        choices=sorted(GPU_KINDS),
        default=None,
        help=f"GPU kind: its memory and datasheet peak FLOP/s (default {DEFAULT_GPU})",
    )
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: the --gpu kind's)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for --dtype (default: the --gpu kind's)"
    )
    ap.add_argument(
        "--efficiency", type=float, default=Hardware.efficiency, help="sustained fraction of peak"
    )
    layout = ap.add_argument_group("layout (with --preset; a --config file sets these itself)")
    for flag, kwargs in LAYOUT_FLAGS.items():
        layout.add_argument(flag, **kwargs)
    ap.add_argument("--search", action="store_true", help="list every layout that fits, fastest first")
    ap.add_argument("--limit", type=int, default=20, help="rows of --search output")
    return ap


# flag -> argparse options, and the training YAML key that sets the same thing
LAYOUT_FLAGS = {
    "--tp": dict(type=int, help="tensor-parallel degree, inside a node (default 1)"),
    "--zero": dict(type=int, help="DeepSpeed ZeRO stage 0-3 (default 2)"),
    "--offload": dict(action="store_true", default=None, help="optimizer states + gradients in host memory"),
    "--micro-batch": dict(type=int, help="sequences per GPU per step (default 1)"),
    "--act-ckpt": dict(
        action="store_true", default=None, help="activation checkpointing (recompute each layer)"
    ),
    "--dtype": dict(help="bf16 (default), fp16 or fp32"),
}
YAML_KEYS = {
    "--tp": "parallel.tensor_parallel",
    "--zero": "parallel.zero_stage",
    "--offload": "parallel.offload_optimizer",
    "--micro-batch": "training.micro_batch_size",
    "--act-ckpt": "model.activation_checkpointing",
    "--dtype": "parallel.precision",
}


def _flag_value(args: argparse.Namespace, flag: str):
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def model_and_layout(args: argparse.Namespace) -> tuple[ModelConfig, Layout]:
    """The model and layout from a training YAML (--config) or from --preset and the flags."""
    if args.config is None:
        cfg = resolve_model_section({"preset": args.preset, **parse_overrides(args.overrides)})
        value = {flag: _flag_value(args, flag) for flag in LAYOUT_FLAGS}
        return cfg, Layout(
            args.gpus,
            args.gpus_per_node,
            value["--tp"] or 1,
            2 if value["--zero"] is None else value["--zero"],
            bool(value["--offload"]),
            value["--micro-batch"] or 1,
            bool(value["--act-ckpt"]),
            value["--dtype"] or "bf16",
        )
    from pretrain.config import load_train_config, model_config

    for flag in LAYOUT_FLAGS:
        if _flag_value(args, flag) is not None:
            raise PlanError(
                f"{flag}: with --config the layout comes from {args.config}; "
                f"override it there or as {YAML_KEYS[flag]}=..."
            )
    train = load_train_config(args.config, args.overrides)
    cfg = model_config(train)
    p = train.parallel
    return cfg, Layout(
        args.gpus,
        args.gpus_per_node,
        p.tensor_parallel,
        p.zero_stage,
        p.offload_optimizer,
        train.training.micro_batch_size,
        cfg.activation_checkpointing,
        p.precision,
    )


def hardware(args: argparse.Namespace) -> Hardware:
    if not 0 < args.efficiency <= 1:
        raise PlanError(f"--efficiency must be in (0, 1], got {args.efficiency}")
    kind = GPU_KINDS[args.gpu or DEFAULT_GPU]
    mem = kind.mem_gib if args.gpu_mem is None else args.gpu_mem
    if mem <= 0:
        raise PlanError(f"--gpu-mem must be positive, got {mem}")
    if args.gpu is None and args.gpu_mem is not None and args.peak_tflops is None and mem != kind.mem_gib:
        print(
            f"cogvideo-plan: note: timing a {mem:g} GiB card at {kind.name} peak; name the card with --gpu "
            f"({', '.join(sorted(GPU_KINDS))}) or give --peak-tflops",
            file=sys.stderr,
        )
    return Hardware(gpu_mem_gib=mem, peak_tflops=args.peak_tflops, gpu=kind.name, efficiency=args.efficiency)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        cfg, layout = model_and_layout(args)
        hw = hardware(args)
        if args.search:
            check_layout(cfg, Layout(args.gpus, args.gpus_per_node, dtype=layout.dtype))
            plans = search(cfg, args.gpus, args.gpus_per_node, layout.dtype, hw)
            print(
                f"{cfg.name}: layouts that fit in {hw.gpu_mem_gib:g} GiB on {args.gpus} GPUs "
                f"({args.gpus_per_node} per node), {layout.dtype}, fastest first"
            )
            print(search_table(plans, args.limit) if plans else "none: add GPUs or memory")
            if not plans:
                sys.exit(1)
            return
        plan = make_plan(cfg, layout, hw)
        print(report(plan))
        best = search(cfg, args.gpus, args.gpus_per_node, layout.dtype, hw)
        print()
        if best:
            top = best[0]
            print(
                f"cheapest layout that fits (most samples per GPU-hour): {top.layout.describe()}\n"
                f"  peak {top.memory.peak / GiB:.2f} GiB, {top.samples_per_s:.1f} samples/s, MFU {top.mfu:.1%}"
            )
        else:
            print(f"no layout fits {args.gpus} GPUs of {hw.gpu_mem_gib:g} GiB")
    except (PlanError, ConfigError, ValueError, OSError) as err:
        print(f"cogvideo-plan: {err}", file=sys.stderr)
        sys.exit(2)
    if not plan.fits:
        print(
            f"cogvideo-plan: {layout.describe()} does not fit in {hw.gpu_mem_gib:g} GiB "
            f"(needs {plan.memory.peak / GiB:.2f} GiB)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
