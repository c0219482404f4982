"""The demo's targets at both training precisions and several seeds: the README's demo figures.

    python benchmarks/bench_demo.py [--out bench_demo] [--seeds 0 1 2] [--precisions fp32 bf16]
    python benchmarks/bench_demo.py --table-only        # the table of runs already done

Each (precision, seed) is a whole `python -m demo seed=N` with the three training configs'
`parallel.precision` set, in `<out>/<precision>_seed<N>/`; the data steps (videos, tokenizers,
shards: they do not depend on the precision) run once per seed and are shared by hard links.
A finished run is not redone (the demo skips finished steps), so the benchmark resumes. Printed:
the CPU (model, bf16 flags) and load average, then per precision the mean and spread (min..max)
over the seeds of every target of the demo's report, the other held-out figures and the time.
On 2 CPU cores one run takes about 25 minutes alone: 6 runs about 2.5 hours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from cogvideo.machine import LoadWatch
from demo.driver import STEPS
from demo.tasks import HIERARCHY_MODELS

ROOT = Path(__file__).resolve().parents[1]
DATA_STEPS = ("videos", "tokenizers", "shards")
DATA_FOLDERS = tuple(folder for step in STEPS if step.name in DATA_STEPS for folder in step.outputs)


def run_dir(out: Path, precision: str, seed: int) -> Path:
    return out / f"{precision}_seed{seed}"


def share_data(source: Path, target: Path) -> None:
    """Hard-link the finished data steps of `source` into `target` (the demo then skips them)."""
    if not all((source / "steps" / f"{s}.json").is_file() for s in DATA_STEPS):
        return
    (target / "steps").mkdir(parents=True, exist_ok=True)
    for folder in DATA_FOLDERS:
        if (source / folder).exists() and not (target / folder).exists():
            shutil.copytree(source / folder, target / folder, copy_function=os.link)
    for step in DATA_STEPS:
        if not (target / "steps" / f"{step}.json").exists():
            shutil.copyfile(source / "steps" / f"{step}.json", target / "steps" / f"{step}.json")


def run_demo(out: Path, precision: str, seed: int, extra: list[str]) -> None:
    overrides = [f"train.{stage}=[parallel.precision={precision}]" for stage in HIERARCHY_MODELS]
    command = [sys.executable, "-m", "demo", f"out={out}", f"seed={seed}", *overrides, *extra]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def figures(out: Path) -> dict[str, float] | None:
    """The run's figures from its report's metrics.json (None before the run finished)."""
    path = out / "report" / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    (family,) = metrics["families"]
    heldout = family["evaluation"]["generated"]["accuracy"]["heldout"]
    by_duration = family["evaluation"]["displacement_by_duration"]
    durations = sorted(by_duration, key=float)
    row = {f"held-out {k}": heldout[k] for k in ("colour", "shape", "constant", "direction")}
    longest = f"{float(durations[-1]):g}s"
    row[f"held-out direction {longest}"] = family["evaluation"]["generated"]["accuracy_by_duration"][
        "heldout"
    ][longest]["direction"]
    for d in durations:
        row[f"displacement {float(d):g} s (px/keyframe)"] = by_duration[d]["generated"]
    for d in durations[1:]:
        row[f"displacement ratio {float(d):g} s : {float(durations[0]):g} s"] = (
            by_duration[d]["generated"] / by_duration[durations[0]]["generated"]
        )
    if "fvd" in family["evaluation"]:
        row["FVD"] = family["evaluation"]["fvd"]["value"]
    row["targets met"] = sum(t["met"] for t in family["targets"].values())
    row["targets"] = len(family["targets"])
    row["training minutes"] = sum(metrics["step_seconds"].get(s, 0.0) for s in HIERARCHY_MODELS) / 60
    row["total minutes"] = metrics["total_seconds"] / 60
    return row


def table(out: Path, precisions: list[str], seeds: list[int]) -> str:
    runs = {p: [f for s in seeds if (f := figures(run_dir(out, p, s))) is not None] for p in precisions}
    names = list(dict.fromkeys(k for rows in runs.values() for row in rows for k in row))
    lines = ["| figure | " + " | ".join(f"{p} ({len(runs[p])} seeds)" for p in precisions) + " |"]
    lines.append("|---" * (len(precisions) + 1) + "|")
    for name in names:
        cells = []
        for p in precisions:
            values = [row[name] for row in runs[p] if name in row]
            cells.append(
                f"{statistics.mean(values):.3g} ({min(values):.3g}..{max(values):.3g})" if values else "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_demo", help="folder of the runs (one per precision and seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs already done")
    parser.add_argument("overrides", nargs="*", help="more `python -m demo` overrides, for every run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    load = LoadWatch()
    print(load.describe(), flush=True)
    if not args.table_only:
        for seed in args.seeds:
            first = run_dir(out, args.precisions[0], seed)
            for precision in args.precisions:
                target = run_dir(out, precision, seed)
                if target != first:
                    share_data(first, target)
                run_demo(target, precision, seed, args.overrides)
                load.sample()
        print(load.describe())
    print(table(out, args.precisions, args.seeds))


if __name__ == "__main__":
    main()
