"""How SwissArmyTransformer names, shapes and configures a family's checkpoints: the interface.

A family with a SAT layout names it in its spec (`ModelFamily.sat_layout`, "module:attribute",
imported on use) and implements it in its package (CogVideo and CogView2:
`cogvideo/models/cogvideo/sat.py`; DSR: `cogvideo/models/dsr/sat.py`). `cogvideo-convert
import-sat` asks each layout whether a checkpoint is its (`claims`), and `export-sat` writes a
checkpoint through its family's layout: the names (`renames`, `exports`), the conversion of the
tensors and the model config from `model_config.json`.
"""

from __future__ import annotations

import torch

from cogvideo.checkpoint.io import CheckpointError
from cogvideo.configio import ConfigError, from_dict, merge, to_dict

SAT_CONFIG = "model_config.json"


def rename(rules, name: str) -> str | None:
    """`name` by the first of `rules` ((pattern, replacement) pairs) that matches; None: none does."""
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def configured(base, changes: dict, overrides: dict | None):
    """`base` (a family's model config) with `changes` from the file, then the user's dotted
    `overrides`, validated."""
    source = f"{SAT_CONFIG} with --set {overrides}" if overrides else SAT_CONFIG
    try:
        cfg = base.replace(**changes)
        if overrides:
            cfg = from_dict(type(cfg), merge(to_dict(cfg), overrides), prefix="model")
        return cfg.validate()
    except (ValueError, ConfigError) as err:
        raise CheckpointError(f"{source}: gives an invalid model config: {err}") from None


def parse_layout(layout) -> list[int]:
    """SAT's `layout` argument, a "a,b,c" string or a list."""
    try:
        return [int(x) for x in (layout.split(",") if isinstance(layout, str) else layout)]
    except (TypeError, ValueError):
        raise CheckpointError(f"{SAT_CONFIG}: layout {layout!r} is not three integers") from None


class SatLayout:
    """One family's SAT names (`renames`: SAT key -> ours, `exports`: ours -> SAT key) and the
    conversions of its tensors and config. Subclasses set the class attributes and override
    what differs from the identity mapping."""

    family = ""
    default_base = ""
    renames: list = []
    exports: list = []

    def claims(self, keys: set[str], args: dict) -> bool:
        raise NotImplementedError

    def our_name(self, key: str) -> str | None:
        return rename(self.renames, key)

    def sat_name(self, name: str) -> str:
        key = rename(self.exports, name)
        if key is None:
            raise CheckpointError(f"{name}: no SwissArmyTransformer counterpart")
        return key

    def stage(self, names: set[str], args: dict) -> str:
        return "backbone"

    def model_config(self, args: dict, stage: str, shapes: dict, base, overrides: dict | None):
        raise NotImplementedError

    def args(self, cfg, tensor_parallel: int) -> dict:
        raise NotImplementedError

    def as_stage(self, cfg, tensors, stage: str, target: str, base):
        """A `stage` checkpoint's (cfg, tensors) as a `target` model's (cfg, shapes, tensors)."""
        raise CheckpointError(f"is a {self.family} {stage} checkpoint; it cannot be imported as {target}")

    def our_shapes(self, cfg, shapes: dict) -> dict:
        """Full shapes in our model of the full SAT tensors' `shapes` (by our names)."""
        return dict(shapes)

    def our_tensor(self, cfg, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sat_tensor(self, cfg, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """TP rank part (or full tensor) of ours -> SAT's (same split)."""
        return tensor
