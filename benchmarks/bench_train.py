"""Training throughput of the full stack (1 rank) against the fastest plain PyTorch loop, in one run.

    python benchmarks/bench_train.py [--preset small] [--batch 8] [--steps 10] [--precisions fp32 auto]
    python benchmarks/bench_train.py --threads 1 --clock cpu   # on a CPU shared with other jobs
    python benchmarks/bench_train.py --profile 10              # and where the step's time goes

Full stack = `pretrain.train.Trainer.advance` (one step of the training loop): shard loader
thread, DeepSpeed engine at the ZeRO stage the trainer resolves for one rank (`parallel.zero_stage:
auto`: 0 in fp32, stepping the trainer's GuardedAdamW; 2 in bf16), NaN guard, signal check,
metrics (JSONL + TensorBoard).
Bare loops = the same model, batch and optimizer settings with nothing around them: the stack's
parameter groups, torch AdamW (foreach, and fused), clip_grad_norm_; in bf16 with fp32 master
weights as DeepSpeed keeps them, and attention computed as the trainer chose (`BareLoop`). The
three alternate step by step; the faster bare loop is the baseline. Each precision in
--precisions runs in turn: `auto` is what the trainer resolves it to on this machine (it times
the run's own step; pretrain/step_probe.py), bf16's attention too (cogvideo.sdpa).
Achieved FLOP/s (analytic, cogvideo.models.cogvideo.flops) is compared with the fp32 1024^3 matmul timed here
(`cogvideo.precision.matmul_gflops`). Targets: stack tokens/s >= 0.9x the faster bare loop;
stack >= 40% of the fp32 matmul rate. The CPU, its bf16 flags and the load average during the
run are printed with the ratios (`cogvideo.machine`).
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

from cogvideo.environment import apply_defaults  # noqa: E402
from cogvideo.family import build_model, family_of  # noqa: E402
from cogvideo.machine import LoadWatch  # noqa: E402
from cogvideo.models.cogvideo.config import get_preset  # noqa: E402
from cogvideo.models.cogvideo.flops import train_flops  # noqa: E402
from cogvideo.precision import matmul_gflops, torch_dtype  # noqa: E402
from cogvideo.sdpa import fp32_attention  # noqa: E402
from cogvideo.shards import ClipMeta, encode_sample  # noqa: E402
from cogvideo.tokenizers.text import train_text_tokenizer  # noqa: E402
from pretrain.launch import free_port  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402


def write_data(root: Path, cfg, samples: int, stage: int = 1, num_shards: int = 1) -> tuple[list[str], str]:
    """Random-token samples of `cfg`'s layout in `num_shards` tar files written as cogvideo-prep
    writes them (whole-second times: no PAX header per member, which the loader would parse),
    and a text tokenizer."""
    rng = np.random.default_rng(0)
    side = cfg.frame_tokens
    paths = [str(root / f"bench-{i:03d}.tar") for i in range(num_shards)]
    captions = [f"a red ball moves {i % 7} steps left" for i in range(samples)]
    for shard, path in enumerate(paths):
        with wds.TarWriter(path, encoder=False, mtime=0) as sink:  # as data prep writes them
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
                sink.write(encode_sample(f"b{i}", {"frames": frames}, captions[i], meta))
    tokenizer = train_text_tokenizer(
        captions, root / "text", min(200, cfg.vocab.num_text_tokens), byte_fallback=False, preset=cfg.name
    )
    return paths, str(tokenizer)


def first_batch(args, model_cfg, shards: list[str], tokenizer: str):
    from cogvideo.tokenizers.text import TextTokenizer
    from pretrain.config import DataConfig
    from pretrain.data import ShardLoader

    encode = TextTokenizer(tokenizer, model_cfg.vocab).encode
    loader = ShardLoader(shards, model_cfg, encode, DataConfig(stage=1), micro_batch_size=args.batch, seed=0)
    return next(iter(loader))


def make_trainer(args, root: Path, shards: list[str], tokenizer: str, precision: str = "fp32"):
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
            f"parallel.precision={precision}",
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
    return Trainer(cfg, model_cfg, shards, text_encoder(cfg, model_cfg), resume=None)


class BareLoop:
    """The fastest plain PyTorch loop a user would write around the same model, batch and
    optimizer settings: the stack's parameter groups (`pretrain.optim.param_groups`: no decay on
    norms, biases and gates), AdamW (`foreach` or `fused`) with the run's lr, betas, eps and decay,
    `clip_grad_norm_` (foreach) at the run's clip, in the run's precision: fp32, or bf16 weights
    with fp32 master copies that AdamW steps (DeepSpeed's bf16 scheme), its attention computed as
    the run's (`parallel.attention_precision`, cogvideo.sdpa). One call is one step."""

    def __init__(self, cfg, model_cfg, batch, implementation: str):
        o = cfg.optim
        torch.manual_seed(cfg.training.seed)
        self.family, self.model_cfg, self.batch, self.clip = (
            family_of(model_cfg),
            model_cfg,
            batch,
            o.grad_clip,
        )
        self.model = build_model(model_cfg)
        self.fp32_attention = cfg.parallel.attention_precision == "fp32"  # sdpa casts bf16/fp16 only
        groups = param_groups(self.model, o.weight_decay)
        self.low = [p for g in groups for p in g["params"]]
        if cfg.parallel.precision == "fp32":
            self.high = self.low
        else:
            self.model.to(torch_dtype(cfg.parallel.precision))
            groups = [
                {**g, "params": [p.detach().float().requires_grad_() for p in g["params"]]} for g in groups
            ]
            self.high = [p for g in groups for p in g["params"]]
        kind = {implementation: True}  # foreach=True or fused=True
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kind)

    def __call__(self) -> None:
        with fp32_attention(self.fp32_attention):
            loss = self.family.loss(self.model_cfg, self.model, self.batch, "cpu")
            loss.backward()
        if self.high is not self.low:
            for low, high in zip(self.low, self.high):
                high.grad, low.grad = low.grad.float(), None
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.high, self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.high is not self.low:
            with torch.no_grad():
                torch._foreach_copy_(self.low, self.high)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternate(runners: dict, steps: int, warmup: int, clock) -> dict[str, float]:
    """Median seconds per call of each runner, single calls taking turns (so that the drifting
    load of a shared machine hits all alike), after `warmup` calls each."""
    took = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, run in runners.items():
            start = clock()
            run()
            if i >= warmup:
                took[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in took.items()}


def operator_times(run, calls: int) -> dict[str, float]:
    """Self CPU milliseconds per call of each operator (and profiled Python region) of `run`,
    under torch.profiler over `calls` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    return {event.key: event.self_cpu_time_total / 1000 / calls for event in prof.key_averages()}


def compare(args, root: Path, shards, tokenizer, precision: str, batch) -> dict:
    """The stack in `precision` (auto: as the trainer resolves it) against both bare loops in
    the precision it runs; seconds per step and what ran (and, with --profile, each runner's
    operator times)."""
    trainer = make_trainer(args, root / precision, shards, tokenizer, precision)
    runs = trainer.cfg.parallel.precision
    runners = {"stack": trainer.advance}
    for implementation in ("foreach", "fused"):
        runners[f"bare {implementation}"] = BareLoop(trainer.cfg, trainer.model_cfg, batch, implementation)
    seconds = alternate(runners, args.steps, args.warmup, CLOCKS[args.clock])
    profiles = (
        {name: operator_times(run, args.profile) for name, run in runners.items()} if args.profile else {}
    )
    trainer.close()
    return {
        "precision": runs,
        "zero_stage": trainer.cfg.parallel.zero_stage,
        "choice": trainer.precision.describe(),
        "seconds": seconds,
        "profiles": profiles,
    }


def where_the_time_goes(profiles: dict[str, dict[str, float]], bare: str, rows: int = 8) -> None:
    """The stack's costliest operators, and those it spends more on than the bare loop `bare`."""
    stack, base = profiles["stack"], profiles[bare]
    extra = {name: stack.get(name, 0.0) - base.get(name, 0.0) for name in {*stack, *base}}
    width = min(60, max(map(len, extra), default=0))

    def row(name: str, mine: float, theirs: float) -> str:
        return f"    {name[:width]:{width}s} {mine:8.2f} {theirs:8.2f} {mine - theirs:+8.2f}"

    header = f"    {'operator (self CPU ms per step)':{width}s} {'stack':>8s} {'bare':>8s} {'extra':>8s}"
    for title, order in (
        (
            f"where the stack's step goes (torch.profiler; bare = {bare}):",
            sorted(stack, key=stack.get, reverse=True),
        ),
        ("what the stack spends more on than the bare loop:", sorted(extra, key=extra.get, reverse=True)),
    ):
        print(f"  {title}\n{header}")
        for name in order[:rows]:
            print(row(name, stack.get(name, 0.0), base.get(name, 0.0)))
    print(row("all operators", sum(stack.values()), sum(base.values())))


def report(args, model_cfg, result: dict, peak: float) -> dict:
    tokens = args.batch * model_cfg.seq_length
    flops = train_flops(model_cfg, batch=args.batch)
    seconds = result["seconds"]
    bare = min((name for name in seconds if name.startswith("bare")), key=seconds.get)
    for name, t in seconds.items():
        print(
            f"  {name:13s}: {tokens / t:9.0f} tokens/s  {flops / t / 1e9:8.2f} GFLOP/s  "
            f"{flops / t / peak:6.1%} of the fp32 matmul"
        )
    ratio = seconds[bare] / seconds["stack"]
    print(
        f"  stack / bare ({bare}, the faster) tokens/s: {ratio:.3f} (target >= 0.9); "
        f"stack at {flops / seconds['stack'] / peak:.1%} of the fp32 1024^3 matmul (target >= 40%)"
    )
    if result["profiles"]:
        where_the_time_goes(result["profiles"], bare)
    return {"stack_vs_bare": ratio, "stack_vs_matmul": flops / seconds["stack"] / peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"], choices=["fp32", "bf16", "auto"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the timing, profile STEPS more steps of each runner (torch.profiler) and print "
        "where the stack's step goes and what it spends more on than the faster bare loop",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time (all its threads, the loader's included), steady when "
        "other jobs share the cores; needs --threads 1",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU time of several threads is not a step time)")
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_defaults()
    load = LoadWatch()
    model_cfg = get_preset(args.preset)
    print(
        f"preset {args.preset}, batch {args.batch} x {model_cfg.seq_length} tokens, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, median of {args.steps} alternating steps"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, tokenizer = write_data(root, model_cfg, samples=64)
        batch = first_batch(args, model_cfg, shards, tokenizer)
        for precision in args.precisions:
            result = compare(args, root, shards, tokenizer, precision, batch)
            results[precision] = result
            load.sample()
    peak = matmul_gflops(torch.float32, min_seconds=0.2) * 1e9
    print(f"matmul 1024^3 fp32: {peak / 1e9:.1f} GFLOP/s (measured in this run, {args.clock} clock)")
    for precision, result in results.items():
        choice = f"{result['choice']}; " if precision != "fp32" else ""
        print(f"{precision} ({choice}ZeRO-{result['zero_stage']}):")
        result.update(report(args, model_cfg, result, peak))
    load.sample()
    print(f"machine: {load.describe()}")


if __name__ == "__main__":
    main()
