"""Digests of every file in a folder: recorded when the folder is complete, verified before it is read.

Torch, DeepSpeed, Megatron and DCP check no checksum: a bit flipped on disk loads silently. A
record covers every regular file under the folder (sub-folders included), whatever wrote it,
so a part added to a checkpoint later is covered without naming it here::

    {"algorithm": "sha256", "files": {"relative/path": {"bytes": 123, "digest": "hex"}}}

The work splits over processes: `deal` gives each of `parts` processes a share of the files
with about equal bytes (the largest first, each to the least loaded share), every process
digests or verifies its share, and the results are joined (the trainer gathers them over
torch.distributed). sha256 runs on the CPU's SHA extensions where present
(benchmarks/bench_checkpoint_digest.py measures it against the save and the resume).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

ALGORITHM = "sha256"


def file_digest(path: str | Path, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file's bytes, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def folder_files(folder: str | Path, exclude: Iterable[str] = ()) -> dict[str, int]:
    """{relative posix path: bytes} of every regular file under `folder`, in name order; names in
    `exclude` (top-level) are left out."""
    folder, skip = Path(folder), set(exclude)
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative not in skip and path.is_file():
                found[relative] = path.stat().st_size
    return dict(sorted(found.items()))


def deal(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """`sizes`' files in `parts` shares of about equal bytes; the same on every process given the same sizes."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += sizes[name]
    return shares


def digests(folder: str | Path, names: Iterable[str], algorithm: str = ALGORITHM) -> dict[str, dict]:
    """{name: {"bytes", "digest"}} of the named files under `folder`."""
    folder = Path(folder)
    return {
        name: {"bytes": (folder / name).stat().st_size, "digest": file_digest(folder / name, algorithm)}
        for name in names
    }


def make_record(files: dict[str, dict], algorithm: str = ALGORITHM) -> dict:
    return {"algorithm": algorithm, "files": dict(sorted(files.items()))}


def record_folder(folder: str | Path, exclude: Iterable[str] = ()) -> dict:
    """The record of every file under `folder`, in one process."""
    return make_record(digests(folder, folder_files(folder, exclude)))


def size_problems(folder: str | Path, record: dict) -> list[str]:
    """One line per recorded file that is missing or whose size differs (reads no contents)."""
    folder, problems = Path(folder), []
    for name, entry in record["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing (the checkpoint recorded {entry['bytes']} bytes)")
            continue
        except OSError as err:
            problems.append(f"{path}: unreadable ({err.strerror or err})")
            continue
        if size != entry["bytes"]:
            problems.append(
                f"{path}: {size} bytes, the checkpoint recorded {entry['bytes']} (truncated or rewritten)"
            )
    return problems


def content_problems(folder: str | Path, record: dict, names: Iterable[str]) -> list[str]:
    """One line per named file whose contents differ from the record (or that cannot be read)."""
    folder, algorithm, problems = Path(folder), record["algorithm"], []
    for name in names:
        path, entry = folder / name, record["files"][name]
        try:
            if path.stat().st_size != entry["bytes"]:
                problems.append(
                    f"{path}: {path.stat().st_size} bytes, the checkpoint recorded {entry['bytes']} "
                    f"(truncated or rewritten)"
                )
            elif file_digest(path, algorithm) != entry["digest"]:
                problems.append(
                    f"{path}: contents differ from the {algorithm} digest recorded when the checkpoint "
                    f"was completed (corrupted on disk or rewritten)"
                )
        except FileNotFoundError:
            problems.append(f"{path}: missing (the checkpoint recorded {entry['bytes']} bytes)")
        except OSError as err:
            problems.append(f"{path}: unreadable ({err.strerror or err})")
    return problems


def verify_folder(folder: str | Path, record: dict) -> list[str]:
    """Every problem of `folder` against its record, in one process."""
    return content_problems(folder, record, record["files"])
