"""`cogvideo-train --config FILE.yaml [dotted.key=value ...]`: the training entry point.

Launched once per rank by torchrun, the deepspeed launcher or srun, or plainly as a world of
one. Order of start-up: checks of the config, text tokenizer, shards, caption lengths, starting
weights and checkpoints to resume (`pretrain.startup`: exit 2 with one line, before any process
group) -> the lock on checkpoint.dir -> torch.distributed -> megatron-core tensor-parallel
groups -> the checkpoint to resume verified against its digests (all ranks) -> model ->
deepspeed.initialize(mpu=...) -> resume (engine, loader, RNG) -> loop. A stop signal ends the
loop after a step with a checkpoint (`pretrain.stopping`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from cogvideo import parallel
from cogvideo.checkpoint import CheckpointError
from cogvideo.checkpoint.training import EMA_PART, EMA_SCOPE, tag_for, train_config_precision
from cogvideo.configio import ConfigError, config_parser
from cogvideo.environment import quiet_library_notices
from cogvideo.family import build_model, family_of
from cogvideo.precision import DTYPES, PrecisionChoice, choose_precision, probe, probe_shape, steps_to_time
from cogvideo.runlock import LockHeld, RunLock
from cogvideo.sdpa import fp32_attention
from pretrain.checkpoint import PARTS, CheckpointManager, FoundByAllRanks, RNGState, SaveFailed
from pretrain.config import ZERO0_PRECISIONS, TrainConfig, resolved_zero_stage, world_size_from_env
from pretrain.data import Batch, DataError, ShardLoader
from pretrain.ema import EMA
from pretrain.engines import Engines
from pretrain.launch import die_with_launcher, launch_local, rank_env, resume_command
from pretrain.metrics import MetricsLogger, Throughput
from pretrain.startup import (
    EXIT_BAD_CONFIG,
    ResumePlan,
    checkpoint_manager,
    dry_run,
    model_label,
    preflight,
    say,
)
from pretrain.step_probe import StepProbe, probe_batch
from pretrain.stopping import STOPPED_BY_SIGINT, StopRequest, signal_name, stopped_status

log = logging.getLogger("pretrain")

EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (a full disk): the one before it is intact
# what a user can get wrong before training starts: one line and EXIT_BAD_CONFIG, no traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, LockHeld, FileNotFoundError, yaml.YAMLError)


class NonFiniteError(RuntimeError):
    pass


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
    """Resolve parallel.precision and parallel.attention_precision (collective: every rank times
    the step, rank 0's figures count). `auto` resolves once per run, by timing `make_step()` (the
    run's own training step) in fp32 and the device's low precision, on a CPU the latter with its
    attention in fp32 too; a resumed run keeps what its checkpoint was trained in."""
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    rows = cfg.training.micro_batch_size * model_cfg.seq_length
    shape = probe_shape(rows, model_cfg.hidden_size, model_cfg.ffn_size // cfg.parallel.tensor_parallel)
    requested, attention = cfg.parallel.precision, cfg.parallel.attention_precision
    if resume is not None:
        trained_in, trained_attention = train_config_precision(resume)
        attention = trained_attention if attention == "auto" else attention
        if requested == "auto" and trained_in:
            choice = choose_precision(trained_in, device, shape, attention=attention)
            return dataclasses.replace(choice, requested="auto", reason=f"as trained in {resume}")
    # the run's and the family's: low precisions known to cost this model its quality
    excluded = (*cfg.parallel.auto_excludes, *family_of(model_cfg).auto_excludes)
    if cfg.parallel.zero_stage == 0:  # check_config refuses the others by name
        excluded = (*excluded, *(name for name in DTYPES if name not in ZERO0_PRECISIONS))
    if make_step is None or not steps_to_time(requested, probe(device, shape), excluded, attention):
        return choose_precision(requested, device, shape, excluded=excluded, attention=attention)
    step = make_step()
    try:
        return choose_precision(requested, device, shape, step, excluded, attention)
    finally:
        step.close()


class Trainer:
    """`resume`: the checkpoints to resume from (`pretrain.startup.ResumePlan`; a path: that one);
    `stop`: this process's stop signals (the default never stops)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg,
        shards: list[str],
        encode_text,
        resume: ResumePlan | Path | None,
        stop: StopRequest | None = None,
    ):
        self.family = family_of(model_cfg)
        self.stop = stop or StopRequest()
        say(f"starting torch.distributed and megatron-core (TP {cfg.parallel.tensor_parallel})")
        parallel.init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.backend)
        self.rank = dist.get_rank()
        self.model_cfg = model_cfg
        if isinstance(resume, Path):
            resume = ResumePlan([resume], explicit=True)
        verifier = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
        resume = verifier.verified(resume.candidates, resume.explicit) if resume else None
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
        self.ema = None
        if cfg.optim.ema_decay:
            self.ema = EMA(self.engines.modules(), cfg.optim.ema_decay)
            parts[EMA_PART] = (self.ema, EMA_SCOPE)
        self.checkpoints = checkpoint_manager(cfg, model_cfg, parts)
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
        self.resumed_from = resume
        self.batches = iter(self.loader)
        self._start_logging()
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    # ---- helpers -------------------------------------------------------------------
    def _settle_precision(
        self, cfg: TrainConfig, model_cfg, resume: Path | None, shards: list[str], encode_text
    ) -> TrainConfig:
        """Resolve parallel.precision (and with it parallel.zero_stage: auto) and log it; the
        config as this run trains (and saves) it."""

        def make_step() -> StepProbe:
            self._info("precision auto: timing this run's training step in each precision")
            return StepProbe(cfg, model_cfg, probe_batch(cfg, model_cfg, shards, encode_text))

        self.precision = run_precision(cfg, model_cfg, resume, make_step)
        self._info(self.precision.describe())
        if self.precision.warning and self.rank == 0:
            log.warning(self.precision.warning)
        zero_stage = resolved_zero_stage(cfg.parallel, parallel.dp_size(), self.precision.precision)
        resolved = dict(
            precision=self.precision.precision,
            attention_precision=self.precision.attention_setting,
            precision_probe=self.precision.to_dict(),
            zero_stage=zero_stage,
        )
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
            resumed=self.resumed_from is not None,
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
        with self.engines.training(part), fp32_attention(self.precision.fp32_attention):
            for micro in range(self.cfg.training.grad_accum_steps):
                batch = next(self.batches)
                self._record_keys(micro, batch)
                loss = part.loss(self.model_cfg, self.engines.by_part, batch, engine.device)
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
        self.step += 1
        if self.ema is not None and engine.was_step_applied():
            self.ema.update()
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

    def advance(self) -> None:
        """One optimizer step with everything around it (metrics, guard, periodic checkpoint)."""
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

    def run(self) -> int:
        """Train to training.max_steps, or until a stop signal reaches any rank; the exit status."""
        cfg = self.cfg
        self._info(
            f"training {model_label(self.model_cfg)} from step {self.step} to "
            f"{cfg.training.max_steps}: world {dist.get_world_size()} = TP {parallel.tp_size()} x "
            f"DP {parallel.dp_size()}, ZeRO-{cfg.parallel.zero_stage}, {cfg.parallel.precision}"
        )
        self.throughput.reset()
        try:
            while self.step < cfg.training.max_steps:
                signum = self._any_rank(self.stop.signum)
                if signum:
                    return self._stopped(signum)
                self.advance()
            if self.saved_at != self.step:
                self.save()
            self._info(f"done: {self.step} steps")
            return 0
        finally:
            self.close()

    def _stopped(self, signum: int) -> int:
        """Every rank saw `signum` between two steps: save the step (unless saved already, or
        nothing was trained), say so in one line, and return the exit status for the signal."""
        path = self.checkpoints.root / tag_for(self.step)
        if self.saved_at == -1 and self.step == 0:
            outcome, verb = "before the first step: nothing to save", "start again"
        else:
            if self.saved_at != self.step:
                self.save()
            outcome, verb = f"at step {self.step}: saved {path}", "resume"
        if self.rank == 0:
            print(
                f"cogvideo-train: {signal_name(signum)} {outcome}; {verb} with: {self.stop.resume_command}",
                file=sys.stderr,
                flush=True,
            )
        return stopped_status(signum)

    def close(self) -> None:
        self.batches.close()  # stops the shard-loader thread before the interpreter exits
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


def worker_arguments(args: argparse.Namespace) -> list[str]:
    """The command line of each rank started by --nproc-per-node: the same run, without that flag."""
    return (
        (["--config", args.config] if args.config else [])
        + (["--resume", args.resume] if args.resume else [])
        + list(args.overrides)
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dry_run is not None:
        return dry_run(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_notices()
    if args.nproc_per_node is not None:
        sys.exit(launch(args))
    command = resume_command(argv, local_rank_flag=args.local_rank is not None)
    stop = StopRequest(command, speaks=os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0")
    stop.install()  # before anything slow: a signal during start-up stops the run before its first step
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank_env()
    if "TORCHELASTIC_RUN_ID" in os.environ or args.local_rank is not None:  # torchrun, deepspeed launcher
        die_with_launcher()
    lock = None
    try:
        cfg, model_cfg, shards, encode, resume = preflight(args, world_size_from_env())
        stop.checkpoint_dir = cfg.checkpoint.dir
        if os.environ["RANK"] == "0":
            lock = RunLock(cfg.checkpoint.dir)
            if (took_over := lock.acquire()) is not None:
                log.warning(took_over)
            stop.at_once.append(lock.release)
    except USER_ERRORS as err:
        if os.environ["RANK"] == "0":  # every rank checks the same: one line, not one per rank
            print(f"cogvideo-train: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    try:
        code = Trainer(cfg, model_cfg, shards, encode, resume, stop).run()
    except NonFiniteError as err:
        if dist.get_rank() == 0:
            print(f"cogvideo-train: {err}", file=sys.stderr)
        code = EXIT_NONFINITE
    except (DataError, CheckpointError) as err:  # found once ranks run: a bad checkpoint, a rank's shards
        resume = f"; resume with: {command}" if isinstance(err, SaveFailed) else ""
        if dist.get_rank() == 0 or not isinstance(err, FoundByAllRanks):  # found by all ranks alike: once
            print(f"cogvideo-train: {err}{resume}", file=sys.stderr)
        code = EXIT_SAVE_FAILED if isinstance(err, SaveFailed) else EXIT_BAD_CONFIG
    finally:
        if lock is not None:
            lock.release()
    parallel.destroy()
    sys.exit(code)


def launch(args: argparse.Namespace) -> int:
    """--nproc-per-node: the checks once here, then the ranks (`pretrain.launch.launch_local`)."""
    try:
        preflight(args, args.nproc_per_node)
    except USER_ERRORS as err:
        print(f"cogvideo-train: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except KeyboardInterrupt:
        print("cogvideo-train: SIGINT during the checks: nothing was started", file=sys.stderr)
        return STOPPED_BY_SIGINT
    return launch_local(args.nproc_per_node, worker_arguments(args))


if __name__ == "__main__":
    main()
