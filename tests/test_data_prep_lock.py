"""One run per prepared folder: `--out` is locked as checkpoint.dir is (a live holder refused in
one line, a stale one taken over), and a folder two runs wrote at once before it was locked (every
row doubled) is repaired when it is reopened: manifest, commit log, rejections and the summary
count each sample once again, and resharding works. (Two real cogvideo-prep processes started
together: tests/test_data_prep_pipeline.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from process_helpers import sleeping_process, write_lock

from cogvideo.runlock import LockHeld, RunLock
from cogvideo.shards import ClipMeta, encode_sample
from data_prep import reshard
from data_prep.output import DONE, MANIFEST, REJECTED, PrepOutput

USED, REFUSED = 7, 2


def prepare(root) -> dict:
    """A folder as cogvideo-prep leaves it: 7 inputs of one sample each (3 per shard), 2 rejected."""
    out = PrepOutput(root, shard_samples=3, shard_bytes=2**20)
    for i in range(USED + REFUSED):
        record = {"entry": f"v{i}.mp4", "source": f"v{i}.mp4", "sha256": f"{i:064x}", "clips": 1}
        record |= {"seconds": 4.0, "frames": 5, "samples": 1, "status": "used", "reason": ""}
        if i >= USED:
            record |= {"status": "rejected", "reason": "too_short", "clips": 0, "samples": 0}
            out.add_rejection(
                {"entry": f"v{i}.mp4", "source": f"v{i}.mp4", "clip": None, "reason": "too_short"}
            )
        else:
            meta = ClipMeta(
                duration=4.0, fps=1.0, stage=1, source=f"v{i}.mp4", clip_start=0.0, clip_end=4.0, num_frames=5
            )
            frames = {"frames": np.arange(80).reshape(5, 4, 4) + i}
            row = {
                "key": f"k{i}",
                "source": f"v{i}.mp4",
                "clip": [0, 5],
                "window": [0, 4],
                "fps": 1.0,
                "stage": 1,
            }
            out.add_sample(encode_sample(f"k{i}", frames, f"caption {i}", meta), row)
        out.finish_input(record)
    out.commit()
    summary = out.summary({})
    out.write_summary(summary)
    return summary


def written_twice(root) -> None:
    """What two runs started together left: every row of the logs twice, the summary counting both."""
    for name in (MANIFEST, DONE, REJECTED):
        text = (root / name).read_text()
        (root / name).write_text(text + text)


def test_a_folder_written_twice_at_once_is_repaired_on_reopening(tmp_path, caplog, monkeypatch):
    summary = prepare(tmp_path / "once")
    root = tmp_path / "twice"
    prepare(root)
    written_twice(root)
    assert PrepOutput(tmp_path / "once", 3, 2**20).summary({}) == summary  # untouched: nothing repaired
    with monkeypatch.context() as planted:  # without the repair: the counts and reshard's failure
        planted.setattr(PrepOutput, "_repair_duplicates", lambda self: None)
        assert PrepOutput(root, 3, 2**20).summary({})["samples"] == 2 * USED
        with pytest.raises(ValueError, match="zip"):
            reshard.reshard(root, divisible_by=1)
    out = PrepOutput(root, 3, 2**20)
    assert out.summary({}) == summary and out.finished == {f"v{i}.mp4" for i in range(USED + REFUSED)}
    for name in (MANIFEST, DONE, REJECTED):
        assert (root / name).read_text() == (tmp_path / "once" / name).read_text(), name
    assert (
        "written by two runs at once" in caplog.text and "7 manifest rows and 2 rejected rows" in caplog.text
    )
    assert reshard.reshard(root, divisible_by=2) == 4
    rows = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(f"k{i}" for i in range(USED))


def test_the_output_folder_is_locked_like_a_checkpoint_dir(tmp_path):
    with sleeping_process(60) as pid:
        write_lock(tmp_path, pid=pid, slurm_job_id=None)
        with pytest.raises(
            LockHeld, match=rf"^--out {tmp_path}: a live run holds it .*pid {pid}.*use another --out"
        ):
            RunLock(tmp_path, key="--out").acquire()
        with pytest.raises(LockHeld, match="a live run holds it"):  # resharding while it runs, too
            reshard.reshard(tmp_path, divisible_by=1)
    lock = RunLock(tmp_path, key="--out")
    assert f"pid {pid}" in lock.acquire()  # dead now: a stale lock, taken over
    lock.release()
    assert not (tmp_path / "LOCK").exists() and os.listdir(tmp_path) == []
