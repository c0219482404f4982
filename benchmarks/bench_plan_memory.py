"""How close is cogvideo-plan's predicted peak memory to a real training step?

A plain single-process fp32 step (forward, loss, backward, torch AdamW, zero_grad) of small
presets on the CPU, measured two ways, each case in a fresh process:

- tensors: peak bytes of live tensor storages (benchmarks/memtrack.py), during the second step;
- RSS: the process's peak resident memory minus its resident memory before the model was
  built, after a warm-up step of the tiny preset has loaded kernels and lazy imports
  (includes allocator slack and Python objects; peak reset with /proc/self/clear_refs).

The planner's prediction is the same layout: 1 GPU, no ZeRO, fp32, no context/buffers.
The TP=2 cases run two gloo processes (megatron's parallel layers) and measure rank 0's tensors.

    python benchmarks/bench_plan_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

from cogvideo.machine import LoadWatch

CASES = [  # preset, micro-batch, activation checkpointing, train_backbone (None: preset's)
    ("tiny", 8, False, None),
    ("tiny-stage2", 8, False, None),
    ("small", 1, False, None),
    ("small", 8, False, None),
    ("small", 8, True, None),
    ("small", 8, False, False),
    ("small-stage2", 8, False, False),
    ("small", 32, False, False),
]
TP_CASES = [("small", 4, False, False), ("small-stage2", 4, True, None)]
TARGET = 0.15


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trainer(cfg, batch):
    import torch

    from cogvideo.family import build_model

    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))

    def step():
        loss = model.loss(model(tokens), tokens, torch.ones_like(tokens, dtype=torch.bool))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def _config(preset, ckpt, train_backbone):
    from cogvideo.models.cogvideo.config import get_preset

    cfg = get_preset(preset).replace(activation_checkpointing=ckpt)
    return cfg if train_backbone is None else cfg.replace(train_backbone=train_backbone)


def _tracked_peak(model, step) -> int:
    from benchmarks.memtrack import LiveTensorBytes

    with LiveTensorBytes() as mem:
        mem.track_all(model.parameters())
        step()  # the first step creates the optimizer states
        mem.reset_peak()
        step()
    return mem.peak


def _predicted(cfg, batch, ckpt, tp=1) -> float:
    from cluster.plan_memory import Layout, plan_memory

    layout = Layout(gpus=tp, gpus_per_node=tp, tp=tp, zero=0, micro_batch=batch, act_ckpt=ckpt, dtype="fp32")
    return plan_memory(cfg, layout, context_bytes=0).peak


def measure(preset: str, batch: int, ckpt: bool, train_backbone: bool | None, use_tracker: bool) -> dict:
    import torch

    from cogvideo.models.cogvideo.config import get_preset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _config(preset, ckpt, train_backbone)
    if use_tracker:
        return {"tensors": _tracked_peak(*_trainer(cfg, batch)), "predicted": _predicted(cfg, batch, ckpt)}
    warm_cfg = get_preset("tiny-stage2" if cfg.stage == "stage2" else "tiny")
    _trainer(warm_cfg.replace(activation_checkpointing=ckpt, train_backbone=cfg.train_backbone), batch)[1]()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    rss_before = _rss_kib("VmRSS")
    step = _trainer(cfg, batch)[1]
    step()
    step()
    return {"rss": (_rss_kib("VmHWM") - rss_before) * 1024, "predicted": _predicted(cfg, batch, ckpt)}


def _tp_worker(rank: int, port: int, case, queue) -> None:
    import torch

    from cogvideo import parallel

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    parallel.init_distributed(tensor_parallel=2, backend="gloo")
    preset, batch, ckpt, train_backbone = case
    cfg = _config(preset, ckpt, train_backbone)
    torch.manual_seed(0)
    peak = _tracked_peak(*_trainer(cfg, batch))
    if rank == 0:
        queue.put(peak)
    parallel.destroy()


def measure_tp(case) -> dict:
    import torch.multiprocessing as mp

    from pretrain.launch import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_tp_worker, args=(port, case, queue), nprocs=2, start_method="spawn")
    preset, batch, ckpt, train_backbone = case
    return {
        "tensors": queue.get(timeout=60),
        "predicted": _predicted(_config(preset, ckpt, train_backbone), batch, ckpt, 2),
    }


def run_case(case, use_tracker: bool) -> dict:
    code = (
        "import json, sys; from benchmarks.bench_plan_memory import measure; "
        f"print(json.dumps(measure(*{case!r}, use_tracker={use_tracker})))"
    )
    # big blocks straight from mmap, so freed tensors leave RSS and it follows live memory
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first three cases only")
    args = ap.parse_args()
    cases = CASES[:3] if args.quick else CASES
    load = LoadWatch()
    mib = 2**20
    print(
        f"{'preset':<13} {'batch':>5} {'ckpt':>4} {'backbone':>8} {'predicted':>10} {'tensors':>9} "
        f"{'ratio':>6} {'RSS':>9} {'ratio':>6}   (MiB; ratio = predicted / measured)"
    )
    worst = worst_rss = 0.0
    for case in cases:
        tensors = run_case(case, use_tracker=True)
        rss = run_case(case, use_tracker=False)
        predicted = tensors["predicted"]
        r_tensors, r_rss = predicted / tensors["tensors"], predicted / rss["rss"]
        worst, worst_rss = max(worst, abs(r_tensors - 1)), max(worst_rss, abs(r_rss - 1))
        preset, batch, ckpt, backbone = case
        backbone = "preset" if backbone is None else ("trains" if backbone else "frozen")
        print(
            f"{preset:<13} {batch:>5} {'yes' if ckpt else 'no':>4} {backbone:>8} {predicted / mib:>10.2f} "
            f"{tensors['tensors'] / mib:>9.2f} {r_tensors:>6.3f} {rss['rss'] / mib:>9.2f} {r_rss:>6.3f}"
        )
    print(f"\ntensor parallel, 2 gloo processes, rank 0 {'predicted':>10} {'tensors':>9} {'ratio':>6}")
    for case in TP_CASES[:1] if args.quick else TP_CASES:
        result = measure_tp(case)
        ratio = result["predicted"] / result["tensors"]
        worst = max(worst, abs(ratio - 1))
        preset, batch, ckpt, _ = case
        print(
            f"{preset:<13} TP 2 micro-batch {batch}{' ckpt' if ckpt else '     '}          "
            f"{result['predicted'] / mib:>10.2f} {result['tensors'] / mib:>9.2f} {ratio:>6.3f}"
        )
    for name, value in (("live-tensor peak", worst), ("RSS peak", worst_rss)):
        verdict = "within" if value <= TARGET else "OUTSIDE"
        print(f"largest deviation from the {name}: {value:.1%} ({verdict} the {TARGET:.0%} target)")
    load.sample()
    print(f"machine: {load.describe()}")


if __name__ == "__main__":
    main()
