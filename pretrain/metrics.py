"""Rank-0 training metrics: progress bar, console lines, TensorBoard scalars and a JSONL file."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from cogvideo.jsonl import rewrite_jsonl

log = logging.getLogger("pretrain")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of steps <= last_step (0: none); a torn last line goes too."""
    rewrite_jsonl(path, lambda row: isinstance(row.get("step"), int) and row["step"] <= last_step)


class Throughput:
    """Wall time per optimizer step -> tokens/s, samples/s and model FLOP utilisation."""

    def __init__(
        self, samples_per_step: int, tokens_per_sample: int, flops_per_sample: float, peak_flops_total: float
    ):
        self.samples_per_step = samples_per_step
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_sample = flops_per_sample
        self.peak_flops_total = peak_flops_total
        self._last = time.perf_counter()

    def reset(self) -> None:
        self._last = time.perf_counter()

    def tick(self) -> dict:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        samples_per_s = self.samples_per_step / seconds
        return {
            "step_time": seconds,
            "samples_per_s": samples_per_s,
            "tokens_per_s": samples_per_s * self.tokens_per_sample,
            "mfu": samples_per_s * self.flops_per_sample / self.peak_flops_total,
        }


def scalars_summary(tag: str, scalars: dict):
    """One TensorBoard summary holding every scalar as `tag/key` (what add_scalar writes one
    event each for). Protobuf runs in pure Python here (cogvideo.environment): one event per step
    costs a third of the CPU time of one per scalar, a fixed cost of every training step."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(
        value=[Summary.Value(tag=f"{tag}/{key}", simple_value=float(value)) for key, value in scalars.items()]
    )


class MetricsLogger:
    """Does nothing on ranks other than 0. One row per step: a run `resumed` at `start_step`
    drops the rows and TensorBoard events after it (the steps it is about to repeat); a run
    that starts afresh where rows are left keeps them, moved to metrics.before-<time>.jsonl."""

    def __init__(
        self,
        log_dir: str | Path,
        enabled: bool,
        *,
        total_steps: int,
        start_step: int,
        resumed: bool = True,
        print_every: int,
        tensorboard: bool,
        progress_bar: bool,
    ):
        self.enabled = enabled
        self.print_every = print_every
        self.bar = self.writer = self.jsonl = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / "metrics.jsonl"
        if resumed:
            truncate_jsonl(path, start_step)
        elif path.is_file() and path.stat().st_size:
            kept = path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(path, kept)
            log.warning("starting afresh: the rows of the earlier run in %s are kept in %s", path, kept)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if resumed else None)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def record_run_info(self, tag: str, text: str, scalars: dict) -> None:
        """Facts about the run (e.g. the precision chosen and its probe) as TensorBoard text and
        scalars under `tag/`, at step 0."""
        if self.writer:
            self.writer.add_text(tag, text, 0)
            for key, value in scalars.items():
                self.writer.add_scalar(f"{tag}/{key}", value, 0)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            self.writer.file_writer.add_summary(scalars_summary("train", metrics), step)
        if self.bar:
            self.bar.update(1)
        if step % self.print_every == 0:
            line = (
                f"step {step} loss {metrics['loss']:.4f} lr {metrics['lr']:.3e} grad_norm {metrics['grad_norm']:.3f} "
                f"tokens/s {metrics['tokens_per_s']:.0f} samples/s {metrics['samples_per_s']:.2f} "
                f"MFU {100 * metrics['mfu']:.2f}%"
            )
            if self.bar:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                self.bar.write(line)
            else:
                log.info(line)

    def close(self) -> None:
        for handle in (self.bar, self.writer, self.jsonl):
            if handle is not None:
                handle.close()
