"""`cogvideo-prep` of a test's videos on a local Ray (2 CPUs), and the samples its shards hold."""

import os
from pathlib import Path

import pytest
import ray
from webdataset.tariterators import tarfile_samples

from cogvideo.raystart import start_ray
from cogvideo.shards import Sample, decode_sample
from data_prep import pipeline

TESTS = Path(__file__).resolve().parent


def start_ray_importing_tests() -> None:
    """A local Ray (2 CPUs) whose workers import the repository and tests/ (a family or tokenizer
    loader a test defines). A Ray another test left running in this process is shut down first:
    its workers were started without that path."""
    ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS.parent), str(TESTS)]))
        start_ray(num_cpus=2, log_to_driver=False)


def prep_on_ray(tmp_path: Path, captions: Path, *settings: str) -> tuple[dict, list[str], list[Sample]]:
    """Prep `tmp_path/videos` with `captions` into `tmp_path/out` with `settings` (key=value);
    (summary, the shard files, every sample they hold)."""
    start_ray_importing_tests()
    try:
        argv = [
            "--input",
            str(tmp_path / "videos"),
            "--captions",
            str(captions),
            "--out",
            str(tmp_path / "out"),
        ]
        summary = pipeline.run_cli([*argv, "--no-progress", *settings])
    finally:
        ray.shutdown()
    shards = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar"))
    return summary, shards, [decode_sample(raw) for raw in tarfile_samples([{"url": s} for s in shards])]
