"""A job's output folder, written so that a rerun resumes without duplicates.

    shards/shard-000000.tar   WebDataset shards (schema: cogvideo/shards.py)
    manifest.jsonl            one row per sample: key, source, clip, window, fps, stage, shard
    rejected.jsonl            one row per input or clip not used: source, reason, detail, clip
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

SHARD_DIR = "shards"
MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
DONE = "done.jsonl"
SUMMARY = "summary.json"


def read_jsonl(path: Path) -> list[dict]:
    """Complete rows only: a line cut short by a crash is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n"):
            rows.append(json.loads(line))
    return rows


def write_jsonl(path: Path, rows: list[dict], mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class PrepOutput:
    def __init__(self, root: str | Path, shard_samples: int, shard_bytes: int):
        self.root = Path(root)
        self.shards = self.root / SHARD_DIR
        self.shards.mkdir(parents=True, exist_ok=True)
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        self.finished: dict[str, dict] = {}  # entry -> its input record, committed
        self.keys: set[str] = set()  # committed sample keys
        self._recover()
        self._writer: wds.TarWriter | None = None
        self._open_samples = self._open_bytes = 0
        self._manifest: list[dict] = []
        self._rejected: list[dict] = []
        self._inputs: list[dict] = []

    # ---- reopening ----------------------------------------------------------------------
    def _recover(self) -> None:
        commits = read_jsonl(self.root / DONE)
        committed = {c["shard"] for c in commits if c["shard"]}
        for commit in commits:
            for record in commit["inputs"]:
                self.finished[record["entry"]] = record
        for path in self.shards.iterdir():
            if path.name not in committed:  # a shard being written, or renamed but not committed
                path.unlink()
        manifest = read_jsonl(self.root / MANIFEST)
        kept = [row for row in manifest if row["shard"] in committed]
        rejected = read_jsonl(self.root / REJECTED)
        kept_rejected = [row for row in rejected if row["entry"] in self.finished]
        if len(kept) != len(manifest) or self._has_partial(MANIFEST):
            write_jsonl(self.root / MANIFEST, kept, "w")
        if len(kept_rejected) != len(rejected) or self._has_partial(REJECTED):
            write_jsonl(self.root / REJECTED, kept_rejected, "w")
        if self._has_partial(DONE):
            write_jsonl(self.root / DONE, commits, "w")
        self.keys = {row["key"] for row in kept}
        self._next_shard = 1 + max((int(name[6:12]) for name in committed), default=-1)

    def _has_partial(self, name: str) -> bool:
        path = self.root / name
        return path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")

    def committed_hashes(self) -> dict[str, str]:
        """sha256 -> source of every finished input that had one."""
        return {r["sha256"]: r["source"] for r in self.finished.values() if r.get("sha256") and r["status"] == "used"}

    # ---- writing ------------------------------------------------------------------------
    def add_sample(self, fields: dict, manifest_row: dict) -> bool:
        """Write one encoded sample (encode_sample's dict); False when it is already committed."""
        if fields["__key__"] in self.keys:
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
        self.keys.update(row["key"] for row in self._manifest)
        self.finished.update((r["entry"], r) for r in self._inputs)
        self._rejected = [r for r in self._rejected if r["entry"] not in done]
        self._writer, self._manifest, self._inputs = None, [], []
        self._open_samples = self._open_bytes = 0

    # ---- totals -------------------------------------------------------------------------
    def summary(self, run: dict) -> dict:
        """Totals over the folder (all runs) plus this run's throughput figures in `run`."""
        records = list(self.finished.values())
        used = [r for r in records if r["status"] == "used"]
        manifest = read_jsonl(self.root / MANIFEST)
        rejected = read_jsonl(self.root / REJECTED)
        by_rate = Counter(f"stage{row['stage']}@{row['fps']:g}fps" for row in manifest)
        return {
            "inputs": len(records),
            "inputs_used": len(used),
            "inputs_rejected": len(records) - len(used),
            "inputs_rejected_by_reason": dict(Counter(r["reason"] for r in records if r["status"] != "used")),
            "clips": sum(r["clips"] for r in used),
            "clips_rejected_by_reason": dict(Counter(r["reason"] for r in rejected if r.get("clip"))),
            "samples": len(manifest),
            "samples_by_stage_fps": dict(sorted(by_rate.items())),
            "shards": len({row["shard"] for row in manifest}),
            "hours_of_video": sum(r["seconds"] for r in used) / 3600,
            "this_run": run,
        }

    def write_summary(self, summary: dict) -> None:
        (self.root / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
