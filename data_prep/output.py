"""A job's output folder, written so that a rerun resumes without duplicates.

    shards/shard-000000.tar   WebDataset shards (schema: cogvideo/shards.py)
    manifest.jsonl            one row per sample: key, source, clip, window, fps, stage, shard, and
                              video: what the source held (data_prep.video.probe's properties)
    rejected.jsonl            one row per input or clip not used: source, reason, detail, clip; and
                              one per caption row without a video and per ignored file of the input
                              folders (data_prep.inputs.LISTING_REASONS), rewritten by every run
    done.jsonl                the commit log: one row per closed shard, with the inputs it finished
    summary.json              totals over the whole folder, rewritten at the end of every run

Commit order: shard renamed into place -> its manifest rows -> rejected rows of the inputs
finished -> one line in done.jsonl. Only that last line makes them count: on reopening, shards,
manifest rows and rejected rows not covered by a complete done line are removed, and inputs
not listed as finished are processed again, skipping samples whose key is already committed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import webdataset as wds

from cogvideo.jsonl import iter_jsonl, rewrite_jsonl, write_jsonl
from data_prep.inputs import LISTING_REASONS

SHARD_DIR = "shards"
MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
DONE = "done.jsonl"
SUMMARY = "summary.json"


def video_traits(video: dict) -> list[str]:
    """What summary.json counts of a used input's `video` properties (data_prep.video.probe)."""
    traits = [f"range_{video['range']}", f"matrix_{video['matrix']}"]
    traits += [
        name
        for name, present in (
            ("rotated", video["rotation"] != 0 or video["mirrored"]),
            ("variable_frame_rate", video["vfr"]),
            ("anamorphic", video["sar"] != "1:1"),
            ("interlaced", video["interlaced"]),
            ("several_video_streams", video["video_streams"] > 1),
        )
        if present
    ]
    return traits


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class PrepOutput:
    """The folder's committed state (finished inputs, their hashes) and the open shard.
    Everything else is streamed from the files, so memory does not grow with the samples."""

    def __init__(self, root: str | Path, shard_samples: int, shard_bytes: int):
        self.root = Path(root)
        self.shards = self.root / SHARD_DIR
        self.shards.mkdir(parents=True, exist_ok=True)
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        self.finished: set[str] = set()  # entries of committed inputs
        self.hashes: dict[str, str] = {}  # sha256 -> source, of committed inputs that were used
        self.resumed_keys: set[str] = set()  # committed samples of inputs to be processed again
        self._recover()
        self._writer: wds.TarWriter | None = None
        self._open_samples = self._open_bytes = 0
        self._manifest: list[dict] = []
        self._rejected: list[dict] = []
        self._inputs: list[dict] = []

    # ---- reopening ----------------------------------------------------------------------
    def _recover(self) -> None:
        committed = set()
        for commit in iter_jsonl(self.root / DONE):
            committed.add(commit["shard"])
            for record in commit["inputs"]:
                self.finished.add(record["entry"])
                if record["status"] == "used":
                    self.hashes[record["sha256"]] = record["source"]
        for path in self.shards.iterdir():
            if path.name not in committed:  # a shard being written, or renamed but not committed
                path.unlink()
        rewrite_jsonl(self.root / DONE, lambda row: True)  # drops a half-written last line
        rewrite_jsonl(self.root / MANIFEST, lambda row: row["shard"] in committed)
        rewrite_jsonl(self.root / REJECTED, lambda row: row["entry"] in self.finished)
        # samples only come from an input's first listing, whose entry is its path
        self.resumed_keys = {
            row["key"] for row in iter_jsonl(self.root / MANIFEST) if row["source"] not in self.finished
        }
        self._next_shard = 1 + max((int(name[6:12]) for name in committed if name), default=-1)

    # ---- writing ------------------------------------------------------------------------
    def add_sample(self, fields: dict, manifest_row: dict) -> bool:
        """Write one encoded sample (encode_sample's dict); False when it is already committed."""
        if fields["__key__"] in self.resumed_keys:
            return False
        if self._writer is None:
            self._shard = shard_name(self._next_shard)
            self._writer = wds.TarWriter(str(self.shards / f"{self._shard}.tmp"), encoder=False, mtime=0)
        self._writer.write(fields)
        self._manifest.append({**manifest_row, "shard": self._shard})
        self._open_samples += 1
        self._open_bytes += sum(len(v) for k, v in fields.items() if k != "__key__")
        if self._open_samples >= self.shard_samples or self._open_bytes >= self.shard_bytes:
            self.commit()
        return True

    def record_unmatched(self, rows: list[dict]) -> None:
        """This run's rows for what the captions and folders hold that is no input, after its last
        commit (their entries are no input's: reopening the folder drops them, and the next run
        writes them anew, in the same place)."""
        write_jsonl(self.root / REJECTED, rows)

    def add_rejection(self, row: dict) -> None:
        self._rejected.append(row)

    def finish_input(self, record: dict) -> None:
        self._inputs.append(record)

    def commit(self) -> None:
        """Close the open shard (if any) and commit it with every input finished so far."""
        shard = None
        if self._writer is not None:
            self._writer.close()
            shard = self._shard
            os.replace(self.shards / f"{shard}.tmp", self.shards / shard)
            write_jsonl(self.root / MANIFEST, self._manifest)
            self._next_shard += 1
        elif not self._inputs:
            return
        done = {r["entry"] for r in self._inputs}
        write_jsonl(self.root / REJECTED, [r for r in self._rejected if r["entry"] in done])
        write_jsonl(self.root / DONE, [{"shard": shard, "inputs": self._inputs}])
        self.finished.update(r["entry"] for r in self._inputs)
        self.hashes.update((r["sha256"], r["source"]) for r in self._inputs if r["status"] == "used")
        self._rejected = [r for r in self._rejected if r["entry"] not in done]
        self._writer, self._manifest, self._inputs = None, [], []
        self._open_samples = self._open_bytes = 0

    # ---- totals -------------------------------------------------------------------------
    def summary(self, run: dict) -> dict:
        """Totals over the folder (all runs, streamed from its files) plus this run's figures."""
        inputs, rejected_by_reason, clips, seconds = 0, Counter(), 0, 0.0
        held = Counter()
        for commit in iter_jsonl(self.root / DONE):
            for record in commit["inputs"]:
                inputs += 1
                if record["status"] == "used":
                    clips, seconds = clips + record["clips"], seconds + record["seconds"]
                    held.update(video_traits(record["video"]) if "video" in record else [])
                else:
                    rejected_by_reason[record["reason"]] += 1
        by_rate, shards = Counter(), set()
        for row in iter_jsonl(self.root / MANIFEST):
            by_rate[f"stage{row['stage']}@{row['fps']:g}fps"] += 1
            shards.add(row["shard"])
        rejected = sum(rejected_by_reason.values())
        listing = Counter(
            r["reason"] for r in iter_jsonl(self.root / REJECTED) if r["reason"] in LISTING_REASONS
        )
        return {
            "inputs": inputs,
            "inputs_used": inputs - rejected,
            "inputs_rejected": rejected,
            "inputs_rejected_by_reason": dict(rejected_by_reason),
            "videos_without_caption": rejected_by_reason["missing_caption"],
            "captions_without_video": listing["caption_without_video"],
            "captions_superseded": listing["caption_superseded"],
            "files_ignored": listing["ignored_file"],
            "clips": clips,
            "clips_rejected_by_reason": dict(
                Counter(r["reason"] for r in iter_jsonl(self.root / REJECTED) if r["clip"])
            ),
            "samples": sum(by_rate.values()),
            "samples_by_stage_fps": dict(sorted(by_rate.items())),
            "shards": len(shards),
            "inputs_used_by_property": dict(sorted(held.items())),
            "hours_of_video": seconds / 3600,
            "this_run": run,
        }

    def write_summary(self, summary: dict) -> None:
        (self.root / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
