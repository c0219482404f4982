"""Rebalance a prepared folder's shards to a count divisible by nodes x loader workers.

Distributed loaders deal whole shards to ranks and workers: with fewer shards than readers
some wait forever, with an uneven count some run dry first. Samples keep their order and are
spread evenly (shard sizes differ by at most one); manifest and commit log follow.

    cogvideo-reshard OUT_DIR --divisible-by 16 [--shards 64]
    cogvideo-reshard OUT_DIR --divisible-by 2 --shards 8 --first-frames FRAME0_DIR [--stills]

`--first-frames` writes a second folder of one-frame samples (frame 0 of every stage-1 sample)
for the model that draws the first frame of the hierarchy (the backbone), dealt round-robin over
the shards so every reader gets some. Each keeps the duration of the sample it opens, so a
first-frame model may read the duration prefix too (where a clip starts can depend on how long
it runs: the demo's shapes start further back on longer paths). `--stills` adds every later
frame of those samples as a still (no duration: the model reads the caption alone), the image
data CogView2 trained on: the model then sees each object in every place it goes, not only
where clips start, and draws frame 0 of an unseen combination far more often in the right shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import tarfile_samples

from cogvideo.jsonl import iter_jsonl, write_jsonl
from cogvideo.runlock import RunLock
from cogvideo.shards import (
    ClipMeta,
    ShardFormatError,
    decode_sample,
    encode_sample,
    sample_fields,
    tar_problem,
)
from data_prep.output import DONE, MANIFEST, SHARD_DIR, PrepOutput, shard_name


def target_count(current: int, samples: int, divisible_by: int, shards: int = 0) -> int:
    if divisible_by < 1:
        raise ValueError(f"--divisible-by must be >= 1, got {divisible_by}")
    count = shards or max(1, math.ceil(current / divisible_by)) * divisible_by
    if count % divisible_by:
        raise ValueError(f"--shards {count} is not divisible by --divisible-by {divisible_by}")
    if count > samples:
        raise ValueError(
            f"{samples} samples cannot fill {count} shards; prepare more data or lower --divisible-by"
        )
    return count


def reshard(root: str | Path, divisible_by: int, shards: int = 0) -> int:
    """Rewrite `root`'s shards into a balanced count divisible by `divisible_by`; returns it.
    Streams: one sample and one manifest row at a time. Holds the folder's lock (as cogvideo-prep
    does): LockHeld while a run writes there."""
    lock = RunLock(root, key="cogvideo-reshard OUT_DIR")
    if (took_over := lock.acquire()) is not None:
        print(f"cogvideo-reshard: {took_over}", file=sys.stderr)
    try:
        return _reshard(Path(root), divisible_by, shards)
    finally:
        lock.release()


def _reshard(root: Path, divisible_by: int, shards: int) -> int:
    PrepOutput(root, shard_samples=1, shard_bytes=1)  # reopening drops anything uncommitted
    old_shards = sorted(p.name for p in (root / SHARD_DIR).glob("*.tar"))
    for name in old_shards:  # before anything is rewritten
        if problem := tar_problem(str(root / SHARD_DIR / name)):
            raise ShardFormatError(
                f"{root / SHARD_DIR / name}: {problem}; restore it, or prepare the videos into a new folder"
            )
    samples = sum(1 for _ in iter_jsonl(root / MANIFEST))
    count = target_count(len(old_shards), samples, divisible_by, shards)
    staging = root / f"{SHARD_DIR}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    base, extra = divmod(samples, count)
    sizes = [base + (i < extra) for i in range(count)]
    index, writer, written = -1, None, 0
    # shards and manifest rows are both in commit order
    stream = zip(
        tarfile_samples([{"url": str(root / SHARD_DIR / name)} for name in old_shards]),
        iter_jsonl(root / MANIFEST),
        strict=True,
    )
    with open(root / f"{MANIFEST}.new", "w", encoding="utf-8") as manifest:
        for sample, row in stream:
            if sample["__key__"] != row["key"]:
                raise RuntimeError(
                    f"{root}: shard sample {sample['__key__']} where the manifest lists {row['key']}"
                )
            if writer is None or written == sizes[index]:
                if writer is not None:
                    writer.close()
                index, written = index + 1, 0
                writer = wds.TarWriter(str(staging / shard_name(index)), encoder=False, mtime=0)
            writer.write({"__key__": row["key"], **sample_fields(sample)})
            manifest.write(json.dumps({**row, "shard": shard_name(index)}, ensure_ascii=False) + "\n")
            written += 1
    writer.close()
    # the inputs stay finished; the new shards are committed as they are
    commits = ({**commit, "shard": None} for commit in iter_jsonl(root / DONE))
    write_jsonl(root / f"{DONE}.new", commits, "w")
    write_jsonl(root / f"{DONE}.new", ({"shard": shard_name(i), "inputs": []} for i in range(count)))
    os.replace(root / SHARD_DIR, root / f"{SHARD_DIR}.old")
    os.replace(staging, root / SHARD_DIR)
    os.replace(root / f"{MANIFEST}.new", root / MANIFEST)
    os.replace(root / f"{DONE}.new", root / DONE)
    shutil.rmtree(root / f"{SHARD_DIR}.old")
    return count


def first_frame_shards(
    root: str | Path, dest: str | Path, divisible_by: int, shards: int = 0, stills: bool = False
) -> int:
    """Write frame 0 of every stage-1 sample of `root` as one-frame samples (with the duration of
    the sample they open) into `dest`/shards/, with `stills` each later frame too as a still
    (duration None, key `<key>_still<i>`), one-frame sample i into shard i mod count; returns the
    one-frame sample count."""
    root, dest = Path(root), Path(dest)
    tars = sorted((root / SHARD_DIR).glob("*.tar"))
    samples = []
    for raw in tarfile_samples([{"url": str(tar)} for tar in tars]):
        sample = decode_sample(raw)
        if sample.meta.stage != 1:
            continue
        frames = sample.arrays["frames"]
        meta = ClipMeta(**{**vars(sample.meta), "num_frames": 1})
        samples.append(encode_sample(sample.key, {"frames": frames[:1]}, sample.caption, meta))
        still = replace(meta, duration=None)
        for i in range(1, len(frames) if stills else 1):
            samples.append(
                encode_sample(f"{sample.key}_still{i}", {"frames": frames[i : i + 1]}, sample.caption, still)
            )
    if not samples:
        raise ValueError(f"{root / SHARD_DIR}: no stage-1 samples to take first frames from")
    count = target_count(len(tars), len(samples), divisible_by, shards)
    (dest / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    for part in range(count):
        with wds.TarWriter(str(dest / SHARD_DIR / shard_name(part)), encoder=False, mtime=0) as writer:
            for sample in samples[part::count]:
                writer.write(sample)
    return len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cogvideo-reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a folder written by cogvideo-prep")
    parser.add_argument(
        "--divisible-by", type=int, required=True, help="nodes x data-loader workers (x DP ranks)"
    )
    parser.add_argument(
        "--shards", type=int, default=0, help="exact shard count (default: the nearest multiple up)"
    )
    parser.add_argument(
        "--first-frames",
        metavar="DEST",
        help="leave OUT_DIR as it is; write frame 0 of its "
        "stage-1 samples as one-frame shards into DEST/shards (for the first-frame model)",
    )
    parser.add_argument(
        "--stills",
        action="store_true",
        help="with --first-frames: every later frame of those samples too, as a still read with the caption alone",
    )
    args = parser.parse_args(argv)
    try:
        if args.stills and not args.first_frames:
            raise ValueError("--stills goes with --first-frames DEST")
        if args.first_frames:
            samples = first_frame_shards(
                args.out, args.first_frames, args.divisible_by, args.shards, args.stills
            )
            print(f"{args.first_frames}: {samples} one-frame samples")
        else:
            count = reshard(args.out, args.divisible_by, args.shards)
            print(f"{args.out}: {count} shards")
    except ValueError as err:  # a bad shard (ShardFormatError) or shard count
        print(f"cogvideo-reshard: {err}", file=sys.stderr)
        sys.exit(2)
    return 0  # the console script exits with this status


if __name__ == "__main__":
    main()
