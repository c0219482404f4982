"""GLOBER's Table 3 here, in one run (random weights: speed and memory do not depend on them):

1. sampling time and peak live tensor memory for 17, 33 and 65 frames of one video (the paper's
   F = 16 / 32 / 64; CogVideo's hierarchy makes 5 keyframes -> 9 -> 17 -> 33 -> 65), GLOBER (DiT,
   then the decoder over every frame index in batches of `frame_batch`, then the KL-VAE to
   pixels) against CogVideo's hierarchical sampler (frame 0, stage-1 keyframes, stage-2
   interpolation levels; image codes, the patch tokenizer's table lookup left out), both at the
   demo's sizes (glober-demo, CogVideo `small`) and with the demo's sampling settings
   (configs/demo/glober/sample.yaml, configs/demo/sample.yaml). CPU seconds are the best of
   `--repeats` runs, the two samplers alternating; memory is a separate run under
   LiveTensorBytes (its per-op bookkeeping stays out of the timings);
2. the video decoder's frames per second against a matmul roofline measured in the same run
   (the FLOPs FlopCounterMode counts for one decoder pass, at this machine's fp32 rate on a
   1024^3 matmul).

    python benchmarks/bench_glober.py [--frames 17 33 65] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.memtrack import LiveTensorBytes
from cogvideo.configio import load_config
from cogvideo.family import any_preset, build_model
from cogvideo.machine import LoadWatch
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.hierarchy import HierarchicalSampler
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.stage_model import StageModel
from cogvideo.models.glober.pipeline import GloberSampleOptions
from cogvideo.models.glober.sampler import GloberSampler, frame_indices
from cogvideo.precision import matmul_gflops
from cogvideo.sampling.strategies import make_strategy

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
LEVELS = {17: 2, 33: 3, 65: 4}  # CogVideo: 5 keyframes and this many interpolation levels
PROMPT = "a red circle moves left"


def glober_model():
    torch.manual_seed(0)
    model = build_model(any_preset("glober-demo-dit"), device="cpu").eval()
    with torch.no_grad():  # off the zero initialisations, so every path computes as trained
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def glober_video(sampler: GloberSampler, frames: int) -> torch.Tensor:
    """One video as GloberPipeline samples it: a caption and the guidance text (token ids made up:
    the cost does not depend on them), the DiT's global feature, `frames` frames, pixels."""
    cfg = sampler.model.cfg
    g = torch.Generator().manual_seed(0)
    text = torch.full((1, cfg.text_length), cfg.vocab.pad_id)
    text[0, -4:] = torch.arange(4) + cfg.vocab.text_offset + 5
    uncond = torch.full_like(text, cfg.vocab.pad_id)
    uncond[0, -1] = cfg.vocab.text_offset + 1
    v = sampler.global_features(text, uncond, torch.randn(1, *cfg.global_shape, generator=g))
    latents = sampler.frames(v, frame_indices(frames), torch.randn(1, frames, *cfg.latent_shape, generator=g))
    return sampler.pixels(latents)  # [1, frames, 3, H, W]


def cogvideo_sampler(frames: int) -> HierarchicalSampler:
    options = load_config(SampleOptions, DEMO / "sample.yaml", [f"interpolation_levels={LEVELS[frames]}"])
    torch.manual_seed(0)
    stages = {}
    for stage in ("stage1", "stage2"):
        cfg = get_preset("small").replace(stage=stage)
        stages[stage] = StageModel(build_model(cfg, device="cpu").eval(), cfg)
    cfg = stages["stage1"].cfg

    def encode(text):
        g = torch.Generator().manual_seed(sum(map(ord, text)))
        return torch.randint(
            cfg.vocab.text_offset, cfg.vocab.text_offset + 50, (cfg.text_length,), generator=g
        )

    strategies = {n: make_strategy(getattr(options, f"{n}_strategy")) for n in ("frame0", "stage1", "stage2")}
    return HierarchicalSampler(stages["stage1"], stages["stage2"], options, encode, strategies)


@torch.no_grad()
def cpu_seconds(run) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


@torch.no_grad()
def peak_bytes(run, params) -> tuple[int, torch.Tensor]:
    """Peak bytes of live CPU tensors during `run`, the weights `params` counted from the start;
    and what `run` returned."""
    with LiveTensorBytes() as mem:
        mem.track_all(params)
        out = run()
    return mem.peak, out


def bench_sampling(frame_counts: list[int], repeats: int) -> None:
    options = load_config(GloberSampleOptions, DEMO / "glober" / "sample.yaml")
    print(
        f"\n1. one video: CPU seconds (best of {repeats}, alternating) and peak live tensors (weights "
        f"included); GLOBER {options.global_steps}+{options.frame_steps} DDIM steps, frame_batch "
        f"{options.frame_batch}; CogVideo configs/demo/sample.yaml"
    )
    print(
        f"{'frames':>7} {'GLOBER s':>9} {'GLOBER MiB':>11} {'CogVideo s':>11} {'CogVideo MiB':>13} "
        f"{'CogVideo / GLOBER time':>23}"
    )
    model = glober_model()
    glober = GloberSampler(model, options.sampling())
    for frames in frame_counts:
        cogvideo = cogvideo_sampler(frames)
        runs = {"glober": lambda: glober_video(glober, frames), "cogvideo": lambda: cogvideo.sample([PROMPT])}
        params = {
            "glober": list(model.parameters()),
            "cogvideo": [p for s in (cogvideo.stage1, cogvideo.stage2) for p in s.model.parameters()],
        }
        best = {name: float("inf") for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                best[name] = min(best[name], cpu_seconds(run))
        mib = {}
        for name, run in runs.items():
            peak, video = peak_bytes(run, params[name])
            assert video.shape[1] == frames, (name, video.shape)  # the video measured is that long
            mib[name] = peak / 2**20
        print(
            f"{frames:>7} {best['glober']:>9.2f} {mib['glober']:>11.1f} {best['cogvideo']:>11.2f} "
            f"{mib['cogvideo']:>13.1f} {best['cogvideo'] / best['glober']:>22.2f}x"
        )


def bench_decoder(rows: int = 64, repeats: int = 3) -> None:
    model = glober_model()
    cfg, decoder = model.cfg, model.autoencoder.decoder
    x = torch.randn(rows, *cfg.latent_shape)
    t = torch.full((rows,), 500)
    v = torch.randn(rows, *cfg.global_shape)
    index = torch.rand(rows)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        decoder(x, t, v, index)
    flops = counter.get_total_flops()
    best = min(cpu_seconds(lambda: decoder(x, t, v, index)) for _ in range(repeats))
    roofline = matmul_gflops(torch.float32, min_seconds=0.3) * 1e9
    print(
        f"\n2. video decoder, {rows} frames per pass ({flops / rows / 1e6:.1f} MFLOP per frame, FlopCounterMode)"
    )
    print(
        f"   {rows / best:,.0f} frames/s per denoising step = {flops / best / 1e9:.2f} GFLOP/s; matmul roofline "
        f"{roofline / 1e9:.1f} GFLOP/s (1024^3 fp32, this run) -> {flops / best / roofline:.0%} of it; "
        f"at the roofline: {rows * roofline / flops:,.0f} frames/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65], choices=sorted(LEVELS))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each sampler (the best counts)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = LoadWatch()
    bench_sampling(args.frames, args.repeats)
    load.sample()
    bench_decoder()
    load.sample()
    print(
        f"\nmachine: {load.describe()}; {torch.get_num_threads()} torch thread(s); CPU seconds of this "
        "process (time.process_time)"
    )


if __name__ == "__main__":
    main()
