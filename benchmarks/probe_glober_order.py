"""GLOBER's order probes: does the phase autoencoder's video encoder put the keyframes' order into
its global feature, and does the video decoder read it (README, GLOBER)?

- reversal: mean |f(v) - f(reversed v)| / mean |f(v) - f(v')| over the probe clips, f the
  encoder's posterior mean and v' the probe clip before v: 0 for an encoder that ignores order, about
  1 when a reversal moves the feature as far as another video does;
- swapped: the decoder's diffusion loss (the model's objective) on the first and last frames of
  the first half of the probe clips, their normalised indices swapped over, against the loss with
  the true ones, at t = 600 / 800 / 999 and one fixed noise: 1.00 for a decoder that reads no order.

The probe clips are the last `--clips` clips of the shards (in the order of their sorted paths),
keyframes and frames at their KL-VAE posterior means (no draw).

    # a converted phase-autoencoder checkpoint (cogvideo-convert zero)
    python benchmarks/probe_glober_order.py --checkpoint MODEL_DIR SHARD.tar [SHARD.tar ...]
    # in process from scratch: configs/demo/glober/train_1_autoencoder.yaml + dotted overrides
    # (model.vae.path is the demo's fitted KL-VAE); Adam at optim.lr after optim.warmup_steps of
    # linear warm-up, then constant; batches of training.micro_batch_size clips drawn from the
    # other clips; the video encoder frozen for model.encoder_frozen_steps; probes every --every steps
    python benchmarks/probe_glober_order.py --train 400 [--every 100] SHARD.tar ... \\
        --set model.vae.path=FIT_DIR training.seed=0 [model.encoder_frozen_steps=0 ...]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from webdataset.tariterators import tarfile_samples

from cogvideo.diffusion.objective import objective_for
from cogvideo.family import build_model
from cogvideo.machine import LoadWatch
from cogvideo.models.glober.batch import example_from_moments
from cogvideo.models.glober.config import GloberConfig
from cogvideo.models.glober.losses import autoencoder_loss
from cogvideo.sampling.models import load_eval_model
from cogvideo.shards import decode_sample
from pretrain.config import load_train_config, model_config
from pretrain.data import expand_shards

PHASE_CONFIG = (
    Path(__file__).resolve().parents[1] / "configs" / "demo" / "glober" / "train_1_autoencoder.yaml"
)
TIMESTEPS = (600, 800, 999)
NOISE_SEED = 12345


def read_moments(shards: list[str]) -> torch.Tensor:
    """Every clip's KL-VAE moments [N, F, 2 C', L, L] of the latent shards, in sorted path order."""
    urls = [{"url": url} for url in expand_shards(shards)]
    return torch.stack(
        [torch.from_numpy(decode_sample(raw).arrays["latents"]).float() for raw in tarfile_samples(urls)]
    )


@dataclass
class ProbeClips:
    keyframes: torch.Tensor  # [N, K, C', L, L] the keyframes' posterior means, scaled
    frames: torch.Tensor  # [N // 2 * 2, C', L, L] frames 0 and F - 1 of the first N // 2 clips
    indices: torch.Tensor  # [N // 2 * 2] their normalised indices, 0 and 1
    noise: torch.Tensor  # like frames, one fixed draw


def probe_clips(cfg: GloberConfig, moments: torch.Tensor) -> ProbeClips:
    means = moments[:, :, : cfg.vae.latent_channels] * cfg.vae.scaling_factor
    pairs = means[: len(means) // 2][:, [0, cfg.num_frames - 1]].flatten(0, 1)
    noise = torch.randn(pairs.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    return ProbeClips(
        means[:, list(cfg.keyframes)], pairs, torch.tensor([0.0, 1.0]).repeat(len(pairs) // 2), noise
    )


@dataclass
class Probes:
    reversal: float  # mean distance of f(v) to f(reversed v)
    other: float  # mean distance of f(v) to f(v')
    std: float  # the posterior's mean standard deviation
    swapped: tuple[float, ...]  # the swapped indices' loss over the true ones, at TIMESTEPS

    def describe(self) -> str:
        swapped = "/".join(f"{s:.2f}" for s in self.swapped)
        return (
            f"reversal / other video {self.reversal / self.other:.3f} (reversal {self.reversal:.2f}, other "
            f"{self.other:.2f}, posterior std {self.std:.3f}); swapped indices' loss at t = "
            f"{'/'.join(map(str, TIMESTEPS))}: {swapped}"
        )


@torch.no_grad()
def reversal(encoder: torch.nn.Module, keyframes: torch.Tensor) -> tuple[float, float]:
    """(mean |f(v) - f(reversed v)|, mean |f(v) - f(v')|): f the posterior mean of keyframes
    [N, K, C', L, L], v' the clip before v (the first one's: the last)."""
    f = encoder(keyframes).mean
    reversed_distance = (f - encoder(keyframes.flip(1)).mean).flatten(1).norm(dim=1).mean()
    other_distance = (f - f.roll(1, 0)).flatten(1).norm(dim=1).mean()
    return float(reversed_distance), float(other_distance)


@torch.no_grad()
def swapped(
    cfg: GloberConfig, decoder: torch.nn.Module, features: torch.Tensor, clips: ProbeClips
) -> tuple[float, ...]:
    """The decoder's loss on `clips`' frame pairs with their indices swapped over the loss with the
    true ones, at each of TIMESTEPS; `features` [N, ...] the probe clips' global features."""
    objective = objective_for(cfg.schedule)
    features = features[: len(clips.frames) // 2].repeat_interleave(2, dim=0)
    ratios = []
    for step in TIMESTEPS:
        t = torch.full((len(clips.frames),), step)
        noisy = objective.noisy(clips.frames, clips.noise, t)
        target = objective.target(clips.frames, clips.noise, t)
        true = objective.loss(decoder(noisy, t, features, clips.indices), target).mean()
        wrong = objective.loss(decoder(noisy, t, features, 1 - clips.indices), target).mean()
        ratios.append(float(wrong / true))
    return tuple(ratios)


@torch.no_grad()
def probe(cfg: GloberConfig, autoencoder: torch.nn.Module, clips: ProbeClips) -> Probes:
    """Both probes of `autoencoder` in eval mode (its mode is restored)."""
    was_training = autoencoder.training
    autoencoder.eval()
    posterior = autoencoder.encoder(clips.keyframes)
    reversed_distance, other_distance = reversal(autoencoder.encoder, clips.keyframes)
    ratios = swapped(cfg, autoencoder.decoder, posterior.mean, clips)
    autoencoder.train(was_training)
    return Probes(reversed_distance, other_distance, float(posterior.std.mean()), ratios)


def train(
    overrides: list[str], moments: torch.Tensor, clips: int, steps: int, every: int
) -> list[tuple[int, Probes]]:
    """The phase autoencoder of PHASE_CONFIG + `overrides` trained from scratch on all clips but the
    last `clips` (the probe clips) for `steps` steps; its probes at step 0 and every `every` steps."""
    train_cfg = load_train_config(str(PHASE_CONFIG), overrides)
    cfg = model_config(train_cfg)
    if cfg.cra_weight > 0:
        raise SystemExit("--train runs the autoencoder's loss alone: set model.cra_weight=0")
    seed, batch_size = train_cfg.training.seed, train_cfg.training.micro_batch_size
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu")
    autoencoder = model.autoencoder
    optimizer = torch.optim.Adam(
        [p for p in autoencoder.parameters() if p.requires_grad], lr=train_cfg.optim.lr
    )
    warmup = max(1, train_cfg.optim.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    probe_set = probe_clips(cfg, moments[-clips:])
    draws = torch.Generator().manual_seed(seed + 1)
    start = time.time()
    results = [(0, probe(cfg, autoencoder, probe_set))]
    print(f"step 0: {results[-1][1].describe()}", flush=True)
    for step in range(steps):
        rows = torch.randint(0, len(moments) - clips, (batch_size,), generator=draws)
        examples = [
            example_from_moments(cfg, moments[row], [], seed * 10**6 + step * batch_size + i)
            for i, row in enumerate(rows.tolist())
        ]
        batch = {key: torch.stack([e[key] for e in examples]) for key in ("keyframes", "frames", "indices")}
        out = autoencoder_loss(
            cfg, autoencoder, model.discriminator, batch, encoder_frozen=step < cfg.encoder_frozen_steps
        )
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % every == 0:
            results.append((step + 1, probe(cfg, autoencoder, probe_set)))
            print(
                f"step {step + 1}: rec {out['rec']:.4f} kl {out['kl']:.1f}; {results[-1][1].describe()}; "
                f"{time.time() - start:.0f} s",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="the GLOBER latent shards (paths, globs or {a..b} braces)")
    parser.add_argument("--clips", type=int, default=32, help="probe clips: the shards' last (default 32)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--checkpoint", help="a converted phase-autoencoder model folder (cogvideo-convert zero)"
    )
    what.add_argument(
        "--train", type=int, metavar="STEPS", help="train from scratch in process for STEPS steps"
    )
    parser.add_argument("--every", type=int, default=100, help="--train: probe every this many steps")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="--train: dotted overrides")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.checkpoint and args.set:
        parser.error("--set overrides the --train configuration only")
    load = LoadWatch()
    moments = read_moments(args.shards)
    if args.clips < 2 or (args.train and len(moments) <= args.clips):
        parser.error(f"{len(moments)} clips: --clips needs 2 or more (and --train other clips to train on)")
    if args.checkpoint:
        model, cfg = load_eval_model(
            args.checkpoint,
            "cpu",
            1,
            lambda c: None if getattr(c, "phase", None) == "autoencoder" else "not a phase-autoencoder model",
        )
        print(
            f"{args.checkpoint}: {probe(cfg, model.autoencoder, probe_clips(cfg, moments[-args.clips :])).describe()}"
        )
    else:
        train(args.set, moments, args.clips, args.train, args.every)
    load.sample()
    print(f"machine: {load.describe()}; {torch.get_num_threads()} torch thread(s)")


if __name__ == "__main__":
    main()
