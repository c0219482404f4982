"""DSR (CogView2's direct super-resolution) speed and memory, measured in one run (random weights;
speed does not depend on them), at the published grid pair 20 x 20 -> 60 x 60 on a narrow model:

1. the high-res attention: the plain-PyTorch local windows (cogvideo/models/dsr/local_attention.py)
   against the dense-mask path over all low-res + high-res keys, in torch's fused kernels (which
   never hold the scores) and its math kernel (which holds queries x all keys, as the release's
   and any unfused attention does): time and peak memory;
2. super-resolution throughput (one forward + the cluster step over every high-res slot, frames
   `--frames` at a time) in frames/s against the matmul roofline measured here
   (cogvideo.precision.matmul_rates at the run's row count and width): roofline frames/s =
   GFLOP/s / the analytic FLOPs of one frame (cogvideo.models.dsr.planner.sampling_flops).

    python benchmarks/bench_dsr.py [--hidden 256] [--layers 2] [--frames 12] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.memtrack import LiveTensorBytes
from cogvideo.family import any_preset, build_model
from cogvideo.models.dsr.layout import build_example, high_res_keys
from cogvideo.models.dsr.local_attention import Windows, local_attention
from cogvideo.models.dsr.planner import sampling_flops
from cogvideo.models.dsr.sampler import SuperResolution
from cogvideo.precision import matmul_rates, torch_dtype
from cogvideo.sampling.strategies import ClusterStrategy


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"}) or ["none"]
    return f"{model}, {os.cpu_count()} CPUs, bf16 flags: {' '.join(bf16)}"


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    with torch.no_grad():
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of each of `fns` over `repeats` rounds, one call of each per round (after
    one warm-up each), so that a change in the machine's load weighs on every path alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(fn, device: str, inputs: list[torch.Tensor]) -> int:
    """Peak bytes `fn` allocates beyond its `inputs` (on the CPU, a view of an input would
    otherwise count it as new)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with LiveTensorBytes() as mem:
        mem.track_all(inputs)
        base = mem.live
        fn()
    return mem.peak - base


def config(args):
    return (
        any_preset("cogview2-dsr")
        .replace(
            name="bench-dsr", hidden_size=args.hidden, num_heads=args.hidden // 64, num_layers=args.layers
        )
        .validate()
    )


def attention(cfg, args, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    heads, d, N, n = cfg.num_heads, cfg.head_dim, cfg.high_tokens, cfg.tokens_per_frame

    def rnd(rows):
        return torch.randn(args.frames, heads, rows, d, generator=g).to(args.device, dtype)

    q, kh, vh, kl, vl = rnd(N), rnd(N), rnd(N), rnd(n), rnd(n)
    windows = Windows(cfg, q.device)
    mask = high_res_keys(cfg).to(q.device)
    inputs = [q, kh, vh, kl, vl, mask]

    def dense(backends):
        def run():  # as the model's dense path: [low-res; high-res] keys and values, one mask
            keys, values = torch.cat([kl, kh], dim=2), torch.cat([vl, vh], dim=2)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

        return run

    paths = {  # the fused kernels never hold the scores; the math kernel holds queries x all keys
        "local windows": lambda: local_attention(q, kh, vh, kl, vl, windows),
        "dense, fused": dense([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]),
        "dense, math": dense([SDPBackend.MATH]),
    }
    print(
        f"\n1. high-res attention, {args.frames} frames x {heads} heads x {N} queries, d={d}; mask {N} x {n + N}"
    )
    with torch.no_grad():
        seconds = interleaved(paths, args.device, args.repeats)
        results = {name: (seconds[name], peak_bytes(fn, args.device, inputs)) for name, fn in paths.items()}
    for name in paths:
        print(f"   {name:<14} {results[name][0] * 1e3:9.1f} ms   peak {results[name][1] / 2**20:9.1f} MiB")
    t_local, m_local = results["local windows"]
    for name in ("dense, fused", "dense, math"):
        t, m = results[name]
        print(f"   {name} / local: time {t / t_local:.2f}x, memory {m / m_local:.2f}x")


def throughput(cfg, args, dtype) -> None:
    torch.manual_seed(0)
    model = build_model(cfg, args.device).eval().to(dtype)
    labels = torch.arange(cfg.vocab.num_image_tokens) % 500
    sr = SuperResolution(
        model, None, ClusterStrategy(labels, 1.0, 6, 0.6), seed=0, frames_per_batch=args.frames
    )
    g = torch.Generator().manual_seed(1)
    text = [cfg.vocab.text_id(7 + i) for i in range(20)]
    tokens = torch.stack(
        [
            build_example(
                cfg,
                text,
                torch.randint(cfg.vocab.num_image_tokens, (cfg.tokens_per_frame,), generator=g),
                torch.zeros(cfg.high_tokens),
            )[0]
            for _ in range(args.frames)
        ]
    ).to(args.device)
    gens = [torch.Generator().manual_seed(i) for i in range(args.frames)]
    with torch.no_grad():
        seconds = timed(lambda: sr.sample(tokens, gens), args.device, args.repeats)
    rows = args.frames * cfg.seq_length
    [gflops] = matmul_rates([dtype], (rows, cfg.hidden_size, cfg.ffn_size), args.device, min_seconds=1.0)
    per_frame = sampling_flops(cfg)
    measured, roofline = args.frames / seconds, gflops * 1e9 / per_frame
    print(
        f"\n2. super-resolution, {args.frames} frames per step, {cfg.num_layers} layers x {cfg.hidden_size} wide"
    )
    print(f"   step {seconds:.3f} s -> {measured:.2f} frames/s; {per_frame / 1e9:.2f} GFLOP per frame")
    print(
        f"   matmul roofline [{rows} x {cfg.hidden_size}] @ [{cfg.hidden_size} x {cfg.ffn_size}]: {gflops:.1f} GFLOP/s"
    )
    print(f"   -> {roofline:.2f} frames/s at the roofline; measured {100 * measured / roofline:.1f} % of it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12, help="frames per step (the release: 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    cfg, dtype = config(args), torch_dtype(args.dtype)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(
        f"machine: {machine(args.device)}; load average {load[0]:.2f}; {torch.get_num_threads()} threads; {args.dtype}"
    )
    print(
        f"grid {cfg.frame_tokens}x{cfg.frame_tokens} -> {cfg.high_frame_tokens}x{cfg.high_frame_tokens}, windows "
        f"{cfg.high_window_rows}x{cfg.high_window_cols} high-res + {cfg.low_window}x{cfg.low_window} low-res"
    )
    attention(cfg, args, dtype)
    throughput(cfg, args, dtype)


if __name__ == "__main__":
    main()
