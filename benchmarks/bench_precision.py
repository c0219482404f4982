"""The demo's training step in fp32, bf16 (attention in bf16 and in fp32) and `auto` on this
machine, measured in one run.

    python benchmarks/bench_precision.py [--steps 10] [--rounds 2] [--stages backbone stage1 stage2]

Each of the demo's training configs (configs/demo/train_*.yaml, micro-batch 16 per rank) runs
`Trainer.advance` (the whole training step: loader, DeepSpeed ZeRO-2 engine, guard, metrics) on
one rank and one thread, the way each of the demo's 2 ranks runs, on random-token shards of its
layout (step time does not depend on the tokens). Every (config, variant) is a fresh process;
the variants alternate in `--rounds` rounds so that drifting machine load hits all alike.
Per step both the wall time and the process's CPU time are taken: on a machine shared with
other jobs the CPU time is the steadier figure (`--clock`). The demo's training time is
predicted from each config's max_steps (the demo's 2 ranks run side by side on 2 cores and
add a gradient all-reduce per step). Also printed: the precision probe and the matmul
roofline of each precision on one thread, measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train import single_rank_trainer, write_data  # noqa: E402

from cogvideo.machine import LoadWatch  # noqa: E402
from cogvideo.precision import DTYPES, choose_precision, matmul_gflops, probe_shape  # noqa: E402
from pretrain.config import load_train_config, model_config  # noqa: E402

# what each timed run sets: bf16 with its attention computed in bf16 and in fp32 (cogvideo.sdpa)
VARIANTS = {
    "fp32": ["parallel.precision=fp32"],
    "bf16": ["parallel.precision=bf16", "parallel.attention_precision=same"],
    "bf16+fp32 attention": ["parallel.precision=bf16", "parallel.attention_precision=fp32"],
    "auto": ["parallel.precision=auto"],
}


def demo_config_file(stage: str) -> str:
    return str(ROOT / "configs" / "demo" / f"train_{stage}.yaml")


def demo_config(stage: str, overrides: list[str]):
    return load_train_config(demo_config_file(stage), overrides)


def measure_steps(stage: str, variant: str, shards: list[str], tokenizer: str, run: str, steps: int) -> dict:
    """In a fresh process: `steps` training steps of the demo's `stage` config, timed one by one."""
    trainer = single_rank_trainer(
        demo_config_file(stage),
        shards,
        [
            f"data.shards={shards}",
            f"data.text_tokenizer={tokenizer}",
            f"checkpoint.dir={run}",
            "checkpoint.resume=null",
            "optim.warmup_steps=1",
            "data.shuffle_buffer=64",
            *VARIANTS[variant],
        ],
    )
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        trainer.advance()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    trainer.close()
    return {"wall": wall, "cpu": cpu, "chosen": trainer.precision.describe()}


def run_one(stage, variant, shards, tokenizer, run, steps) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps([stage, variant, shards, tokenizer, run, steps]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{stage} {variant}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["backbone", "stage1", "stage2"])
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        print(json.dumps(measure_steps(*json.loads(args.worker))))
        return
    torch.set_num_threads(1)
    load = LoadWatch()
    roofline = {name: matmul_gflops(DTYPES[name], min_seconds=0.2) for name in ("fp32", "bf16")}
    print(
        "matmul 1024^3 roofline, 1 thread: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in roofline.items())
    )
    total = dict.fromkeys(VARIANTS, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            cfg = demo_config(stage, ["data.shards=[x]"])
            model_cfg = model_config(cfg)
            rows = cfg.training.micro_batch_size * model_cfg.seq_length
            probe = choose_precision(
                "auto", "cpu", probe_shape(rows, model_cfg.hidden_size, model_cfg.ffn_size)
            )
            print(
                f"{stage}: {model_cfg.seq_length} tokens x {cfg.training.micro_batch_size} per rank, "
                f"{cfg.training.max_steps} steps in the demo; {probe.describe()}",
                flush=True,
            )
            root = Path(tmp, stage)
            root.mkdir()
            shards, tokenizer = write_data(root, model_cfg, samples=128, stage=cfg.data.stage, num_shards=4)
            times = {p: [] for p in VARIANTS}
            for r in range(args.rounds):
                for index, variant in enumerate(VARIANTS):
                    run = str(root / f"run{index}_{r}")
                    result = run_one(stage, variant, shards, tokenizer, run, args.steps + 2)
                    times[variant] += result[args.clock][2:]
                    if r == 0:
                        print(f"  {variant:19s} -> {result['chosen']}", flush=True)
            load.sample()
            for variant in VARIANTS:
                median = statistics.median(times[variant])
                total[variant] += median * cfg.training.max_steps
                print(
                    f"  {variant:19s}: {median:.3f} s/step {args.clock} (median of {len(times[variant])}, "
                    f"min {min(times[variant]):.3f}) -> {median * cfg.training.max_steps / 60:.1f} min for "
                    f"{cfg.training.max_steps} steps; vs fp32 {median / statistics.median(times['fp32']):.2f}x",
                    flush=True,
                )
    load.sample()
    print(
        f"demo training ({args.clock} time per rank): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in total.items())
    )
    print(f"machine: {load.describe()}")


if __name__ == "__main__":
    main()
