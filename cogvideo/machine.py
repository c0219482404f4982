"""The machine a measurement ran on: CPU model, its bf16 instructions, cores, and the load average
while it ran. Every benchmark prints it beside its ratios and the demo's report records it: a
speed ratio means little without the CPU kind (AVX-512 BF16 and AMX change what is fast) and how
busy the machine was.

    load = LoadWatch()  # the CPU, and the load now
    ...  # the measurement, calling load.sample() now and then
    load.sample()
    print(load.describe())  # "AMD EPYC (avx512_bf16), 2 CPUs; 1-min load average 12.1 at start, 14.0 at end, max 14.0"
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@dataclass(frozen=True)
class CPU:
    model: str
    bf16_flags: tuple[str, ...]  # the BF16_FLAGS the CPU has
    cpus: int

    def describe(self) -> str:
        flags = ", ".join(self.bf16_flags) or "no bf16 instructions"
        return f"{self.model} ({flags}), {self.cpus} CPUs"


def this_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CPU:
    """The CPU model name and bf16 flags from /proc/cpuinfo (elsewhere: platform's name, no flags)."""
    fields = {}
    if cpuinfo.is_file():  # the first processor's block: every core of a machine is alike
        for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return CPU(model, tuple(f for f in BF16_FLAGS if f in flags), os.cpu_count() or 1)


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


@dataclass
class LoadWatch:
    """The load average at the start of a measurement and at each `sample()` (the end, by default
    when described): a run's ratios are printed with the load they were measured under."""

    cpu: CPU = field(default_factory=this_cpu)
    samples: list[float] = field(default_factory=lambda: [load_average()])

    def sample(self) -> float:
        self.samples.append(load_average())
        return self.samples[-1]

    def describe(self) -> str:
        """The CPU and the load: at start, and (after a `sample()`) at end and its maximum."""
        start, *rest = self.samples
        load = f"1-min load average {start:.1f}"
        if rest:
            load += f" at start, {rest[-1]:.1f} at end, max {max(self.samples):.1f}"
        return f"{self.cpu.describe()}; {load}"

    def to_dict(self) -> dict:
        return {
            "cpu": self.cpu.model,
            "bf16_flags": list(self.cpu.bf16_flags),
            "cpus": self.cpu.cpus,
            "load_average": [round(x, 2) for x in self.samples],
        }
