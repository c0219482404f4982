"""HPDM in one run (random weights: speed and memory do not depend on them):

1. sampling time and peak live tensor memory at 1x, 2x and 4x the demo's side (the pyramid
   tiles any size its patches cover: more tiles per level), with and without the coarser
   levels' activation cache (without it every tile of every step recomputes the coarser tiles it
   reads; the paper measured the cache about 40 % faster); one tile per forward in both;
2. one training step (forward + backward of the EDM pyramid loss) against a matmul roofline
   measured here: the same weight products run bare (F.linear over every linear layer at the row
   count it sees in the step, each (block, level) run that adaptive computation makes).

    python benchmarks/bench_hpdm.py [--preset hpdm-demo] [--steps 8] [--sides 1 2 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time

import torch
import torch.nn.functional as F

from benchmarks.memtrack import LiveTensorBytes
from cogvideo.family import build_model, resolve_model_section
from cogvideo.models.hpdm import planner
from cogvideo.models.hpdm.loss import null_condition, pyramid_loss, training_example
from cogvideo.models.hpdm.sampler import PyramidOptions, PyramidSampler


def machine() -> str:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = re.search(r"model name\s*:\s*(.*)", flags)
    bf16 = sorted(set(re.findall(r"amx_bf16|avx512_bf16", flags)))
    load = os.getloadavg()
    return (
        f"{model.group(1) if model else platform.processor()}, bf16 flags {bf16 or 'none'}, "
        f"{torch.get_num_threads()} thread(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def sample_once(model, cfg, side: int, cache: bool, steps: int) -> tuple[float, int]:
    base = cfg.video_size
    output = (base[0], base[1] * side, base[2] * side)
    # one tile per forward either way: the uncached sampler recomputes per tile, so batching
    # tiles in the cached one only would mix the batching's gain into the cache's
    sampler = PyramidSampler(model, cfg, PyramidOptions(steps=steps, cache=cache, tiles_per_batch=1))
    cond = torch.zeros(1, dtype=torch.long) if cfg.condition == "class" else null_condition(cfg)[None]
    with LiveTensorBytes() as mem:
        mem.track_all(model.parameters())
        start = time.perf_counter()
        sampler.sample(cond, null_condition(cfg)[None], torch.Generator().manual_seed(0), output=output)
        seconds = time.perf_counter() - start
    return seconds, mem.peak


def bench_sampling(model, cfg, sides: list[int], steps: int) -> None:
    print(f"\n1. sampling, {steps} steps at level 1 (halved per level), tiles at 50 % overlap")
    print(
        f"{'side':>6} {'output':>14} {'cache s':>9} {'no cache s':>11} {'speed-up':>9} {'cache MiB':>10} {'no cache MiB':>13}"
    )
    for side in sides:
        cached, cached_mem = sample_once(model, cfg, side, True, steps)
        plain, plain_mem = sample_once(model, cfg, side, False, steps)
        size = f"{cfg.video_size[0]}x{cfg.video_size[1] * side}x{cfg.video_size[2] * side}"
        print(
            f"{side:>5}x {size:>14} {cached:>9.2f} {plain:>11.2f} {plain / cached:>8.2f}x "
            f"{cached_mem / 2**20:>10.1f} {plain_mem / 2**20:>13.1f}"
        )


def linear_rows(model, cfg, batch: int) -> list[tuple[torch.nn.Linear, int]]:
    """Every linear layer with the rows it multiplies in one training step's forward."""
    tokens, latents = cfg.tokens_per_patch, planner.latent_tokens(cfg)
    rows = []
    for b, block in enumerate(model.blocks):
        for level in cfg.levels_of_block(b):
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear) and ".modulation" not in f".{name}":
                    interface_side = (
                        name.startswith(("fuse", "write.q", "write.out", "write_ff")) or name == "read.kv"
                    )
                    if name == "fuse" and level == 1:
                        continue
                    rows.append((module, batch * (tokens if interface_side else latents)))
    levels = cfg.num_levels * batch * tokens
    rows += [(model.tokenizer, levels), (model.coordinates, levels), (model.head, levels)]
    return rows


def bench_training(model, cfg, batch: int, repeats: int) -> None:
    video = torch.randint(0, 256, (*cfg.video_size, 3), dtype=torch.uint8)
    condition = torch.tensor(0) if cfg.condition == "class" else null_condition(cfg)
    examples = [training_example(cfg, video, condition, seed) for seed in range(batch)]
    tensors = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        pyramid_loss(cfg, model, tensors, torch.device("cpu")).backward()

    inputs = [(torch.randn(rows, layer.in_features), layer) for layer, rows in linear_rows(model, cfg, batch)]

    def roofline():  # the same products bare: forward, input gradient and weight gradient
        for x, layer in inputs:
            y = F.linear(x, layer.weight)
            g = torch.randn_like(y)
            g @ layer.weight, g.t() @ x

    best_step, best_bare = float("inf"), float("inf")
    step(), roofline()
    for _ in range(repeats):  # taking turns, so changing load hits both alike; the fastest counts
        start = time.perf_counter()
        step()
        best_step = min(best_step, time.perf_counter() - start)
        start = time.perf_counter()
        roofline()
        best_bare = min(best_bare, time.perf_counter() - start)
    flops = planner.train_flops(cfg, batch)
    print(
        f"\n2. training step, batch {batch}: {best_step * 1e3:.1f} ms ({flops / best_step / 1e9:.2f} GFLOP/s)"
    )
    print(
        f"   the same weight products bare: {best_bare * 1e3:.1f} ms -> step at {best_bare / best_step:.0%} of the roofline"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="hpdm-demo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sides", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_model_section({"family": "hpdm", "preset": args.preset})
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    print(f"{planner.describe(cfg)}\n{machine()}")
    with torch.no_grad():
        bench_sampling(model.eval(), cfg, args.sides, args.steps)
    bench_training(model, cfg, args.batch, args.repeats)
    print(f"\n{machine()}")


if __name__ == "__main__":
    main()
