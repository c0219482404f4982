"""`cogvideo-plan`: will a training run fit in GPU memory, and how fast will it go?

    cogvideo-plan --config configs/cogvideo_stage1.yaml --gpus 104   # the run a training YAML describes
    cogvideo-plan --config configs/cogvideo_stage1.yaml --gpus 104 training.micro_batch_size=4 --gpu h100
    cogvideo-plan model.preset=cogvideo-stage1 model.train_backbone=false parallel.offload_optimizer=true \\
        training.micro_batch_size=4 model.activation_checkpointing=true parallel.precision=fp16 --gpus 104
    cogvideo-plan --config configs/cogvideo_stage1.yaml --gpus 64 --search

The run is read as cogvideo-train reads it: the training defaults <- --config FILE.yaml <- dotted
key=value overrides. The model is `model.*` (from scratch, without init.backbone / init.weights,
every parameter trains, as in training); the layout is parallel.tensor_parallel,
parallel.zero_stage, parallel.offload_optimizer, training.micro_batch_size,
model.activation_checkpointing and parallel.precision (auto: what the trainer picks on the --gpu
kind). Flags describe the hardware. --search varies the layout keys (precision kept) and lists
every layout that fits, fastest first, with the overrides that set the best one.

Memory per GPU comes from cluster/plan_memory.py (DeepSpeed's model-state accounting + the
activations the model keeps, from its family's planner model); time from the family's FLOPs at
the GPU's datasheet peak (`--gpu`, A100-80GB unless told) and an efficiency, plus data- and
tensor-parallel communication and the CPU optimizer step, taken as not overlapped with compute
(an upper bound on step time).
Exit status: 0 when the layout fits, 1 when it does not (or --search finds none), 2 on bad input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import typing
from dataclasses import dataclass, replace
from typing import Any

from cluster.plan_memory import GiB, Layout, MemoryPlan, plan_memory, planner_model
from cogvideo.configio import ConfigError, config_parser
from cogvideo.family import family_of, resolve_model_section
from cogvideo.precision import DTYPES, cuda_precision
from pretrain.config import (
    ZERO0_PRECISIONS,
    ParallelConfig,
    TrainConfig,
    load_train_config,
    resolved_zero_stage,
    trained_model_section,
)

SEARCH_MICRO_BATCHES = (1, 2, 4, 8, 16)
ZERO_STAGES = tuple(  # what training accepts (auto resolves to one of them)
    s for s in typing.get_args(typing.get_type_hints(ParallelConfig)["zero_stage"]) if isinstance(s, int)
)

# the training keys that set each part of a layout (Layout field -> dotted key)
LAYOUT_KEYS = {
    "tp": "parallel.tensor_parallel",
    "zero": "parallel.zero_stage",
    "offload": "parallel.offload_optimizer",
    "micro_batch": "training.micro_batch_size",
    "act_ckpt": "model.activation_checkpointing",
    "dtype": "parallel.precision",
}


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class GpuKind:
    name: str
    mem_gib: float
    peak_tflops: dict  # dense, no sparsity: 16-bit tensor cores with fp32 accumulation, and plain fp32
    capability: tuple[int, int]  # CUDA compute capability: what parallel.precision=auto picks


# NVIDIA datasheets (SXM parts where there are several). fp32 is the non-tensor-core rate.
GPU_KINDS = {
    g.name: g
    for g in (
        GpuKind("a100-80gb", 80, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, (8, 0)),
        GpuKind("a100-40gb", 40, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, (8, 0)),
        GpuKind("h100", 80, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, (9, 0)),
        GpuKind("h200", 141, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, (9, 0)),
        GpuKind("v100-32gb", 32, {"fp16": 125.0, "fp32": 15.7}, (7, 0)),
        GpuKind("a10", 24, {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}, (8, 6)),
        GpuKind("l4", 24, {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}, (8, 9)),
        GpuKind("rtx4090", 24, {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}, (8, 9)),
        GpuKind("rtx3090", 24, {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}, (8, 6)),
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
                f"--gpu {self.gpu} has no {dtype} tensor cores; set another {LAYOUT_KEYS['dtype']} "
                "or give --peak-tflops"
            )
        return table[dtype] * 1e12

    def auto_precision(self) -> str:
        kind = GPU_KINDS[self.gpu]
        return cuda_precision(kind.capability, "bf16" in kind.peak_tflops)

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
    cfg: Any  # the model config of a family with a planner model
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


def check_layout(cfg, layout: Layout):
    """Clear errors for layouts that cannot run; returns cfg with the layout's checkpointing."""
    key = LAYOUT_KEYS
    if layout.gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {layout.gpus}")
    if layout.gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node must be >= 1, got {layout.gpus_per_node}")
    if layout.tp < 1:
        raise PlanError(f"{key['tp']} must be >= 1, got {layout.tp}")
    if layout.tp > layout.gpus_per_node:
        raise PlanError(
            f"{key['tp']}={layout.tp} is more than the {layout.gpus_per_node} GPUs of a node: "
            "tensor parallelism needs NVLink, keep it inside one node"
        )
    try:
        cfg.validate(layout.tp)
    except ValueError as err:
        raise PlanError(f"{key['tp']}={layout.tp} does not fit model {cfg.name!r}: {err}") from None
    if layout.gpus % layout.tp:
        raise PlanError(f"--gpus {layout.gpus} is not a multiple of {key['tp']}={layout.tp}")
    if layout.gpus > layout.gpus_per_node and layout.gpus % layout.gpus_per_node:
        raise PlanError(f"--gpus {layout.gpus} is not a whole number of {layout.gpus_per_node}-GPU nodes")
    if layout.zero not in (0, 1, 2, 3):
        raise PlanError(f"{key['zero']} must be 0, 1, 2 or 3, got {layout.zero}")
    if layout.offload and layout.zero == 0:
        raise PlanError(
            f"{key['offload']} needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads the partitioned optimizer)"
        )
    if layout.micro_batch < 1:
        raise PlanError(f"{key['micro_batch']} must be >= 1, got {layout.micro_batch}")
    if layout.dtype not in DTYPES:
        raise PlanError(f"{key['dtype']} must be one of {sorted(DTYPES)}, got {layout.dtype!r}")
    return replace(cfg, activation_checkpointing=layout.act_ckpt)


def _ring_s(nbytes: float, ranks: int, gbps: float) -> float:
    """One all-reduce (or reduce-scatter + all-gather) of `nbytes` over a ring of `ranks`."""
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9)


def estimate_step(cfg, layout: Layout, memory: MemoryPlan, hw: Hardware) -> StepEstimate:
    """Compute from the family's FLOPs, communication and the CPU optimizer of one step."""
    planner = planner_model(cfg)
    b, tp, e = layout.micro_batch, layout.tp, layout.dtype_bytes
    model = b * family_of(cfg).train_flops(cfg) / tp
    compute = (model + b * planner.recompute_flops(cfg) / tp) / (hw.peak(layout.dtype) * hw.efficiency)
    trainable = memory.params.trainable
    dp_link = hw.inter_node_gbps if layout.gpus > layout.gpus_per_node else hw.intra_node_gbps
    dp = _ring_s(trainable * e, layout.dp, dp_link)  # gradients out, updated weights back
    if layout.zero == 3:  # every weight, frozen ones too, is gathered for forward, backward, recompute
        gathers = 3 if layout.act_ckpt else 2
        dp = dp / 2 + gathers * _ring_s(memory.params.total * e, layout.dp, dp_link) / 2
    allreduces, elements = planner.tp_allreduces(cfg, layout.act_ckpt)
    tp_comm = allreduces * _ring_s(b * elements * e, tp, hw.intra_node_gbps)
    offload = 0.0
    if layout.offload:
        partition = trainable / (layout.dp if layout.zero else 1)
        per_node = min(layout.gpus, layout.gpus_per_node)
        offload = partition * per_node / hw.cpu_adam_params_per_s + partition * (4 + e) / (hw.pcie_gbps * 1e9)
    return StepEstimate(compute, dp, tp_comm, offload, model)


def make_plan(cfg, layout: Layout, hw: Hardware = Hardware()) -> Plan:
    cfg = check_layout(cfg, layout)
    memory = plan_memory(cfg, layout, context_bytes=hw.context_gib * GiB)
    return Plan(cfg, layout, hw, memory, estimate_step(cfg, layout, memory, hw))


def search(cfg, gpus: int, gpus_per_node: int, dtype: str, hw: Hardware = Hardware()) -> list[Plan]:
    """Every layout the training keys can set (TP, ZeRO stage, offload, micro-batch, activation
    checkpointing) that fits, fastest first."""
    plans = []
    for tp, zero, offload, micro, ckpt in itertools.product(
        range(1, gpus_per_node + 1), ZERO_STAGES, (False, True), SEARCH_MICRO_BATCHES, (False, True)
    ):
        if zero == 0 and dtype not in ZERO0_PRECISIONS:  # what the trainer takes
            continue
        layout = Layout(gpus, gpus_per_node, tp, zero, offload, micro, ckpt, dtype)
        try:
            plan = make_plan(cfg, layout, hw)
        except PlanError:
            continue
        if plan.fits:
            plans.append(plan)
    # fastest first; among equals the one with more memory to spare
    return sorted(plans, key=lambda p: (-round(p.samples_per_s, 6), p.memory.peak))


def layout_overrides(layout: Layout) -> str:
    """The training overrides that set `layout` (precision aside)."""
    return " ".join(
        f"{key}={json.dumps(getattr(layout, field))}"
        for field, key in LAYOUT_KEYS.items()
        if field != "dtype"
    )


# ---- report ----------------------------------------------------------------------------
def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f} GiB"


def report(plan: Plan) -> str:
    cfg, lay, mem, st, hw = plan.cfg, plan.layout, plan.memory.states, plan.step, plan.hw
    p = plan.memory.params
    zero3 = " (ZeRO-3 shard)" if lay.zero == 3 else ""
    lines = [
        planner_model(cfg).describe(cfg),
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


# the layout flags the one convention replaced with training keys
REMOVED_FLAGS = {
    "--preset": "model.preset",
    "--tp": LAYOUT_KEYS["tp"],
    "--zero": LAYOUT_KEYS["zero"],
    "--offload": LAYOUT_KEYS["offload"],
    "--micro-batch": LAYOUT_KEYS["micro_batch"],
    "--act-ckpt": LAYOUT_KEYS["act_ckpt"],
    "--dtype": LAYOUT_KEYS["dtype"],
}
SWITCHES = ("--offload", "--act-ckpt")


def removed_flag(argv: list[str]) -> str | None:
    """One line naming the training key of a removed layout flag (`--tp 8`: parallel.tensor_parallel=8)."""
    for i, arg in enumerate(argv):
        flag, has_value, value = arg.partition("=")
        if flag not in REMOVED_FLAGS:
            continue
        if flag in SWITCHES:
            value = "true"
        elif not has_value:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "VALUE"
        return (
            f"{flag} was removed: write {REMOVED_FLAGS[flag]}={value} (cogvideo-plan reads the training settings "
            "as cogvideo-train does: --config FILE.yaml plus key=value overrides)"
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = config_parser(TrainConfig, "cogvideo-plan", __doc__)
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
        "--peak-tflops", type=float, default=None, help="peak for the precision (default: the --gpu kind's)"
    )
    ap.add_argument(
        "--efficiency", type=float, default=Hardware.efficiency, help="sustained fraction of peak"
    )
    ap.add_argument("--search", action="store_true", help="list every layout that fits, fastest first")
    ap.add_argument("--limit", type=int, default=20, help="rows of --search output")
    return ap


def model_and_layout(train: TrainConfig, args: argparse.Namespace, hw: Hardware) -> tuple[Any, Layout]:
    """The model and layout a training config sets, on the GPUs of `args` (TP checked per layout)."""
    cfg = resolve_model_section(trained_model_section(train))
    planner_model(cfg)  # a family without one is refused here, before any layout
    p = train.parallel
    if p.attention_precision == "fp32" and p.precision != "fp32":
        raise PlanError(
            "parallel.attention_precision=fp32: the planner counts attention's activations in the run's "
            "precision (fp32 attention keeps fp32 copies of q, k, v and the output); plan with auto or same"
        )
    dtype = hw.auto_precision() if p.precision == "auto" else p.precision
    return cfg, Layout(
        args.gpus,
        args.gpus_per_node,
        p.tensor_parallel,
        resolved_zero_stage(p, max(1, args.gpus // p.tensor_parallel), dtype),
        p.offload_optimizer,
        train.training.micro_batch_size,
        cfg.activation_checkpointing,
        dtype,
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


def print_search(cfg, layout: Layout, hw: Hardware, limit: int) -> None:
    """The --search table; exit status 1 when nothing fits."""
    check_layout(cfg, Layout(layout.gpus, layout.gpus_per_node, dtype=layout.dtype))
    plans = search(cfg, layout.gpus, layout.gpus_per_node, layout.dtype, hw)
    print(
        f"{cfg.name}: layouts that fit in {hw.gpu_mem_gib:g} GiB on {layout.gpus} GPUs "
        f"({layout.gpus_per_node} per node), {layout.dtype}, fastest first"
    )
    if not plans:
        print("none: add GPUs or memory")
        sys.exit(1)
    print(search_table(plans, limit))
    print(f"fastest: {layout_overrides(plans[0].layout)}")


def print_plan(plan: Plan) -> None:
    """The report, then the cheapest layout the training keys could set instead."""
    print(report(plan))
    lay, hw = plan.layout, plan.hw
    best = search(plan.cfg, lay.gpus, lay.gpus_per_node, lay.dtype, hw)
    print()
    if not best:
        print(f"no layout fits {lay.gpus} GPUs of {hw.gpu_mem_gib:g} GiB")
        return
    top = best[0]
    print(
        f"cheapest layout that fits (most samples per GPU-hour): {top.layout.describe()}\n"
        f"  peak {top.memory.peak / GiB:.2f} GiB, {top.samples_per_s:.1f} samples/s, MFU {top.mfu:.1%}\n"
        f"  set by: {layout_overrides(top.layout)}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    moved = removed_flag(argv)
    if moved:
        parser.exit(2, f"cogvideo-plan: {moved}\n")
    args = parser.parse_intermixed_args(argv)  # overrides may sit on either side of the flags
    try:
        hw = hardware(args)
        cfg, layout = model_and_layout(load_train_config(args.config, args.overrides), args, hw)
        if args.search:
            print_search(cfg, layout, hw, args.limit)
            return
        plan = make_plan(cfg, layout, hw)
    except (PlanError, ConfigError, ValueError, OSError) as err:
        parser.exit(2, f"cogvideo-plan: {err}\n")
    print_plan(plan)
    if not plan.fits:
        print(
            f"cogvideo-plan: {layout.describe()} does not fit in {hw.gpu_mem_gib:g} GiB "
            f"(needs {plan.memory.peak / GiB:.2f} GiB)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
