"""Training throughput of the full stack (1 rank) against a bare PyTorch loop, in one run.

    python benchmarks/bench_train.py [--preset small] [--batch 8] [--steps 20]

Full stack = `pretrain.train.Trainer.advance` (one step of the training loop): shard loader
thread, DeepSpeed engine (ZeRO-2, fp32), NaN guard, signal check, metrics (JSONL + TensorBoard).
Bare loop = the same model and batch with torch.optim.AdamW and clip_grad_norm_. The two
alternate step by step.
Both run in fp32 (the bare loop has no bf16 master-weight scheme to match DeepSpeed's). Achieved
FLOP/s (analytic, cogvideo.flops) is compared with the fp32 1024^3 matmul roofline timed here
(`cogvideo.precision.matmul_gflops`, the shared helper). Target: stack tokens/s >= 0.9x the bare loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cogvideo.config import get_preset  # noqa: E402
from cogvideo.environment import apply_defaults  # noqa: E402
from cogvideo.family import build_model  # noqa: E402
from cogvideo.flops import train_flops  # noqa: E402
from cogvideo.precision import matmul_gflops  # noqa: E402
from cogvideo.shards import ClipMeta, encode_sample  # noqa: E402
from cogvideo.tokenizers.text import train_text_tokenizer  # noqa: E402
from pretrain.launch import free_port  # noqa: E402


def write_data(root: Path, cfg, samples: int, stage: int = 1, num_shards: int = 1) -> tuple[list[str], str]:
    """Random-token samples of `cfg`'s layout in `num_shards` tar files, and a text tokenizer."""
    rng = np.random.default_rng(0)
    side = cfg.frame_tokens
    paths = [str(root / f"bench-{i:03d}.tar") for i in range(num_shards)]
    captions = [f"a red ball moves {i % 7} steps left" for i in range(samples)]
    for shard, path in enumerate(paths):
        with wds.TarWriter(path) as sink:
            for i in range(shard, samples, num_shards):
                frames = rng.integers(0, cfg.vocab.num_image_tokens, (cfg.num_frames, side, side))
                meta = ClipMeta(
                    duration=4.0 / stage,
                    fps=float(stage),
                    stage=stage,
                    source="bench",
                    clip_start=0.0,
                    clip_end=4.0 / stage,
                    num_frames=cfg.num_frames,
                )
                sink.write(encode_sample(f"b{i}", frames, captions[i], meta))
    tokenizer = train_text_tokenizer(
        captions, root / "text", min(200, cfg.vocab.num_text_tokens), byte_fallback=False
    )
    return paths, str(tokenizer)


def first_batch(args, model_cfg, shards: list[str], tokenizer: str):
    from cogvideo.tokenizers.text import TextTokenizer
    from pretrain.config import DataConfig
    from pretrain.data import ShardLoader

    encode = TextTokenizer(tokenizer, model_cfg.vocab).encode
    loader = ShardLoader(shards, model_cfg, encode, DataConfig(stage=1), micro_batch_size=args.batch, seed=0)
    return next(iter(loader))


def make_trainer(args, root: Path, shards: list[str], tokenizer: str):
    return single_rank_trainer(
        None,
        shards,
        [
            f"model.preset={args.preset}",
            f"data.shards=[{shards[0]}]",
            f"data.text_tokenizer={tokenizer}",
            "data.shuffle_buffer=16",
            f"training.micro_batch_size={args.batch}",
            "optim.warmup_steps=5",
            "parallel.zero_stage=2",
            "parallel.precision=fp32",
            f"checkpoint.dir={root / 'run'}",
        ],
    )


def single_rank_trainer(config: str | None, shards: list[str], overrides: list[str]):
    """The trainer as the only rank of this process, stepped by the caller: it never stops,
    checkpoints or logs on its own."""
    from pretrain.config import check_config, load_train_config
    from pretrain.startup import text_encoder
    from pretrain.train import Trainer

    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    never = 10**6
    cfg = load_train_config(
        config,
        [
            f"training.max_steps={never}",
            f"checkpoint.every_steps={never}",
            f"logging.every_steps={never}",
            "logging.progress_bar=false",
            *overrides,
        ],
    )
    model_cfg = check_config(cfg, 1)
    return Trainer(cfg, model_cfg, shards, text_encoder(cfg, model_cfg.vocab), resume=None)


def bare_loop(model_cfg, batch):
    """The same model, optimizer and batch with nothing around them; returns a step function."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def step():
        loss = model.loss(model(batch.tokens), batch.targets, batch.loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    apply_defaults()
    model_cfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, tokenizer = write_data(root, model_cfg, samples=64)
        batch = first_batch(args, model_cfg, shards, tokenizer)
        trainer, bare_step = make_trainer(args, root, shards, tokenizer), bare_loop(model_cfg, batch)
        # alternate single steps so that the (shared, drifting) machine load hits both alike
        stack, bare = [], []
        for _ in range(args.warmup + args.steps):
            stack.append(timed(trainer.advance))
            bare.append(timed(bare_step))
        trainer.close()
        stack, bare = stack[args.warmup :], bare[args.warmup :]
    peak = matmul_gflops(torch.float32, min_seconds=0.2) * 1e9
    tokens = args.batch * model_cfg.seq_length
    flops = train_flops(model_cfg, batch=args.batch)
    t_stack, t_bare = statistics.median(stack), statistics.median(bare)
    print(
        f"preset {args.preset}, batch {args.batch} x {model_cfg.seq_length} tokens, {torch.get_num_threads()} threads, "
        f"precision fp32, median step time of {args.steps} alternating steps each"
    )
    print(f"bare PyTorch loop : {tokens / t_bare:10.0f} tokens/s  {flops / t_bare / 1e9:7.2f} GFLOP/s")
    print(f"full stack (1 rank): {tokens / t_stack:10.0f} tokens/s  {flops / t_stack / 1e9:7.2f} GFLOP/s")
    print(f"matmul 1024^3 fp32 : {peak / 1e9:7.2f} GFLOP/s (roofline, this run)")
    print(f"stack / bare tokens/s  : {t_bare / t_stack:.3f}  (target >= 0.9)")
    print(f"stack FLOP/s / matmul  : {flops / t_stack / peak:.3f}")
    print(f"bare  FLOP/s / matmul  : {flops / t_bare / peak:.3f}")


if __name__ == "__main__":
    main()
