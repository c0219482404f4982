"""Weights of a diffusers model from a local folder, one tensor at a time.

A folder in diffusers' layout (what `ModelMixin.save_pretrained` writes; Stable Diffusion ships
its `vae/` and `unet/` so): `config.json` and `diffusion_pytorch_model.safetensors`, or shards
listed by `diffusion_pytorch_model.safetensors.index.json`. Only safetensors are read; the
folder's config must agree with the config the model was built from on the keys that set shapes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHTS = "diffusion_pytorch_model.safetensors"


def folder_problem(path: str, expected: dict, keys: tuple[str, ...], setting: str) -> str | None:
    """Why `path` cannot hold the weights of a model built from `expected` (its config), or None.
    `setting` is the config key naming the folder; the message names the disagreeing key."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return f"{setting}: {folder} has no config.json (expected a diffusers model folder: save_pretrained)"
    if not (folder / WEIGHTS).is_file() and not (folder / f"{WEIGHTS}.index.json").is_file():
        return f"{setting}: {folder} has no {WEIGHTS} (only safetensors weights are read)"
    try:
        stored = json.loads(config_file.read_text())
    except ValueError as err:
        return f"{setting}: {config_file} is not JSON ({err})"
    for key in keys:
        if key in stored and _plain(stored[key]) != _plain(expected[key]):
            return f"{setting}: {config_file} has {key}={stored[key]}, the model config {expected[key]}"
    return None


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@functools.lru_cache(maxsize=4)
def _weight_files(path: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    folder = Path(path)
    index = folder / f"{WEIGHTS}.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        return {name: folder / WEIGHTS for name in f.keys()}


def load_tensor(path: str, name: str, setting: str) -> torch.Tensor:
    """One tensor of the folder's model by its state-dict name."""
    files = _weight_files(path)
    if name not in files:
        raise ValueError(f"{setting}: {path} holds no tensor {name!r} (a model of another shape?)")
    with safe_open(files[name], framework="pt") as f:
        return f.get_tensor(name)
