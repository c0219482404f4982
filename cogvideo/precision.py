"""Numeric precision: the one naming (``fp32``, ``bf16``, ``fp16``; ``auto`` chooses), the one
name -> dtype map, and the start-up probes that turn ``auto`` into what the run gains from.

    choice = choose_precision("auto", "cpu", probe_shape(rows=16 * 1408, hidden=256, ffn=1024))
    model.to(choice.dtype); print(choice.describe())

Training and CogVideo's sampling (``step`` given: one training step of the run's own model and
batch, or the sampler's own decoding, in a named precision) time that step in fp32 and in the
device's low precision, alternating, and take the low precision only where its step is at least
STEP_MIN_SPEEDUP times faster and the run does not exclude it (``excluded``: known to cost that
run's quality). A matmul predicts a step poorly (small products, attention, norms, the optimizer,
casts and per-token latency are not in it): on an AMX Xeon bf16 matmuls ran 3.2x faster while
the demo's training steps did not; on the dev CPU (AVX-512 BF16) bf16 products ran 1.6x faster
while sampling stage 2 took 1.8x longer in bf16 (`benchmarks/bench_sampling.py`). The low precision on CUDA: bf16 on
compute capability >= 8 with native bf16 (A100, H100), fp16 with loss scaling on 7.x (V100, T4),
none below. Training also asks what a low precision's attention computes in (``attention``:
AttentionPrecision): with ``auto`` on a CPU the low precision's step is timed with attention in
fp32 too (``fp32_attention_step``; cogvideo.sdpa), the faster of the two counts against fp32's,
and the choice records which (``PrecisionChoice.attention``).

Without a step (the other families' sampling, evaluation, the tokenizer fit) CUDA
follows that capability rule, and on a CPU a product of the run's own width is timed in fp32 and
bf16 (a few ms with bf16 units; AVX2-only CPUs emulate bf16 some 60x slower than fp32): bf16 only
where it is clearly faster. Under torch.distributed every rank takes part in the timing (a step
may all-reduce), rank 0's figures are broadcast and every rank derives the same choice from them.
"""

from __future__ import annotations

import statistics
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISION_CHOICES = typing.get_args(Precision)  # for argparse choices
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# What a bf16/fp16 run's attention computes in (cogvideo.sdpa): "auto" times the step both ways
# where a step is timed on a CPU (CUDA keeps its fused low-precision kernels), "fp32", or "same"
AttentionPrecision = Literal["auto", "fp32", "same"]

# A CPU's bf16 must beat fp32 on the probe by this factor to be chosen: a training step also runs
# casts, norms and fp32 master weights that bf16 does not speed up, and the margin keeps a
# loaded machine's timing noise from flipping the choice. Measured matmul bf16/fp32: ~2.2 with
# AVX-512 BF16, ~10 with AMX, ~0.015 on AVX2 only.
CPU_BF16_MIN_SPEEDUP = 1.5
SLOW_FACTOR = 2.0  # an explicit bf16/fp16 this many times slower than fp32 gets a warning
PROBE_FLOPS = 2**26  # per timed product: ~0.6 ms at 100 GFLOP/s, ~0.2 s where bf16 is emulated
PROBE_MIN_SECONDS = 0.005  # time each precision for at least this long (and at least 2 calls)
# A training step in the low precision must be this many times faster than fp32's to be chosen
# (a third of the step time saved): rounding to 8 significant bits is worth a clear gain only.
# The demo's steps, timed by this probe on an AMD EPYC with AVX-512 BF16: 1.28-1.33x, on an AMX
# Xeon no faster (issue 29), while a loaded machine moves single steps by 10 % and more; a large
# model on A100/H100 gains 2-3x and more.
STEP_MIN_SPEEDUP = 1.5
# A timed step (training's or decoding's) runs the run's model cut to at most this many layers:
# the demo's models whole, a 48-layer model 4 of its layers
PROBE_MAX_LAYERS = 4
STEP_WARMUP = 1  # untimed steps per precision (allocations, kernel choice)
STEP_REPEATS = 3  # timed steps per precision; the median counts


def fp32_attention_step(name: str) -> str:
    """The step name of precision `name` with attention computed in fp32 (cogvideo.sdpa)."""
    return f"{name}_attention_fp32"


def split_step_name(step_name: str) -> tuple[str, bool]:
    """(precision, attention computed in fp32) of a timed step's name."""
    name, _, rest = step_name.partition("_attention_")
    return name, rest == "fp32"


# every step a probe may time, in the order ProbeFigures' vector carries their seconds
STEP_NAMES = (*DTYPES, *(fp32_attention_step(name) for name in DTYPES if name != "fp32"))


def torch_dtype(name: str) -> torch.dtype:
    """The dtype of a resolved precision name ('auto' must be resolved first)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"precision {name!r}: expected one of {', '.join(DTYPES)}") from None


def probe_shape(rows: int, hidden: int, ffn: int) -> tuple[int, int, int]:
    """The probe's product: ``rows`` tokens through the MLP's first weight [hidden, ffn], rows
    cut so that one product is about PROBE_FLOPS (at least 16 rows)."""
    return max(16, min(rows, PROBE_FLOPS // (2 * hidden * ffn))), hidden, ffn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device):
    """On one CPU thread, that thread's CPU time: other jobs sharing the cores then barely move
    the figure; otherwise wall time."""
    return time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def matmul_rates(
    dtypes: list[torch.dtype],
    shape: tuple[int, int, int] = (1024, 1024, 1024),
    device: str = "cpu",
    min_seconds: float = PROBE_MIN_SECONDS,
    max_calls: int = 1000,
) -> list[float]:
    """GFLOP/s of an [m, k] @ [k, n] product in each dtype on ``device`` at the current thread
    count: one warm-up call each, then calls taking turns between the dtypes (so that changing
    load hits all alike) until each has run ``min_seconds`` (and at least 3 calls); the fastest
    call of each counts. The matmul roofline of the benchmarks and the precision probe."""
    m, k, n = shape
    device = torch.device(device)
    clock = _clock(device)
    pairs = []
    for dtype in dtypes:
        pair = (torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype))
        pair[0] @ pair[1]
        pairs.append(pair)
    _sync(device)
    best, spent, calls = [float("inf")] * len(dtypes), [0.0] * len(dtypes), 0
    while calls < 3 or (min(spent) < min_seconds and calls < max_calls):
        for i, (a, b) in enumerate(pairs):
            start = clock()
            a @ b
            _sync(device)
            took = clock() - start
            best[i], spent[i] = min(best[i], took), spent[i] + took
        calls += 1
    return [2 * m * k * n / max(t, 1e-9) / 1e9 for t in best]


def matmul_gflops(
    dtype: torch.dtype,
    shape: tuple[int, int, int] = (1024, 1024, 1024),
    device: str = "cpu",
    min_seconds: float = PROBE_MIN_SECONDS,
) -> float:
    """:func:`matmul_rates` of one dtype."""
    return matmul_rates([dtype], shape, device, min_seconds)[0]


@dataclass(frozen=True)
class ProbeFigures:
    """What the choice is made from: matmul GFLOP/s per precision (measured), on CUDA the compute
    capability and whether bf16 runs natively, and for training the seconds of the run's own
    step per precision (measured; empty when no step was timed)."""

    device: str  # "cpu" or "cuda"
    gflops: dict[str, float]  # precision name -> GFLOP/s of the probe's product
    shape: tuple[int, int, int]
    threads: int
    capability: tuple[int, int] | None = None
    bf16_supported: bool = False
    step_seconds: dict[str, float] = field(default_factory=dict)  # STEP_NAMES entry -> s per own step

    def to_vector(self) -> torch.Tensor:
        cap = self.capability or (-1, -1)
        return torch.tensor(
            [
                float(self.device == "cuda"),
                *(self.gflops.get(n, -1.0) for n in DTYPES),
                *self.shape,
                self.threads,
                *cap,
                float(self.bf16_supported),
                *(self.step_seconds.get(n, -1.0) for n in STEP_NAMES),
            ],
            dtype=torch.float64,
        )

    @classmethod
    def from_vector(cls, v: torch.Tensor) -> "ProbeFigures":
        x = v.tolist()
        gflops = {name: value for name, value in zip(DTYPES, x[1:4]) if value >= 0}
        cap = (int(x[8]), int(x[9])) if x[8] >= 0 else None
        steps = {name: value for name, value in zip(STEP_NAMES, x[11:]) if value >= 0}
        return cls(
            "cuda" if x[0] else "cpu",
            gflops,
            (int(x[4]), int(x[5]), int(x[6])),
            int(x[7]),
            cap,
            bool(x[10]),
            steps,
        )

    @property
    def low_precision(self) -> str | None:
        """The device's candidate below fp32: bf16 on a CPU, by capability on CUDA (or none)."""
        if self.device != "cuda":
            return "bf16"
        chosen = cuda_precision(self.capability, self.bf16_supported)
        return None if chosen == "fp32" else chosen

    def own_steps(self, name: str) -> tuple[float | None, float | None]:
        """Seconds of precision `name`'s step with attention in `name` and in fp32 (None: not timed)."""
        return self.step_seconds.get(name), self.step_seconds.get(fp32_attention_step(name))

    def step_speedup(self, name: str) -> float:
        """fp32's step time over precision `name`'s faster timed step (> 1: `name` is faster)."""
        own = [seconds for seconds in self.own_steps(name) if seconds is not None]
        return self.step_seconds["fp32"] / max(min(own), 1e-12)

    def attention(self, precision: str, requested: str) -> str:
        """What precision `precision`'s attention computes in (`requested`: AttentionPrecision):
        fp32 where asked, or, for auto, where its step with fp32 attention was timed faster."""
        if requested == "fp32" or precision == "fp32":
            return "fp32"
        plain, upcast = self.own_steps(precision)
        if requested == "auto" and plain is not None and upcast is not None and upcast < plain:
            return "fp32"
        return precision


def measure(device: str = "cpu", shape: tuple[int, int, int] = (128, 256, 1024)) -> ProbeFigures:
    """Time the probe's product in each precision that the device could choose."""
    dev = torch.device(device)
    if dev.type == "cuda":
        capability = torch.cuda.get_device_capability(dev)
        try:  # without emulation: torch >= 2.3 counts emulated bf16 as "supported" by default
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            bf16 = torch.cuda.is_bf16_supported()
        rates = matmul_rates(list(DTYPES.values()), shape, device)
        return ProbeFigures("cuda", dict(zip(DTYPES, rates)), shape, 0, capability, bf16)
    rates = matmul_rates([torch.float32, torch.bfloat16], shape, device)
    return ProbeFigures("cpu", {"fp32": rates[0], "bf16": rates[1]}, shape, torch.get_num_threads())


def cuda_precision(capability: tuple[int, int] | None, bf16_supported: bool) -> str:
    """``auto`` on a CUDA device (also the planner's, from a GPU kind's capability)."""
    major = capability[0] if capability else 0
    if major >= 8 and bf16_supported:
        return "bf16"
    return "fp16" if major >= 7 else "fp32"


def decide(figures: ProbeFigures, excluded: Sequence[str] = ()) -> str:
    """The precision ``auto`` stands for, given the probe's figures: never one in `excluded`; with
    step times, the device's low precision where its step is >= STEP_MIN_SPEEDUP faster; without,
    the capability rule on CUDA and the matmul rule on a CPU."""
    low = figures.low_precision
    if "fp32" in figures.step_seconds:  # the run's own step was timed
        timed = low is not None and figures.own_steps(low) != (None, None)
        chosen = low if timed and figures.step_speedup(low) >= STEP_MIN_SPEEDUP else "fp32"
    elif figures.device == "cuda":
        chosen = cuda_precision(figures.capability, figures.bf16_supported)
    else:
        bf16, fp32 = figures.gflops.get("bf16", 0.0), figures.gflops["fp32"]
        chosen = "bf16" if bf16 >= CPU_BF16_MIN_SPEEDUP * fp32 else "fp32"
    return "fp32" if chosen in excluded else chosen


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str  # auto, fp32, bf16, fp16
    precision: str  # what runs
    figures: ProbeFigures
    reason: str = ""
    warning: str | None = field(default=None)
    attention: str | None = None  # what attention computes in (cogvideo.sdpa); None: `precision`

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def fp32_attention(self) -> bool:
        """Whether this run's bf16/fp16 attention computes in fp32 (`cogvideo.sdpa.fp32_attention`)."""
        return self.precision != "fp32" and self.attention == "fp32"

    @property
    def attention_setting(self) -> str:
        """The choice as an AttentionPrecision a config records (`fp32` or `same`), so that a
        resumed run or another worker takes it without timing again."""
        return "fp32" if self.fp32_attention else "same"

    def describe(self) -> str:
        f = self.figures
        rates = ", ".join(f"{name} {value:.1f}" for name, value in f.gflops.items())
        where = (
            f"cuda cc {f.capability[0]}.{f.capability[1]}" if f.capability else f"cpu, {f.threads} thread(s)"
        )
        m, k, n = f.shape
        steps = ", ".join(f"{name} {value:.3f}" for name, value in f.step_seconds.items())
        attention = ", attention in fp32" if self.fp32_attention else ""
        return (
            f"precision {self.precision}{attention} (requested {self.requested}"
            f"{'; ' + self.reason if self.reason else ''}): "
            + (f"own step s {steps}; " if steps else "")
            + f"matmul {m}x{k}x{n} GFLOP/s {rates} ({where})"
        )

    def to_dict(self) -> dict:
        """A plain record for configs, logs and TensorBoard."""
        f = asdict(self.figures)
        return {
            "requested": self.requested,
            "precision": self.precision,
            "attention": self.attention or self.precision,
            "reason": self.reason,
            "device": f["device"],
            "gflops": {k: round(v, 2) for k, v in f["gflops"].items()},
            "shape": list(f["shape"]),
            "threads": f["threads"],
            "capability": list(f["capability"]) if f["capability"] else None,
            "bf16_supported": f["bf16_supported"],
            "step_seconds": {k: float(f"{v:.4g}") for k, v in f["step_seconds"].items()},
        }


def resolve(requested: str, figures: ProbeFigures, excluded: Sequence[str] = ()) -> PrecisionChoice:
    """``auto`` -> :func:`decide`; an explicit precision is kept, with a warning where the probe
    found it more than SLOW_FACTOR times slower than fp32."""
    if requested == "auto":
        chosen = decide(figures, excluded)
        return PrecisionChoice(requested, chosen, figures, _reason(figures, chosen, excluded))
    torch_dtype(requested)
    warning = None
    low, fp32 = figures.gflops.get(requested), figures.gflops.get("fp32")
    if requested != "fp32" and low is not None and fp32 and low * SLOW_FACTOR < fp32:
        warning = (
            f"precision {requested} runs matmuls {fp32 / max(low, 1e-9):.1f}x slower than fp32 here "
            f"({requested} {low:.1f} GFLOP/s, fp32 {fp32:.1f} GFLOP/s): precision auto would choose "
            f"{decide(figures)}"
        )
    return PrecisionChoice(requested, requested, figures, "set explicitly", warning)


def _reason(figures: ProbeFigures, chosen: str, excluded: Sequence[str] = ()) -> str:
    low = figures.low_precision
    if low is not None and low in excluded:
        return f"{low} is excluded for this run (known to cost its quality)"
    if "fp32" in figures.step_seconds:
        if low is None:
            return "no fast low precision on this device"
        speedup = figures.step_speedup(low)
        return f"{low} own step {speedup:.2f}x fp32's {'>=' if chosen == low else '<'} {STEP_MIN_SPEEDUP}"
    if figures.device == "cuda":
        cap = figures.capability or (0, 0)
        native = "native bf16" if figures.bf16_supported else "no native bf16"
        return f"compute capability {cap[0]}.{cap[1]}, {native}"
    ratio = figures.gflops.get("bf16", 0.0) / max(figures.gflops["fp32"], 1e-9)
    verdict = ">=" if chosen == "bf16" else "<"
    return f"bf16/fp32 matmul speed {ratio:.2f} {verdict} {CPU_BF16_MIN_SPEEDUP}"


_measured: dict[tuple, ProbeFigures] = {}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def probe(device: str = "cpu", shape: tuple[int, int, int] = (128, 256, 1024)) -> ProbeFigures:
    """The figures for this device, shape and thread count: measured once per process. Under an
    initialised torch.distributed rank 0 measures and broadcasts, so every rank decides alike."""
    import torch.distributed as dist

    key = (str(device), shape, torch.get_num_threads())
    if key not in _measured:
        if _distributed() and dist.get_rank() != 0:
            figures = ProbeFigures("cpu", {}, shape, 0)  # a placeholder: rank 0's figures replace it
        else:
            figures = measure(device, shape)
        _measured[key] = _shared(figures, device)
    return _measured[key]


def time_steps(
    step: Callable[[str], None],
    precisions: Sequence[str],
    device: str = "cpu",
    warmup: int = STEP_WARMUP,
    repeats: int = STEP_REPEATS,
) -> dict[str, float]:
    """Seconds per call of ``step(name)`` for each precision name: ``warmup`` untimed calls each,
    then ``repeats`` timed calls taking turns between the precisions (so that changing load hits
    all alike); the median counts. Clock as :func:`matmul_rates` (one CPU thread: its CPU time)."""
    dev = torch.device(device)
    clock = _clock(dev)
    for name in precisions:
        for _ in range(warmup):
            step(name)
    _sync(dev)
    took: dict[str, list[float]] = {name: [] for name in precisions}
    for _ in range(repeats):
        for name in precisions:
            start = clock()
            step(name)
            _sync(dev)
            took[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in took.items()}


def _shared(figures: ProbeFigures, device: str) -> ProbeFigures:
    """Rank 0's figures on every rank (as they are without an initialised process group)."""
    import torch.distributed as dist

    if not _distributed():
        return figures
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    vector = figures.to_vector().to(on)
    dist.broadcast(vector, src=0)
    return ProbeFigures.from_vector(vector.cpu())


def steps_to_time(
    requested: str, figures: ProbeFigures, excluded: Sequence[str], attention: str
) -> list[str]:
    """The steps (STEP_NAMES) `choose_precision` times: for ``auto`` fp32's and the low
    precision's; for an explicit low precision none, unless its attention is to be decided. The
    low precision's step runs with attention in fp32 where ``attention`` is ``fp32``, both ways
    where it is ``auto`` on a CPU (CUDA keeps its fused low-precision kernels)."""
    low = figures.low_precision if requested == "auto" else requested
    if low in (None, "fp32") or (requested == "auto" and low in excluded):
        return []
    both = [low, fp32_attention_step(low)] if figures.device == "cpu" else [low]
    variants = {"same": [low], "fp32": [fp32_attention_step(low)], "auto": both}[attention]
    if requested == "auto":
        return ["fp32", *variants]
    return variants if len(variants) > 1 else []


def choose_precision(
    requested: str,
    device: str = "cpu",
    shape: tuple[int, int, int] = (128, 256, 1024),
    step: Callable[[str], None] | None = None,
    excluded: Sequence[str] = (),
    attention: str = "same",
) -> PrecisionChoice:
    """Resolve a requested precision on this device (see the module docstring). ``step(name)``:
    one step of the run's own work (training step, decoding) as STEP_NAMES entry ``name``, timed
    for ``auto`` (collective: under torch.distributed every rank calls this together);
    ``excluded``: low precisions ``auto`` must not choose for this run; ``attention``
    (AttentionPrecision): what a low precision's attention computes in, ``auto`` timed."""
    figures = probe(device, shape)
    names = steps_to_time(requested, figures, excluded, attention) if step is not None else []
    if names:
        figures = _shared(replace(figures, step_seconds=time_steps(step, names, device)), device)
    choice = resolve(requested, figures, excluded)
    computes_in = figures.attention(choice.precision, attention)
    reason = "; ".join(
        filter(None, [choice.reason, _attention_reason(figures, choice.precision, computes_in)])
    )
    return replace(choice, attention=computes_in, reason=reason)


def _attention_reason(figures: ProbeFigures, precision: str, attention: str) -> str:
    plain, upcast = figures.own_steps(precision)
    if precision == "fp32" or plain is None or upcast is None:
        return ""
    speedup = plain / max(upcast, 1e-12)
    return f"{precision} step with fp32 attention {speedup:.2f}x its own: attention in {attention}"
