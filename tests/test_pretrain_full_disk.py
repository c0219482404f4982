"""A full disk during a save, on a real small filesystem (a tmpfs mounted by the test; where it
cannot mount one, a folder whose checkpoint writes fail with ENOSPC past the same size:
tests/simulated_disk.py): the run warns before starting, stops in one line naming the directory,
the bytes a checkpoint takes and the bytes free, leaves the previous checkpoint whole and no
partial one, and resumes from it once space is freed. Two ranks: a write that fails on one rank
must not leave the others waiting in a barrier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from simulated_disk import BYTES_VAR, DISK_VAR, used_bytes
from test_pretrain_dist import ROOT
from test_pretrain_dist import ws as ws  # noqa: F401  (the shards, tokenizer and initial weights)
from test_pretrain_signals import command

from cogvideo.checkpoint.training import read_complete, tag_for, verify_tag


@dataclass
class SmallDisk:
    path: Path
    simulated: int | None = None  # the capacity of a simulated one (tests/simulated_disk.py)
    env: dict = field(default_factory=dict)  # what the trainer's processes need to see a simulated one

    def free(self) -> int:
        if self.simulated is None:
            return shutil.disk_usage(self.path).free
        return self.simulated - used_bytes(self.path)


@contextmanager
def small_filesystem(path: Path, size: int, simulated_in: Path) -> Iterator[SmallDisk]:
    """A tmpfs of `size` bytes mounted at `path`; where none can be mounted, the folder `path`
    simulated as one of that size (tests/simulated_disk.py, as sitecustomize in `simulated_in`)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        simulated_in.mkdir()
        shutil.copy(Path(__file__).with_name("simulated_disk.py"), simulated_in / "sitecustomize.py")
        env = {"PYTHONPATH": f"{simulated_in}{os.pathsep}{ROOT}", DISK_VAR: str(path), BYTES_VAR: str(size)}
        yield SmallDisk(path, size, env)
        return
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def train(ws, disk: SmallDisk, run: Path, logs: Path, steps: int) -> subprocess.CompletedProcess:
    # the logs elsewhere: only checkpoints fill the small filesystem
    extra = (
        f"training.max_steps={steps}",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=1",
        f"logging.dir={logs}",
    )
    cmd, env = command("nproc-per-node", ws, run, *extra)
    return subprocess.run(cmd, cwd=ROOT, env={**env, **disk.env}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_full_disk_stops_in_one_line_and_the_previous_checkpoint_resumes(ws, tmp_path):
    logs = tmp_path / "logs"
    with small_filesystem(tmp_path / "small", 16 * 2**20, tmp_path / "simulated") as disk:
        run = disk.path / "run"
        first = train(ws, disk, run, logs, 2)
        assert first.returncode == 0, first.stderr[-4000:]
        size = sum(e["bytes"] for e in read_complete(run / tag_for(2))["files"].values())
        ballast = disk.path / "ballast"
        ballast.write_bytes(b"\0" * (disk.free() - size // 2))  # room for half a checkpoint

        full = train(ws, disk, run, logs, 4)
        assert full.returncode == 4 and "Traceback" not in full.stderr, full.stderr[-4000:]
        assert f"checkpoint.dir {run}: " in full.stderr and "less than one checkpoint (about" in full.stderr
        lines = [line for line in full.stderr.splitlines() if line.startswith("cogvideo-train:")]
        assert len(lines) == 2 and lines[1].endswith("exited with status 4 (its log is above)"), full.stderr[
            -4000:
        ]
        assert f"saving step 4 into checkpoint.dir {run}: no space left on device (writing " in lines[0]
        free = int(lines[0].split(" bytes, ")[1].split(" are free")[0].replace(",", ""))
        need = int(lines[0].split("takes about ")[1].split(" bytes")[0].replace(",", ""))
        assert need == size and free < need
        assert (
            f"the previous checkpoint {run / tag_for(2)} is intact" in lines[0]
            and "resume with: " in lines[0]
        )
        assert verify_tag(run / tag_for(2)) == [] and not (run / tag_for(4)).exists()
        assert (run / "latest").read_text() == tag_for(2) and not (run / "LOCK").exists()

        ballast.unlink()
        resumed = train(ws, disk, run, logs, 4)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert f"resumed from {run / tag_for(2)} at step 2" in resumed.stderr
        assert (run / "latest").read_text() == tag_for(4) and verify_tag(run / tag_for(4)) == []
    steps = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the rows of the failed run's steps 3 and 4 were replaced
