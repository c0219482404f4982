"""`cogvideo-train --config FILE.yaml [dotted.key=value ...]`: the training entry point.

Launched once per rank by torchrun, the deepspeed launcher or srun. Order of start-up:
config checks (exit 2 on a bad config, before any process group) -> torch.distributed ->
megatron-core tensor-parallel groups -> model -> deepspeed.initialize(mpu=...) -> resume ->
loader at the saved position -> loop.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from cogvideo import parallel
from cogvideo.configio import ConfigError, config_parser
from pretrain.checkpoint import CheckpointManager, find_resume
from pretrain.config import (TrainConfig, check_config, check_text_tokenizer, data_stage, load_train_config,
                             world_size_from_env)
from pretrain.data import Batch, LoaderPosition, ShardLoader, expand_shards, prefetched
from pretrain.metrics import MetricsLogger, Throughput
from pretrain.optim import deepspeed_config, lr_scheduler, param_groups

log = logging.getLogger("pretrain")

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    pass


def env_from_slurm() -> None:
    """srun starts one task per rank with SLURM_* variables; torch.distributed reads RANK & co."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def text_encoder(cfg: TrainConfig, vocab):
    from cogvideo.tokenizers.text import TextTokenizer

    return TextTokenizer(cfg.data.text_tokenizer, vocab).encode


def initial_state(cfg: TrainConfig, model_cfg, tp_rank: int, tp_size: int) -> dict | None:
    """This TP rank's starting weights from init.weights / init.backbone, or None (from scratch).

    A backbone is read as this rank's shard only: the temporal channel copies the spatial one
    and follows the same split rules, so initialising the shard gives the shard of the init."""
    from cogvideo.checkpoint import load_model_state
    from cogvideo.model import init_video_from_backbone

    if cfg.init.weights:
        return load_model_state(cfg.init.weights, tp_rank, tp_size)
    if cfg.init.backbone:
        return init_video_from_backbone(load_model_state(cfg.init.backbone, tp_rank, tp_size), model_cfg)
    return None


class Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg, shards: list[str]):
        import deepspeed

        from cogvideo.model import CogVideoModel
        from cogvideo.flops import train_flops

        self.cfg, self.model_cfg = cfg, model_cfg
        parallel.init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.backend)
        self.rank = dist.get_rank()
        parallel.manual_seed(cfg.training.seed)  # replicated parameters agree on every rank
        with parallel.device():  # built where it runs: megatron's layers initialise on the GPU
            model = CogVideoModel(model_cfg)
        state = initial_state(cfg, model_cfg, parallel.tp_rank(), parallel.tp_size())
        if state is not None:
            model.load_state_dict(state)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=deepspeed_config(cfg, parallel.dp_size()), mpu=parallel.mpu(),
            lr_scheduler=lr_scheduler(cfg))
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last, cfg.checkpoint.export_full)
        self.step, position = 0, LoaderPosition()
        self.saved_at = -1
        resume = find_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)
        if resume is not None:
            self.step, position = self.checkpoints.load(self.engine, resume)  # RNG states included
            self.saved_at = self.step
            self._info(f"resumed from {resume} at step {self.step}")
        else:  # randomness from here on differs between DP ranks, agrees between TP peers
            torch.manual_seed(cfg.training.seed + 1 + parallel.dp_rank())
            if cfg.init.optimizer:
                self.step = self._restore_optimizer(cfg.init.weights)

        loader = ShardLoader(shards, model_cfg, text_encoder(cfg, model_cfg.vocab),
                             micro_batch_size=cfg.training.micro_batch_size, stage=data_stage(cfg, model_cfg),
                             seed=cfg.training.seed, dp_rank=parallel.dp_rank(), dp_size=parallel.dp_size(),
                             shuffle_buffer=cfg.data.shuffle_buffer, prefix_template=cfg.data.prefix_template,
                             caption_dropout=cfg.data.caption_dropout, uncond_text=cfg.data.uncond_text,
                             position=position)
        self.batches = prefetched(iter(loader), cfg.data.prefetch_batches)
        self.position = position

        samples_per_step = cfg.training.micro_batch_size * cfg.training.grad_accum_steps * parallel.dp_size()
        self.throughput = Throughput(samples_per_step, model_cfg.seq_length, train_flops(model_cfg, batch=1),
                                     cfg.logging.peak_flops * dist.get_world_size())
        self.metrics = MetricsLogger(cfg.log_dir, self.rank == 0, total_steps=cfg.training.max_steps,
                                     start_step=self.step, print_every=cfg.logging.every_steps,
                                     tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar)
        self.keys_file = None
        if cfg.logging.sample_keys:
            Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
            self.keys_file = open(Path(cfg.log_dir) / f"samples_rank{self.rank}.jsonl", "a", buffering=1)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_signal = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # ---- helpers -------------------------------------------------------------------
    def _restore_optimizer(self, path: str) -> int:
        """Adam moments and step from a converted checkpoint (any former TP x DP layout); the
        schedule continues from that step and the loader starts a fresh epoch for this layout."""
        from cogvideo.checkpoint import restore_optimizer_state

        step = restore_optimizer_state(self.engine, path, parallel.tp_rank(), parallel.tp_size())
        with warnings.catch_warnings():  # advancing the schedule takes no optimizer step
            warnings.simplefilter("ignore")
            for _ in range(step):
                self.engine.lr_scheduler.step()
        self._info(f"restored weights and optimizer state from {path} at step {step}")
        return step

    def _info(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _any_rank(self, flag: int) -> int:
        """Max of `flag` over all ranks (a signal may reach only some of them)."""
        t = torch.tensor([flag], dtype=torch.int64, device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().to(self.engine.device).reshape(1)
        if parallel.dp_size() > 1:
            dist.all_reduce(value, group=parallel.dp_group())
            value /= parallel.dp_size()
        return float(value.item())

    def _record_keys(self, micro: int, batch: Batch) -> None:
        if self.keys_file:
            self.keys_file.write(json.dumps({"step": self.step + 1, "micro": micro, "dp_rank": parallel.dp_rank(),
                                             "tp_rank": parallel.tp_rank(), "keys": batch.keys}) + "\n")

    # ---- training ------------------------------------------------------------------
    def train_step(self) -> dict:
        engine, losses = self.engine, []
        lr = engine.get_lr()[0]
        for micro in range(self.cfg.training.grad_accum_steps):
            batch = next(self.batches)
            self._record_keys(micro, batch)
            logits = engine(batch.tokens.to(engine.device))
            loss = engine.module.loss(logits, batch.targets.to(engine.device), batch.loss_mask.to(engine.device))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        self.position = batch.position
        self.step += 1
        norm = engine.get_global_grad_norm()
        return {"loss": self._dp_mean(torch.stack(losses).mean()), "lr": lr,
                "grad_norm": float(norm) if norm is not None else float("nan"),
                "applied": engine.was_step_applied()}

    def guard(self, applied: bool) -> None:
        """DeepSpeed skips an update whose gradients hold NaN/Inf (all ranks agree); count and limit them."""
        if applied:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.training.max_nonfinite_steps
        self._info(f"step {self.step}: non-finite loss or gradients, update skipped "
                   f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)")
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteError(f"stopping at step {self.step}: {limit} steps in a row had non-finite "
                                 f"loss or gradients (training.max_nonfinite_steps={limit})")

    def save(self) -> None:
        path = self.checkpoints.save(self.engine, self.step, self.position, self.cfg)
        self.saved_at = self.step
        self._info(f"saved checkpoint {path}")

    def advance(self) -> bool:
        """One optimizer step with everything around it (metrics, guard, checkpoint, signals).
        Returns False when a preemption signal ended the run (after saving)."""
        result = self.train_step()
        applied = result.pop("applied")
        self.metrics.log(self.step, {**result, **self.throughput.tick(), "skipped": int(not applied),
                                     "bad_shards": self.position.bad_shards, "bad_samples": self.position.bad_samples})
        self.guard(applied)
        if self.step % self.cfg.checkpoint.every_steps == 0:
            self.save()
        signum = self._any_rank(self.stop_signal)
        if signum:
            if self.saved_at != self.step:
                self.save()
            self._info(f"received {signal.Signals(signum).name}: saved step {self.step}, "
                       f"exiting so the job can be requeued")
        return not signum

    def run(self) -> int:
        cfg = self.cfg
        self._info(f"training {self.model_cfg.name} ({self.model_cfg.stage}) from step {self.step} to "
                   f"{cfg.training.max_steps}: world {dist.get_world_size()} = TP {parallel.tp_size()} x "
                   f"DP {parallel.dp_size()}, ZeRO-{cfg.parallel.zero_stage}, {cfg.parallel.precision}")
        self.throughput.reset()
        try:
            while self.step < cfg.training.max_steps:
                if not self.advance():
                    return 0
            if self.saved_at != self.step:
                self.save()
            self._info(f"done: {self.step} steps")
            return 0
        finally:
            self.close()

    def close(self) -> None:
        self.metrics.close()
        if self.keys_file:
            self.keys_file.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = config_parser(TrainConfig, "cogvideo-train", __doc__.split("\n\n")[0])
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint in checkpoint.dir, if any) or a path")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env_from_slurm()
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_train_config(args.config, overrides)
        model_cfg = check_config(cfg, world_size_from_env())
        check_text_tokenizer(cfg, model_cfg)
        shards = expand_shards(cfg.data.shards)
    except (ConfigError, FileNotFoundError, yaml.YAMLError) as err:
        print(f"cogvideo-train: bad config: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(cfg, model_cfg, shards)
    try:
        code = trainer.run()
    except NonFiniteError as err:
        if dist.get_rank() == 0:
            print(f"cogvideo-train: {err}", file=sys.stderr)
        code = EXIT_NONFINITE
    parallel.destroy()
    sys.exit(code)


if __name__ == "__main__":
    main()
