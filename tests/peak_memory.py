"""Peak memory of one `cogvideo-convert` command, measured in a fresh process (tests' helper).

The probe imports the converter and every model family (a command that looks a layout up among
the families imports them on first use: modules, not what the command holds), resets the
kernel's peak-RSS mark (VmHWM, via /proc/self/clear_refs) and reports how far the peak rose above the RSS it had before the
command ran: what the command itself held, memory-mapped pages it read included."""

from __future__ import annotations

import json
import os
import sys

from process_helpers import REPO, run_ok

PROBE = """
import json, sys
import cogvideo.checkpoint.cli as cli
from cogvideo.family import families

families()

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
rc = cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "before": before, "peak": status("VmHWM")}))
"""


def streaming_bound(tp_out: int, shard_bytes: int, largest_tensor: int) -> int:
    """What a streaming converter command may hold above opening its input: each of the `tp_out`
    output ranks' writers at most one shard, the one flushing also its serialised copy, and one
    shard of allocator slack ((tp_out + 2) shards); the tensor being converted as read (its TP
    parts or the mapped pages of its run), merged, split and padded (4 x the largest tensor);
    16 MiB of noise. A command that kept what it read grows with the whole checkpoint instead."""
    return (tp_out + 2) * shard_bytes + 4 * largest_tensor + (16 << 20)


def converter_peak(args: list[str], timeout: int = 1200) -> dict:
    """{"before": RSS before the command, "increase": peak RSS - before} in bytes."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = run_ok([sys.executable, "-c", PROBE, *map(str, args)], env, timeout, cwd=REPO)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, proc.stderr[-3000:]
    return {"before": result["before"], "increase": result["peak"] - result["before"]}
