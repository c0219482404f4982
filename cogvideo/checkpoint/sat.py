"""SwissArmyTransformer checkpoints (CogView2 backbone, CogVideo stage 1/2, CogView2's DSR, any
family with a SAT layout) <-> our format.

Layout read: ``{dir}/latest`` (an iteration or ``release``), ``{dir}/{iteration}/
mp_rank_XX_model_states.pt`` (``{"module": state_dict}``, one per TP rank), ``{dir}/
model_config.json`` (the SAT arguments). SAT splits tensors over TP ranks exactly as we do (the
family's TP plan), so rank files are renamed key by key and merged. Which family a checkpoint
holds, and how its names, tensors and config map, is the family's SAT layout
(the interface in cogvideo/checkpoint/sat_layout.py, implemented in the family's package; a family
names its own in `ModelFamily.sat_layout`).

``export_sat`` writes the same layout back, one rank file at a time: what it writes imports to
the tensors it was given, bit for bit. Both take `vocab_size` to pad the vocabulary for a TP
split (the release's 150010 ids -> 150016 for TP 8) or drop that padding again
(``cogvideo.checkpoint.format.VocabResize``).
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import torch

from cogvideo.checkpoint.format import (
    Checkpoint,
    VocabResize,
    check_shapes,
    full_shapes,
    shard_tensor,
    write_checkpoint,
)
from cogvideo.checkpoint.io import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    atomic_output_dir,
    load_pt,
    read_json,
    runs_of,
    write_json,
)
from cogvideo.checkpoint.sat_layout import SAT_CONFIG, SatLayout
from cogvideo.family import any_preset, families, family_of, get_family

__all__ = ["SAT_CONFIG", "SatCheckpoint", "export_sat", "import_sat"]

_RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def sat_layouts() -> list[SatLayout]:
    """The SAT layouts of every registered family that has one."""
    layouts = []
    for family in families():
        if family.sat_layout:
            module, _, attribute = family.sat_layout.partition(":")
            layouts.append(getattr(importlib.import_module(module), attribute))
    return layouts


def layout_of_family(name: str) -> SatLayout:
    for layout in sat_layouts():
        if layout.family == name:
            return layout
    raise CheckpointError(f"model family {name!r} has no SwissArmyTransformer layout")


def base_preset(name: str):
    """A preset of any family by name (import-sat --base)."""
    try:
        return any_preset(name)
    except ValueError as err:
        raise CheckpointError(f"--base: {err}") from None


class SatCheckpoint:
    """The rank files of one SAT checkpoint, memory-mapped run by run (`tensors`), one tensor at a time."""

    def __init__(self, path: str | Path, iteration: str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.args = read_json(self.path / SAT_CONFIG, "SAT model config")
        if iteration is None:
            latest = self.path / "latest"
            if not latest.is_file():
                raise CheckpointError(f"{latest}: missing (it names the iteration to load)")
            iteration = latest.read_text().strip()
        self.iteration = 0 if iteration == "release" else _int(iteration, self.path / "latest")
        folder = self.path / iteration
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: missing (named by {self.path / 'latest'})")
        ranks = sorted(int(m.group(1)) for f in folder.iterdir() if (m := _RANK_FILE.match(f.name)))
        declared = self.args.get("model_parallel_size")
        size = max(ranks[-1] + 1 if ranks else 0, declared or 0)
        missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(size) if r not in ranks]
        if not ranks or missing:
            raise CheckpointError(f"{folder}: missing rank files {missing or ['mp_rank_00_model_states.pt']}")
        self.tensor_parallel = size
        self.files = [folder / f"mp_rank_{rank:02d}_model_states.pt" for rank in range(size)]
        modules = [_module(file) for file in self.files]
        keys = list(modules[0])
        for rank, module in enumerate(modules[1:], start=1):
            if set(module) != set(keys):
                raise CheckpointError(
                    f"{folder}: rank {rank} keys differ from rank 0: {sorted(set(keys) ^ set(module))[:20]}"
                )
        self.layout = self._layout(folder, set(keys))
        self.plan = get_family(self.layout.family).tp_plan
        unknown = [k for k in keys if self.layout.our_name(k) is None]
        if unknown:
            raise CheckpointError(f"{folder}: keys with no counterpart in our model: {unknown[:20]}")
        self.names = {self.layout.our_name(k): k for k in keys}
        self.dtype = modules[0][keys[0]].dtype
        local = {name: tuple(modules[0][key].shape) for name, key in self.names.items()}
        self.shapes = full_shapes(self.plan, local, size)

    def _layout(self, folder: Path, keys: set[str]) -> SatLayout:
        claims = [layout for layout in sat_layouts() if layout.claims(keys, self.args)]
        if len(claims) != 1:
            raise CheckpointError(
                f"{folder}: {'no' if not claims else 'more than one'} model family's SAT layout "
                f"matches its keys ({[c.family for c in claims]})"
            )
        return claims[0]

    @property
    def stage(self) -> str:
        return self.layout.stage(set(self.names), self.args)

    def model_config(self, base=None, overrides: dict | None = None):
        """Our model config (see the layout's `model_config`); `base`: a preset or its name."""
        base = (
            base_preset(base or self.layout.default_base) if base is None or isinstance(base, str) else base
        )
        return self.layout.model_config(self.args, self.stage, self.shapes, base, overrides)

    def tensors(self, chunk_bytes: int = DEFAULT_SHARD_BYTES):
        """Yield (our name, full tensor merged over TP), re-opening the memory-mapped rank files
        every `chunk_bytes`, so the pages read for one run are released before the next."""

        def nbytes(name: str) -> int:
            return math.prod(self.shapes[name]) * self.dtype.itemsize

        for run in runs_of(list(self.names), nbytes, chunk_bytes):
            modules = [_module(file) for file in self.files]
            for name in run:
                yield name, self.plan.merge_tensor(name, [m[self.names[name]] for m in modules])
            del modules


def _module(file: Path) -> dict:
    module = load_pt(file, mmap=True).get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{file}: no 'module' state dict (not a SwissArmyTransformer checkpoint?)")
    return module


def _int(text: str, where: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{where}: {text!r} is neither an iteration nor 'release'") from None


def import_sat(
    src: str | Path,
    dst: str | Path,
    *,
    base=None,
    stage: str | None = None,
    iteration: str | None = None,
    overrides: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    **write,
) -> Path:
    """Convert a SAT checkpoint (any TP degree) to our format at `dst`; the model config comes
    from its model_config.json (the layout's `model_config`), then `overrides`. `base`: a preset
    (or its name) for what the file does not record (default: the layout's). `write`:
    `write_checkpoint`'s tensor_parallel, force, dtype, vocab_size (pad the vocabulary rows).

    `stage` None keeps the checkpoint's own (backbone, or CogVideo's stage); another stage is the
    layout's `as_stage` (CogVideo's: a backbone imported as "stage1"/"stage2" gets its video parts
    from ``init_video_from_backbone``)."""
    sat = SatCheckpoint(src, iteration)
    base = base_preset(base) if isinstance(base, str) else base
    cfg = sat.model_config(base, overrides)
    target = stage or sat.stage
    try:
        shapes = sat.layout.our_shapes(cfg, sat.shapes)
    except CheckpointError as err:
        raise CheckpointError(f"{sat.path}: {err}") from None
    tensors = ((name, sat.layout.our_tensor(cfg, name, t)) for name, t in sat.tensors(max_shard_bytes))
    source = f"SwissArmyTransformer {sat.stage} checkpoint {sat.path} (TP={sat.tensor_parallel})"
    if target != sat.stage:
        check_shapes(shapes, cfg, str(src))
        try:
            cfg, shapes, tensors = sat.layout.as_stage(cfg, tensors, sat.stage, target, base)
        except CheckpointError as err:
            raise CheckpointError(f"{src}: {err}") from None
        source += f" -> {target}"
    return write_checkpoint(
        dst,
        cfg,
        shapes,
        tensors,
        iteration=sat.iteration,
        max_shard_bytes=max_shard_bytes,
        source=source,
        **write,
    )


# ---- export ------------------------------------------------------------------------------------
def export_sat(
    src: str | Path,
    dst: str | Path,
    *,
    tensor_parallel: int | None = None,
    iteration: str | None = None,
    force: bool = False,
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Our checkpoint -> a SwissArmyTransformer one (`{dst}/{iteration}/mp_rank_XX_model_states.pt`,
    `latest`, `model_config.json`) at `tensor_parallel` (default: the checkpoint's), the vocabulary
    at `vocab_size` rows (default: kept; `VocabResize`). One rank's tensors are in memory at a time."""
    ckpt = Checkpoint(src)
    family = family_of(ckpt.cfg)
    if not family.sat_layout:
        raise CheckpointError(
            f"{src}: holds a {family.name!r} model; SwissArmyTransformer's layout holds the families "
            f"{sorted(layout.family for layout in sat_layouts())} only"
        )
    layout = layout_of_family(family.name)
    cfg, resize = VocabResize.of(ckpt.cfg, vocab_size)
    tp = tensor_parallel or ckpt.tensor_parallel
    try:
        cfg.validate(tp)
        args = layout.args(cfg, tp)
    except ValueError as err:
        raise CheckpointError(f"cannot export {src} at TP={tp}: {err}") from None
    tag = iteration or str(ckpt.iteration)
    with atomic_output_dir(dst, force) as tmp:
        (tmp / tag).mkdir()
        for rank in range(tp):
            module = {}
            for name in ckpt.names():
                tensor = _sat_tensor(ckpt, cfg, layout, resize, name, rank, tp)
                module[layout.sat_name(name)] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
            torch.save(
                {"module": module, "iteration": ckpt.iteration},
                tmp / tag / f"mp_rank_{rank:02d}_model_states.pt",
            )
            del module
        (tmp / "latest").write_text(tag)
        write_json(tmp / SAT_CONFIG, args)
    return Path(dst)


def _sat_tensor(
    ckpt: Checkpoint, cfg, layout: SatLayout, resize, name: str, rank: int, tp: int
) -> torch.Tensor:
    """TP rank `rank`'s part of tensor `name` as SAT stores it (the vocabulary resized)."""
    if resize is not None and resize.applies(name, ckpt.shapes[name]):
        return shard_tensor(ckpt.plan, name, resize.tensor(name, ckpt.full(name)), rank, tp)
    return layout.sat_tensor(cfg, name, ckpt.local(name, rank, tp))
