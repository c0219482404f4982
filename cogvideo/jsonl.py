"""JSON Lines files that survive a crash: a reader sees complete rows only, a writer fsyncs;
rows written twice (two runs on one folder) are dropped by `dedupe_jsonl`.

Used by data preparation (manifest, rejected and commit logs), the trainer's metrics log and the demo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Complete rows only: a line cut short by a crash is ignored."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def write_jsonl(path: Path, rows: Iterable[dict], mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep only the complete rows that pass `keep`; the file is rewritten (streamed through a
    temporary file) only when that drops something."""
    if not path.exists():
        return
    if _ends_mid_line(path) or not all(keep(row) for row in iter_jsonl(path)):
        write_jsonl(path.with_suffix(".tmp"), (row for row in iter_jsonl(path) if keep(row)), "w")
        os.replace(path.with_suffix(".tmp"), path)


def dedupe_jsonl(path: Path, key: Callable[[dict], Hashable]) -> int:
    """Keep the first complete row of each `key`, streamed; the file is rewritten only when that
    drops something. Returns the number of rows dropped. The keys are held in memory: a repair."""

    def firsts() -> Iterator[dict]:
        seen: set = set()
        for row in iter_jsonl(path):
            if (k := key(row)) not in seen:
                seen.add(k)
                yield row

    if not path.exists():
        return 0
    dropped = sum(1 for _ in iter_jsonl(path)) - sum(1 for _ in firsts())
    if dropped:
        write_jsonl(path.with_suffix(".tmp"), firsts(), "w")
        os.replace(path.with_suffix(".tmp"), path)
    return dropped


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
