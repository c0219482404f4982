"""What the checkpoint digests cost: save and resume of a real training checkpoint (1 rank,
DeepSpeed ZeRO-2, fp32) with and without them, alternating in one run, and the hashes' speed.

    python benchmarks/bench_checkpoint_digest.py [--preset small] [--hidden 512] [--repeats 5]

save    = `CheckpointManager.save`: DeepSpeed's rank files, the loader and RNG parts, the config;
          with digests, every file is then read back and hashed (`cogvideo.checkpoint.digest`).
resume  = `CheckpointManager.load` (DeepSpeed's load, the parts); with digests, `verified` first
          reads and hashes every file.
The files are in the page cache when hashed (as right after a save; a resume from cold storage
reads them once for the digest and then from the cache). Target: digests add <= 25 % to a save.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_train import single_rank_trainer, write_data  # noqa: E402

from cogvideo.checkpoint.digest import file_digest, folder_files, make_record  # noqa: E402
from cogvideo.environment import apply_defaults  # noqa: E402
from cogvideo.models.cogvideo.config import get_preset  # noqa: E402
from pretrain.checkpoint import CheckpointManager  # noqa: E402


def machine() -> str:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "?")
    bf16 = sorted({f for f in ("avx512_bf16", "amx_bf16", "sha_ni") if f in flags})
    return f"{model} ({platform.machine()}; {', '.join(bf16) or 'no bf16/sha flags'}), load average {os.getloadavg()}"


def hash_rates(files: list[Path]) -> dict[str, float]:
    """MB/s of each available hash over the checkpoint's files (from the page cache)."""
    total = sum(f.stat().st_size for f in files) / 1e6
    rates = {}
    for name in ("sha256", "blake2b", "sha1"):
        start = time.perf_counter()
        for f in files:
            file_digest(f, name)
        rates[name] = total / (time.perf_counter() - start)
    try:
        import xxhash

        start = time.perf_counter()
        for f in files:
            with open(f, "rb") as handle:
                hashlib.file_digest(handle, xxhash.xxh3_128)
        rates["xxh3_128"] = total / (time.perf_counter() - start)
    except ImportError:
        pass
    return rates


def no_digests(self, path):
    """The save without digests: COMPLETE records the file list only."""
    return make_record(
        {name: {"bytes": size, "digest": ""} for name, size in folder_files(path, ["COMPLETE"]).items()}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--hidden", type=int, default=512, help="model.hidden_size (checkpoint size)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    apply_defaults()
    root = Path(tempfile.mkdtemp(prefix="bench-digest-"))
    try:
        cfg = get_preset(args.preset).replace(hidden_size=args.hidden)
        shards, tokenizer = write_data(root, cfg, 16)
        trainer = single_rank_trainer(
            None,
            shards,
            [
                f"model.preset={args.preset}",
                f"model.hidden_size={args.hidden}",
                f"data.shards=[{shards[0]}]",
                f"data.text_tokenizer={tokenizer}",
                "parallel.precision=fp32",
                "data.max_cut_text=1",
                f"checkpoint.dir={root / 'run'}",
                "checkpoint.keep_last=1000",
            ],
        )
        trainer.advance()  # the optimizer holds its state
        manager, engine = trainer.checkpoints, trainer.engine
        times = {key: [] for key in ("save", "save+digest", "resume", "verify+resume")}
        for i in range(args.repeats):  # alternating, so that the drifting machine load hits both alike
            start = time.perf_counter()
            with mock.patch.object(CheckpointManager, "_digest_record", no_digests):
                plain = manager.save(engine, 10 * i + 1, trainer.cfg)
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            digested = manager.save(engine, 10 * i + 2, trainer.cfg)
            times["save+digest"].append(time.perf_counter() - start)
            start = time.perf_counter()
            manager.load(engine, plain)
            times["resume"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert manager.verified([digested], explicit=True) == digested
            manager.load(engine, digested)
            times["verify+resume"].append(time.perf_counter() - start)
        files = [digested / name for name in folder_files(digested, ["COMPLETE"])]
        size = sum(f.stat().st_size for f in files)
        median = {key: statistics.median(values) for key, values in times.items()}
        print(f"machine: {machine()}")
        print(f"checkpoint: {len(files)} files, {size / 1e6:.1f} MB ({args.preset}, hidden {args.hidden})")
        for key, value in median.items():
            print(f"  {key:<14} {value * 1000:8.1f} ms  (median of {args.repeats})")
        print(f"save with digests / without:   {median['save+digest'] / median['save']:.2f}x")
        print(f"resume with verify / without:  {median['verify+resume'] / median['resume']:.2f}x")
        print("hash MB/s: " + ", ".join(f"{name} {rate:.0f}" for name, rate in hash_rates(files).items()))
        trainer.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
