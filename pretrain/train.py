"""`cogvideo-train --config FILE.yaml [dotted.key=value ...]`: the training entry point.

Launched once per rank by torchrun, the deepspeed launcher or srun, or plainly as a world of
one. Order of start-up: checks of the config, text tokenizer, shards, caption lengths and the
checkpoint to resume (exit 2 with one line, before any process group) -> the lock on
checkpoint.dir -> torch.distributed -> megatron-core tensor-parallel groups -> model ->
deepspeed.initialize(mpu=...) -> resume (engine, loader, RNG) -> loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from cogvideo import parallel
from cogvideo.checkpoint import CheckpointError
from cogvideo.checkpoint.training import find_resume, train_config_precision
from cogvideo.configio import ConfigError, config_parser
from cogvideo.environment import quiet_library_notices
from cogvideo.family import build_model, family_of
from cogvideo.precision import PrecisionChoice, choose_precision, probe_shape
from pretrain.checkpoint import CheckpointManager, RNGState, RunLock
from pretrain.config import (
    TrainConfig,
    check_config,
    check_text_tokenizer,
    load_train_config,
    world_size_from_env,
)
from pretrain.data import (
    Batch,
    DataError,
    ShardLoader,
    check_shard_kind,
    check_shards,
    check_text_length,
    expand_shards,
)
from pretrain.engines import Engines
from pretrain.launch import die_with_launcher, launch_local, rank_env
from pretrain.metrics import MetricsLogger, Throughput
from pretrain.step_probe import StepProbe, probe_batch

log = logging.getLogger("pretrain")

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3
# what a user can get wrong before training starts: one line and EXIT_BAD_CONFIG, no traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, yaml.YAMLError)


class NonFiniteError(RuntimeError):
    pass


PARTS = {"loader": "dp", "rng": "rank"}  # stateful parts beside the engine, and their scope


def text_encoder(cfg: TrainConfig, vocab):
    from cogvideo.tokenizers.text import TextTokenizer

    return TextTokenizer(cfg.data.text_tokenizer, vocab).encode


def model_label(model_cfg) -> str:
    """The model's family and name (and CogVideo's stage) for the log."""
    family = family_of(model_cfg).name
    stage = getattr(model_cfg, "stage", None)
    return f"{family} {model_cfg.name}" + (f" ({stage})" if stage else "")


def say(message: str) -> None:
    """Start-up progress, from global rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        log.info(message)


def deepspeed_op_cached() -> bool:
    """DeepSpeed compiles its CPU communication op on a machine's first run (about a minute)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return bool(glob.glob(os.path.join(root, "*", "deepspeed_shm_comm", "*.so")))


def initial_state(cfg: TrainConfig, model_cfg, tp_rank: int, tp_size: int) -> dict | None:
    """This TP rank's starting weights from init.weights / init.backbone, or None (from scratch).

    A backbone is read as this rank's shard only: the family's `from_backbone` derives the new
    parts from parts that follow the same split rules (CogVideo's temporal channel copies the
    spatial one), so initialising the shard gives the shard of the init."""
    from cogvideo.checkpoint import load_model_state

    if cfg.init.weights:
        return load_model_state(cfg.init.weights, tp_rank, tp_size)
    if cfg.init.backbone:
        return family_of(model_cfg).from_backbone(
            load_model_state(cfg.init.backbone, tp_rank, tp_size), model_cfg
        )
    return None


def run_precision(
    cfg: TrainConfig, model_cfg, resume: Path | None, make_step: Callable[[], StepProbe] | None = None
) -> PrecisionChoice:
    """Resolve parallel.precision (collective: every rank times the step, rank 0's figures count).
    `auto` resolves once per run, by timing `make_step()` (the run's own training step) in fp32
    and the device's low precision; a resumed run keeps the precision its checkpoint was trained in."""
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    rows = cfg.training.micro_batch_size * model_cfg.seq_length
    shape = probe_shape(rows, model_cfg.hidden_size, model_cfg.ffn_size // cfg.parallel.tensor_parallel)
    trained_in = train_config_precision(resume) if resume is not None else None
    if cfg.parallel.precision == "auto" and trained_in:
        choice = choose_precision(trained_in, device, shape)
        return dataclasses.replace(choice, requested="auto", reason=f"as trained in {resume}")
    # the run's and the family's: low precisions known to cost this model its quality
    excluded = (*cfg.parallel.auto_excludes, *family_of(model_cfg).auto_excludes)
    if make_step is None or cfg.parallel.precision != "auto":
        return choose_precision(cfg.parallel.precision, device, shape, excluded=excluded)
    step = make_step()
    try:
        return choose_precision("auto", device, shape, step, excluded)
    finally:
        step.close()


class Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg, shards: list[str], encode_text, resume: Path | None):
        self.family = family_of(model_cfg)
        say(f"starting torch.distributed and megatron-core (TP {cfg.parallel.tensor_parallel})")
        parallel.init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.backend)
        self.rank = dist.get_rank()
        self.model_cfg = model_cfg
        self.cfg = cfg = self._settle_precision(cfg, model_cfg, resume, shards, encode_text)
        self.engines = self._engines()
        self.loader = ShardLoader(
            shards,
            model_cfg,
            encode_text,
            cfg.data,
            micro_batch_size=cfg.training.micro_batch_size,
            seed=cfg.training.seed,
            dp_rank=parallel.dp_rank(),
            dp_size=parallel.dp_size(),
        )
        parts = {"loader": (self.loader, PARTS["loader"]), "rng": (RNGState(), PARTS["rng"])}
        self.checkpoints = CheckpointManager(
            cfg.checkpoint.dir, cfg.checkpoint.keep_last, cfg.checkpoint.export_full, parts, model_cfg
        )
        self.step = 0
        if resume is not None:
            say(f"loading {resume}")
            self.step = self.checkpoints.load(self.engines, resume)  # loader position and RNG states included
            self._info(f"resumed from {resume} at step {self.step}")
        else:  # from here on torch's generators differ between DP ranks and agree between TP peers;
            # spacing DP ranks by tp_size keeps the model-parallel seeds (+ 2718 + tp_rank) distinct
            parallel.manual_seed(cfg.training.seed + 1 + parallel.dp_rank() * parallel.tp_size())
            if cfg.init.optimizer:
                self.step = self._restore_optimizer(cfg.init.weights)
        self.saved_at = self.step if resume is not None else -1
        self.batches = iter(self.loader)
        self._start_logging()
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_signal = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # ---- helpers -------------------------------------------------------------------
    def _settle_precision(
        self, cfg: TrainConfig, model_cfg, resume: Path | None, shards: list[str], encode_text
    ) -> TrainConfig:
        """Resolve parallel.precision and log it; the config as this run trains (and saves) it."""

        def make_step() -> StepProbe:
            self._info("precision auto: timing this run's training step in each precision")
            return StepProbe(cfg, model_cfg, probe_batch(cfg, model_cfg, shards, encode_text))

        self.precision = run_precision(cfg, model_cfg, resume, make_step)
        self._info(self.precision.describe())
        if self.precision.warning and self.rank == 0:
            log.warning(self.precision.warning)
        resolved = dict(precision=self.precision.precision, precision_probe=self.precision.to_dict())
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **resolved))

    @property
    def engine(self):
        """The DeepSpeed engine of the whole model (a run of one optimised part), or the first part's."""
        return self.engines.first

    def _engines(self) -> Engines:
        """The model, built lean on this rank's device (docs/cuda-paths.md) and initialised from
        init.weights / init.backbone or from the seed, wrapped by deepspeed.initialize: one engine
        per part the family optimises separately (pretrain/engines.py)."""
        cfg, model_cfg = self.cfg, self.model_cfg
        parallel.manual_seed(cfg.training.seed)  # replicated parameters agree on every rank
        state = initial_state(cfg, model_cfg, parallel.tp_rank(), parallel.tp_size())
        model = build_model(model_cfg, init_weights=state is None)
        if state is not None:
            model.load_state_dict(state)
        compiling = ": this machine's first run compiles DeepSpeed's CPU communication op (about a minute)"
        say("deepspeed.initialize" + ("" if deepspeed_op_cached() else compiling))
        return Engines.initialize(model, model_cfg, cfg)

    def _start_logging(self) -> None:
        """Throughput, the metrics log (rank 0) and the per-rank sample-key log."""
        cfg, model_cfg = self.cfg, self.model_cfg
        samples_per_step = cfg.training.micro_batch_size * cfg.training.grad_accum_steps * parallel.dp_size()
        self.throughput = Throughput(
            samples_per_step,
            model_cfg.seq_length,
            self.family.train_flops(model_cfg),
            cfg.logging.peak_flops * dist.get_world_size(),
        )
        self.metrics = MetricsLogger(
            cfg.log_dir,
            self.rank == 0,
            total_steps=cfg.training.max_steps,
            start_step=self.step,
            print_every=cfg.logging.every_steps,
            tensorboard=cfg.logging.tensorboard,
            progress_bar=cfg.logging.progress_bar,
        )
        self.metrics.record_run_info(
            "precision",
            self.precision.describe(),
            {
                **{f"gflops_{k}": v for k, v in self.precision.figures.gflops.items()},
                **{f"step_seconds_{k}": v for k, v in self.precision.figures.step_seconds.items()},
            },
        )
        self.keys_file = None
        if cfg.logging.sample_keys:
            Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
            self.keys_file = open(Path(cfg.log_dir) / f"samples_rank{self.rank}.jsonl", "a", buffering=1)

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
            self.keys_file.write(
                json.dumps(
                    {
                        "step": self.step + 1,
                        "micro": micro,
                        "dp_rank": parallel.dp_rank(),
                        "tp_rank": parallel.tp_rank(),
                        "keys": batch.keys,
                    }
                )
                + "\n"
            )

    # ---- training ------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step of the part whose turn it is (the whole model for most families)."""
        part = self.engines.turn(self.step)
        engine, losses = self.engines.by_part[part.name], []
        lr = engine.get_lr()[0]
        with self.engines.training(part):
            for micro in range(self.cfg.training.grad_accum_steps):
                batch = next(self.batches)
                self._record_keys(micro, batch)
                loss = part.loss(self.model_cfg, self.engines.by_part, batch, engine.device)
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
        self.step += 1
        norm = engine.get_global_grad_norm()
        loss = self._dp_mean(torch.stack(losses).mean())
        return {
            "loss": loss,
            **({} if self.engines.whole else {f"loss_{part.name}": loss}),
            "lr": lr,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "applied": engine.was_step_applied(),
        }

    def guard(self, applied: bool) -> None:
        """DeepSpeed skips an update whose gradients hold NaN/Inf (all ranks agree); count and limit them."""
        if applied:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.training.max_nonfinite_steps
        self._info(
            f"step {self.step}: non-finite loss or gradients, update skipped "
            f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)"
        )
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteError(
                f"stopping at step {self.step}: {limit} steps in a row had non-finite "
                f"loss or gradients (training.max_nonfinite_steps={limit})"
            )

    def save(self) -> None:
        path = self.checkpoints.save(self.engines, self.step, self.cfg)
        self.saved_at = self.step
        self._info(f"saved checkpoint {path}")

    def advance(self) -> bool:
        """One optimizer step with everything around it (metrics, guard, checkpoint, signals).
        Returns False when a preemption signal ended the run (after saving)."""
        result = self.train_step()
        applied = result.pop("applied")
        position = self.loader.handed_out
        self.metrics.log(
            self.step,
            {
                **result,
                **self.throughput.tick(),
                "skipped": int(not applied),
                "bad_shards": position.bad_shards,
                "bad_samples": position.bad_samples,
            },
        )
        self.guard(applied)
        if self.step % self.cfg.checkpoint.every_steps == 0:
            self.save()
        signum = self._any_rank(self.stop_signal)
        if signum:
            if self.saved_at != self.step:
                self.save()
            self._info(
                f"received {signal.Signals(signum).name}: saved step {self.step}, "
                f"exiting so the job can be requeued"
            )
        return not signum

    def run(self) -> int:
        cfg = self.cfg
        self._info(
            f"training {model_label(self.model_cfg)} from step {self.step} to "
            f"{cfg.training.max_steps}: world {dist.get_world_size()} = TP {parallel.tp_size()} x "
            f"DP {parallel.dp_size()}, ZeRO-{cfg.parallel.zero_stage}, {cfg.parallel.precision}"
        )
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
    parser.add_argument(
        "--resume", help="'auto' (newest complete checkpoint in checkpoint.dir, if any) or a path"
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="start N ranks on this machine (torchrun's standalone launch, after the checks below run once here)",
    )
    parser.add_argument(
        "--dry-run",
        metavar="WORLD_SIZE",
        type=int,
        help="check the config for a run of WORLD_SIZE ranks on GPUs and exit (0: valid, 2: the problem)",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return parser.parse_args(argv)


def dry_run(args: argparse.Namespace) -> None:
    """The launch scripts' --dry-run: the config checks that need neither data nor ranks."""
    try:
        cfg = load_train_config(args.config, list(args.overrides))
        model_cfg = check_config(cfg, args.dry_run, has_gpu=True)
    except (ConfigError, FileNotFoundError, yaml.YAMLError) as err:
        print(f"cogvideo-train: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    tp = cfg.parallel.tensor_parallel
    print(
        f"cogvideo-train: config valid for {args.dry_run} ranks (TP {tp} x DP {args.dry_run // tp}), "
        f"model {model_label(model_cfg)}, precision {cfg.parallel.precision}"
    )


def preflight(args: argparse.Namespace, world_size: int):
    """Every check that needs no process group: the config, the text tokenizer, shards per DP rank,
    caption lengths, the checkpoint to resume. Returns (cfg, model config, shards, text encoder,
    checkpoint to resume or None)."""
    from cogvideo.params import count_parameters

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_train_config(args.config, overrides)
    model_cfg = check_config(cfg, world_size)
    check_text_tokenizer(cfg, model_cfg)
    shards = expand_shards(cfg.data.shards)
    dp_size = world_size // cfg.parallel.tensor_parallel
    encode = text_encoder(cfg, model_cfg.vocab)
    for line in check_shards(shards, cfg.training.seed, dp_size):
        say(f"unreadable shard, skipped in training: {line}")
    check_shard_kind(shards, model_cfg)
    say(check_text_length(shards, model_cfg, encode, cfg.data))
    resume = find_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)
    if resume is not None:
        CheckpointManager(
            cfg.checkpoint.dir,
            cfg.checkpoint.keep_last,
            parts={name: (None, scope) for name, scope in PARTS.items()},
        ).check(resume, dp_size)
    counts = count_parameters(model_cfg)
    say(
        f"model {model_label(model_cfg)}: {counts.trainable:,} of {counts.total:,} parameters train"
        + ("" if counts.frozen == 0 else f" ({counts.frozen:,} frozen{_frozen_by(model_cfg)})")
    )
    return cfg, model_cfg, shards, encode, resume


def _frozen_by(model_cfg) -> str:
    """What froze them, where a config field says so (CogVideo's backbone)."""
    fields = {f.name for f in dataclasses.fields(model_cfg)}
    return ": model.train_backbone=false" if "train_backbone" in fields else " by the model family"


def worker_arguments(args: argparse.Namespace) -> list[str]:
    """The command line of each rank started by --nproc-per-node: the same run, without that flag."""
    return (
        (["--config", args.config] if args.config else [])
        + (["--resume", args.resume] if args.resume else [])
        + list(args.overrides)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run is not None:
        return dry_run(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_notices()
    if args.nproc_per_node is not None:
        try:
            preflight(args, args.nproc_per_node)
        except USER_ERRORS as err:
            print(f"cogvideo-train: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_CONFIG)
        sys.exit(launch_local(args.nproc_per_node, worker_arguments(args)))
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank_env()
    if "TORCHELASTIC_RUN_ID" in os.environ or args.local_rank is not None:  # torchrun, deepspeed launcher
        die_with_launcher()
    lock = None
    try:
        cfg, model_cfg, shards, encode, resume = preflight(args, world_size_from_env())
        if os.environ["RANK"] == "0":
            lock = RunLock(cfg.checkpoint.dir)
            if (took_over := lock.acquire()) is not None:
                log.warning(took_over)
    except USER_ERRORS as err:
        if os.environ["RANK"] == "0":  # every rank checks the same: one line, not one per rank
            print(f"cogvideo-train: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    try:
        code = Trainer(cfg, model_cfg, shards, encode, resume).run()
    except NonFiniteError as err:
        if dist.get_rank() == 0:
            print(f"cogvideo-train: {err}", file=sys.stderr)
        code = EXIT_NONFINITE
    except DataError as err:  # found while training, e.g. a rank's shards hold no samples of the stage
        print(f"cogvideo-train: {err}", file=sys.stderr)
        code = EXIT_BAD_CONFIG
    finally:
        if lock is not None:
            lock.release()
    parallel.destroy()
    sys.exit(code)


if __name__ == "__main__":
    main()
