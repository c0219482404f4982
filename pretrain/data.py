"""The training loader: shards -> batches of the model family's examples (dicts of tensors).

Each data-parallel rank reads its own share of the shards (TP peers share a DP rank and so get
identical batches), in an order that is a seeded permutation per epoch, through a seeded
shuffle buffer. Everything is a function of (seed, epoch, DP rank), so a position
(epoch, samples consumed) saved with a checkpoint is restored exactly by replaying the epoch
up to it. A shard that cannot be read is skipped with a warning naming it (also one cut while it
is read); a malformed sample likewise. Both are counted in the position.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import queue
import random
import tarfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import braceexpand
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander, tarfile_samples

from cogvideo.family import family_of
from cogvideo.shards import Sample, ShardFormatError, decode_sample, tar_problem
from pretrain.config import DataConfig, data_stage

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot feed the run (reported in one line, exit 2)."""


@dataclass
class LoaderPosition:
    epoch: int = 0
    consumed: int = 0  # samples of this epoch already handed out by this DP rank
    bad_shards: int = 0  # shards (partly) unreadable, over the whole run
    bad_samples: int = 0  # samples that did not decode or did not fit the model, over the whole run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoaderPosition":
        return cls(**data)


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]  # the family's examples, stacked (e.g. tokens, targets, loss_mask)
    keys: list[str]
    position: LoaderPosition  # the loader position after this batch


def expand_shards(patterns: list[str]) -> list[str]:
    """Paths, globs and `{000..009}` brace ranges -> sorted unique paths; names what matched nothing."""
    found: set[str] = set()
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            matches = glob.glob(item) if glob.has_magic(item) else ([item] if os.path.isfile(item) else [])
            if not matches:
                raise FileNotFoundError(f"data.shards: {item!r} matches no file")
            found.update(matches)
    return sorted(found)


def rank_shards(shards: list[str], seed: int, epoch: int, dp_rank: int, dp_size: int) -> list[str]:
    """This DP rank's shards for an epoch: a seeded permutation, dealt round-robin."""
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order[dp_rank::dp_size]


def shuffled(samples: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: fill, then emit a random element and replace it with the next sample."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def shard_problem(path: str) -> str | None:
    """Why a shard cannot be read, or None. Cheap: the first header and the last KiB."""
    if not os.path.isfile(path):
        return "not a file"
    return tar_problem(path)


def check_shards(shards: list[str], seed: int, dp_size: int) -> list[str]:
    """Before training: each DP rank's first-epoch shards must not all be unreadable. Returns a
    line per unreadable shard (training skips them); raises DataError naming a starved rank's shards."""
    problems = {path: problem for path in shards if (problem := shard_problem(path))}
    for rank in range(dp_size):
        mine = rank_shards(shards, seed, 0, rank, dp_size)
        if mine and all(path in problems for path in mine):
            listed = "; ".join(f"{path}: {problems[path]}" for path in mine)
            raise DataError(
                f"data.shards: every shard of data-parallel rank {rank} is unreadable ({listed}); "
                f"rewrite or remove them ({len(problems)} of {len(shards)} shards are unreadable)"
            )
    return [f"{path}: {problem}" for path, problem in problems.items()]


def check_shard_kind(shards: list[str], model_cfg) -> None:
    """Before training: the first readable sample is of the kind the model's family reads."""
    family = family_of(model_cfg)
    for path in shards:
        if shard_problem(path):
            continue
        try:
            raw = next(iter(tarfile_samples([{"url": path}])), None)
            sample = decode_sample(raw) if raw is not None else None
        except (ShardFormatError, tarfile.TarError, OSError):
            continue
        if sample is not None:
            wrong_kind(path, sample, family)
            return


def wrong_kind(path: str, sample: Sample, family) -> None:
    if sample.meta.kind != family.shard_kind:
        raise DataError(
            f"{path}: holds {sample.meta.kind} samples, but model.family={family.name} reads "
            f"{family.shard_kind} shards: prepare the videos with cogvideo-prep model.family={family.name}"
        )


def check_text_length(
    shards: list[str],
    model_cfg,
    encode_text: Callable[[str], list[int]],
    data: DataConfig,
    max_samples: int = 256,
    named: int = 3,
) -> str:
    """Before training: the share of captions (with their duration prefix) longer than
    model.text_length, over up to `max_samples` samples of readable shards, naming the `named`
    longest that are cut (shard, sample, source video, tokens each needs). Raises DataError above
    data.max_cut_text; returns a one-line summary."""
    limit, lengths = model_cfg.text_length, []  # (tokens, shard, key, source video)
    for path in shards:
        if shard_problem(path):
            continue
        try:
            for raw in tarfile_samples([{"url": path}]):
                sample = decode_sample(raw)
                text = data.text_format().text(sample.caption, sample.meta.duration)
                lengths.append((len(encode_text(text)), path, sample.key, sample.meta.source))
                if len(lengths) >= max_samples:
                    break
        except (ShardFormatError, tarfile.TarError, OSError):
            continue  # the loader skips and counts what does not decode
        if len(lengths) >= max_samples:
            break
    cut = sorted((row for row in lengths if row[0] > limit), key=lambda row: -row[0])
    longest = max((row[0] for row in lengths), default=0)
    summary = (
        f"{len(cut)} of {len(lengths)} sampled captions are longer than model.text_length={limit} tokens "
        f"(longest {longest})"
    )
    if cut:
        summary += "; longest: " + "; ".join(
            f"{shard} sample {key} (video {source}): {tokens} tokens"
            for tokens, shard, key, source in cut[:named]
        )
    if lengths and len(cut) / len(lengths) > data.max_cut_text:
        raise DataError(
            f"data: {summary}; over data.max_cut_text={data.max_cut_text:g}: set model.text_length={longest} "
            f"(the positions after the text follow it), shorten the captions, or set data.max_cut_text=1 "
            f"to train on cut text"
        )
    return summary


class ShardLoader:
    """Infinite iterator of :class:`Batch` for one DP rank, prepared `data.prefetch_batches` ahead
    by a background thread. Stateful: ``state_dict()`` is the position after the last batch handed
    out (not the read-ahead), ``load_state_dict`` restores it before iterating."""

    def __init__(
        self,
        shards: list[str],
        model_cfg,
        encode_text: Callable[[str], list[int]],
        data: DataConfig,
        *,
        micro_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if len(shards) < dp_size:
            raise DataError(
                f"data.shards: {len(shards)} shard(s) cannot feed {dp_size} data-parallel ranks; "
                f"write at least one shard per DP rank"
            )
        self.shards = shards
        self.model_cfg = model_cfg
        self.encode_text = encode_text
        self.data = data
        self.text_format = data.text_format()
        self.micro_batch_size = micro_batch_size
        self.stage = data_stage(data, model_cfg)
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._warned_truncation = False
        self.position = LoaderPosition()  # where reading has got to (ahead of training when prefetching)
        self.handed_out = LoaderPosition()  # after the last batch handed to the caller
        self.family = family_of(model_cfg)
        self._replaying = False

    def state_dict(self) -> dict:
        return self.handed_out.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = LoaderPosition.from_dict(state)
        self.handed_out = dataclasses.replace(self.position)

    # ---- samples -------------------------------------------------------------------
    def _skipped(self, what: str, message: str, *args) -> None:
        """Count and report a bad shard or sample, except while replaying up to a saved position
        (the saved counts already include it)."""
        if self._replaying:
            return
        setattr(self.position, what, getattr(self.position, what) + 1)
        log.warning(message + f" ({what}: {getattr(self.position, what)} so far)", *args)

    def _read_shard(self, url: str) -> Iterator[dict]:
        """The raw samples of one shard. A shard cut while it is read ends like a whole one to a
        tar reader (at a member boundary): its size at the end, against its size when opened,
        tells them apart."""
        try:
            problem = tar_problem(url) if os.path.isfile(url) else None
            if problem:
                raise ShardFormatError(problem)
            with open(url, "rb") as stream:
                opened = os.fstat(stream.fileno()).st_size
                yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
                now = os.fstat(stream.fileno()).st_size
                if now < opened and stream.tell() >= now:
                    raise ShardFormatError(f"cut from {opened} to {now} bytes while it was read")
        except Exception as err:  # corrupt mid-way: what was read stays used, the rest is skipped
            self._skipped("bad_shards", "skipping unreadable shard %s (%s: %s)", url, type(err).__name__, err)

    def _decoded(self, urls: list[str]) -> Iterator[Sample]:
        for url in urls:
            for raw in self._read_shard(url):
                try:
                    sample = decode_sample(raw)
                except ShardFormatError as err:
                    self._skipped("bad_samples", "skipping sample: %s", err)
                    continue
                wrong_kind(url, sample, self.family)
                if problem := self.family.sample_problem(self.model_cfg, sample):
                    self._skipped(
                        "bad_samples", "skipping sample: %s", f"{url}: sample {sample.key}: {problem}"
                    )
                    continue
                if sample.meta.stage == self.stage:
                    yield sample

    def _epoch_samples(self, epoch: int) -> Iterator[Sample]:
        urls = rank_shards(self.shards, self.seed, epoch, self.dp_rank, self.dp_size)
        rng = random.Random(f"buffer:{self.seed}:{epoch}:{self.dp_rank}")
        return shuffled(self._decoded(urls), self.data.shuffle_buffer, rng)

    def samples(self) -> Iterator[Sample]:
        """Samples from the current position on, across epochs, advancing the position."""
        pos = self.position
        while True:
            skip, yielded = pos.consumed, 0
            self._replaying = skip > 0
            for i, sample in enumerate(self._epoch_samples(pos.epoch)):
                if i < skip:
                    # reads made while fetching sample `skip` onwards were not part of the saved run
                    self._replaying = i < skip - 1
                    continue
                pos.consumed += 1
                yielded += 1
                yield sample
            if yielded == 0 and skip == 0:
                raise DataError(
                    f"data: DP rank {self.dp_rank} found no stage-{self.stage} samples in "
                    f"{rank_shards(self.shards, self.seed, pos.epoch, self.dp_rank, self.dp_size)}"
                )
            pos.epoch, pos.consumed = pos.epoch + 1, 0

    # ---- batches -------------------------------------------------------------------
    def to_example(self, sample: Sample) -> dict[str, torch.Tensor]:
        if self.data.caption_dropout and self._dropped(
            sample.key
        ):  # classifier-free guidance learns the guidance text
            text = self.text_format.uncond(sample.meta.duration)
        else:
            text = self.text_format.text(sample.caption, sample.meta.duration)
        text_ids = self.encode_text(text)
        limit = self.model_cfg.text_length
        if len(text_ids) > limit and not self._warned_truncation:
            self._warned_truncation = True
            log.warning(
                "sample %s: text has %d tokens, model.text_length=%d keeps the first %d (the duration "
                "prefix and the caption's start); further truncations are not reported",
                sample.key,
                len(text_ids),
                limit,
                limit,
            )
        return self.family.example(self.model_cfg, sample, text_ids[:limit], self._sample_seed(sample.key))

    def _sample_seed(self, key: str) -> int:
        """The family's draw for one sample (e.g. which tokens to mask), fixed per (run seed, epoch,
        sample): an exact resume draws the same again."""
        digest = hashlib.sha256(f"{self.seed}/{self.position.epoch}/{key}/example".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    def _dropped(self, key: str) -> bool:
        """A seeded draw per (epoch, sample): the same samples drop again on an exact resume."""
        digest = hashlib.sha256(f"{self.seed}/{self.position.epoch}/{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.data.caption_dropout

    def __iter__(self) -> Iterator[Batch]:
        for batch in prefetched(self.batches(), self.data.prefetch_batches):
            self.handed_out = batch.position
            yield batch

    def batches(self) -> Iterator[Batch]:
        """Batches from the read position on, in this thread."""
        pending: list[Sample] = []
        for sample in self.samples():
            pending.append(sample)
            if len(pending) == self.micro_batch_size:
                yield self.collate(pending)
                pending = []

    def collate(self, samples: list[Sample]) -> Batch:
        examples = [self.to_example(s) for s in samples]
        tensors = {name: torch.stack([example[name] for example in examples]) for name in examples[0]}
        return Batch(tensors, [s.key for s in samples], dataclasses.replace(self.position))


def prefetched(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run `batches` in a background thread, `depth` ahead; errors surface in the consumer.
    Closing the consumer stops and joins the thread: a producer still decoding (inside torch)
    when the interpreter exits aborts the process ("terminate called without an active exception")."""
    if depth <= 0:
        yield from batches
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand_over(item) -> bool:
        """Put `item` in the queue unless the consumer has stopped; whether it was handed over."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not hand_over(batch):
                    return
        except BaseException as err:  # handed to the consumer
            hand_over(err)
            return
        hand_over(done)

    thread = threading.Thread(target=produce, name="shard-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
