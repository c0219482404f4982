"""How close is cogvideo-plan's predicted peak memory to a real training step?

A plain single-process fp32 step (forward, loss, backward, torch AdamW, zero_grad) of small
presets on the CPU, measured two ways, each case in a fresh process:

- tensors: peak bytes of live tensor storages (cluster.memtrack), during the second step;
- RSS: the process's peak resident memory minus its resident memory before the model was
  built, after a warm-up step of the tiny preset has loaded kernels and lazy imports
  (includes allocator slack and Python objects; peak reset with /proc/self/clear_refs).

The planner's prediction is the same layout: 1 GPU, no ZeRO, fp32, no context/buffers.

    python benchmarks/bench_plan_memory.py [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

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
TARGET = 0.15


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(preset: str, batch: int, ckpt: bool, train_backbone: bool | None, use_tracker: bool) -> dict:
    import torch

    from cluster.memtrack import LiveTensorBytes
    from cluster.plan_memory import Layout, plan_memory
    from cogvideo.config import get_preset
    from cogvideo.model import CogVideoModel

    torch.set_num_threads(1)
    cfg = get_preset(preset).replace(activation_checkpointing=ckpt)
    if train_backbone is not None:
        cfg = cfg.replace(train_backbone=train_backbone)
    torch.manual_seed(0)

    def trainer(cfg):
        model = CogVideoModel(cfg).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))

        def step():
            loss = model.loss(model(tokens), tokens, torch.ones_like(tokens, dtype=torch.bool))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model, step

    warm_cfg = get_preset("tiny-stage2" if cfg.stage == "stage2" else "tiny")
    trainer(warm_cfg.replace(activation_checkpointing=ckpt, train_backbone=cfg.train_backbone))[1]()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    rss_before = _rss_kib("VmRSS")
    model, step = trainer(cfg)

    result = {}
    if use_tracker:
        with LiveTensorBytes() as mem:
            mem.track_all(model.parameters())
            step()  # the first step creates the optimizer states
            mem.reset_peak()
            step()
        result["tensors"] = mem.peak
    else:
        step()
        step()
        result["rss"] = (_rss_kib("VmHWM") - rss_before) * 1024
    layout = Layout(gpus=1, gpus_per_node=1, zero=0, micro_batch=batch, act_ckpt=ckpt, dtype="fp32")
    result["predicted"] = plan_memory(cfg, layout, context_bytes=0).peak
    return result


def run_case(case, use_tracker: bool) -> dict:
    code = ("import json, sys; from benchmarks.bench_plan_memory import measure; "
            f"print(json.dumps(measure(*{case!r}, use_tracker={use_tracker})))")
    # big blocks straight from mmap, so freed tensors leave RSS and it follows live memory
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first three cases only")
    args = ap.parse_args()
    cases = CASES[:3] if args.quick else CASES
    mib = 2 ** 20
    print(f"{'preset':<13} {'batch':>5} {'ckpt':>4} {'backbone':>8} {'predicted':>10} {'tensors':>9} "
          f"{'ratio':>6} {'RSS':>9} {'ratio':>6}   (MiB; ratio = predicted / measured)")
    worst = worst_rss = 0.0
    for case in cases:
        tensors = run_case(case, use_tracker=True)
        rss = run_case(case, use_tracker=False)
        predicted = tensors["predicted"]
        r_tensors, r_rss = predicted / tensors["tensors"], predicted / rss["rss"]
        worst, worst_rss = max(worst, abs(r_tensors - 1)), max(worst_rss, abs(r_rss - 1))
        preset, batch, ckpt, backbone = case
        backbone = "preset" if backbone is None else ("trains" if backbone else "frozen")
        print(f"{preset:<13} {batch:>5} {'yes' if ckpt else 'no':>4} {backbone:>8} {predicted / mib:>10.2f} "
              f"{tensors['tensors'] / mib:>9.2f} {r_tensors:>6.3f} {rss['rss'] / mib:>9.2f} {r_rss:>6.3f}")
    for name, value in (("live-tensor peak", worst), ("RSS peak", worst_rss)):
        verdict = "within" if value <= TARGET else "OUTSIDE"
        print(f"largest deviation from the {name}: {value:.1%} ({verdict} the {TARGET:.0%} target)")


if __name__ == "__main__":
    main()
