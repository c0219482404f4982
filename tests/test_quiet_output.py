"""Quiet, honest output: Ray's line about Ray Data's own actor arguments and the libraries' notices
about themselves are filtered exactly (nothing else), and what cannot be measured says so."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from cogvideo.environment import quiet_library_notices
from cogvideo.eval.prompts import ManifestEntry, VideoAnalysis, score
from cogvideo.raystart import RAY_ACTOR_ARGS_NOTICE, stderr_without

# what Ray 2.60's core worker printed on every prep run (one line, from C++)
RAY_LINE = (
    "[2026-12-06 02:38:15,353 E 11785 11785] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(TokenizeSamples))' and ID: '42f5747f7c776993a7a6414c01000000' has constructor "
    "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of "
    "scope or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 "
    "for more details.\n"
)

CHILD = """
import os, sys, time
from cogvideo.raystart import stderr_without
with stderr_without():
    os.write(2, b"before\\n")
    os.write(2, RAY.encode()[:40])  # a C++ line may arrive in pieces
    time.sleep(0.2)
    os.write(2, RAY.encode()[40:])
    os.write(2, b"[2026-12-06 02:38:15,353 E 1 1] core_worker.cc:99: another error\\n")
    sys.stderr.write("videos:  50%|#####     | 1/2\\r")  # a progress bar: no newline
    sys.stderr.flush()
    time.sleep(0.2)
    os.write(2, RAY.replace("max_restarts > 0", "max_restarts = 0").encode())
os.write(2, b"after\\n")
"""


def test_only_rays_actor_argument_line_is_dropped_from_stderr():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", f"RAY = {RAY_LINE!r}\n" + CHILD],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert RAY_ACTOR_ARGS_NOTICE.search(RAY_LINE.encode())
    assert proc.stderr.decode() == (
        "before\n"
        "[2026-12-06 02:38:15,353 E 1 1] core_worker.cc:99: another error\n"
        "videos:  50%|#####     | 1/2\r"
        + RAY_LINE.replace("max_restarts > 0", "max_restarts = 0")
        + "after\n"
    )


def test_stderr_is_whole_again_after_the_block(capfd):
    with stderr_without():
        os.write(2, RAY_LINE.encode())
    os.write(2, RAY_LINE.encode())
    assert capfd.readouterr().err == RAY_LINE


def test_library_notices_are_filtered_exactly(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_notices()
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning
        )
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
            "`torch.distributed.all_gather_single` instead.",
            FutureWarning,
        )
        warnings.warn("Transformer Engine is too old for this GPU", UserWarning)  # not one of them
        warnings.warn("`torch.distributed.all_reduce` is deprecated.", FutureWarning)
    assert [str(w.message) for w in seen] == [
        "Transformer Engine is too old for this GPU",
        "`torch.distributed.all_reduce` is deprecated.",
    ]
    with caplog.at_level(logging.INFO):
        logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision").info(
            "Using Megatron-FSDP without Transformer Engine."
        )
        logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision").warning("kept")
    assert [r.getMessage() for r in caplog.records] == ["kept"]


def test_prompts_say_not_measured_without_two_durations_of_scored_videos():
    def analysed(displacement):
        return VideoAnalysis("red", "circle", "left", displacement, (-displacement, 0.0), 5, 5)

    entries = [ManifestEntry(Path(f"{i}.mp4"), "a red circle moving left", 2.0) for i in range(2)]
    result = score(entries, [analysed(1.0), analysed(2.0)])
    assert result["displacement_increases_with_duration"] == (
        "not measured: scored videos of two or more durations are needed (only 2 s)"
    )
    longer = ManifestEntry(Path("2.mp4"), "a red circle moving left", 4.0)
    result = score(entries + [longer], [analysed(1.0), analysed(2.0), analysed(3.0)])
    assert result["displacement_increases_with_duration"] is True
