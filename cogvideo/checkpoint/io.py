"""File-level plumbing shared by every checkpoint format: safe loading of ``.pt`` files,
sharded safetensors with an index, and atomic output directories."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, of the wrong kind or inconsistent."""


class _Record:
    """Inert stand-in for the few plain-data classes DeepSpeed pickles into its files."""

    def __repr__(self):
        return f"Record({self.__dict__})"


def _enum_value(value):
    return value


# DeepSpeed writes these classes into its optimizer files. They are mapped to inert stand-ins
# so that torch's weights-only unpickler can read the files without importing or running
# anything from them.
_DEEPSPEED_STAND_INS = [
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


# SwissArmyTransformer's save_checkpoint stores the RNG states next to the weights: python's
# `random` state (plain tuples), torch's (a tensor) and numpy's ('MT19937', uint32 array, ints,
# float). The array needs exactly these numpy globals (numpy 1.x files name the reconstructor
# numpy.core.multiarray._reconstruct).
_NUMPY_RNG_STATE = [
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,  # the class of the array's dtype, whose state the unpickler sets
]
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def unreadable(path: str | Path, err: Exception) -> CheckpointError:
    """One line for a file torch refuses or cannot read; torch's advice to retry with the
    unrestricted unpickler (which would run whatever the pickle names) is never passed on."""
    text = str(err)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return CheckpointError(
            f"{path}: refused to unpickle {refused.group(1)} (a checkpoint may hold only "
            "tensors, plain containers and RNG state); the file was not loaded"
        )
    if text.startswith("Weights only load failed"):
        after = text.split("WeightsUnpickler error:", 1)[-1].splitlines()
        detail = [line.strip() for line in after if line.strip() and "weights_only" not in line]
        why = detail[0] if detail else "uses pickle operations that are not allowed"
        return CheckpointError(f"{path}: refused to unpickle it ({why}); the file was not loaded")
    return CheckpointError(
        f"{path}: cannot be read as a torch checkpoint ({type(err).__name__}: "
        f"{text.splitlines()[0] if text else ''})"
    )


def load_pt(path: str | Path, mmap: bool = False) -> dict:
    """torch.load with weights_only=True (never unpickles arbitrary objects), on CPU. Beyond
    tensors and plain containers it admits only DeepSpeed's record classes (as inert stand-ins)
    and the numpy array type of SAT's saved RNG state, for this call only.

    With ``mmap`` the tensors stay backed by the file, so only the parts that are read occupy
    memory."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy (pre-1.6) format cannot be mapped
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_STAND_INS + _NUMPY_RNG_STATE):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, foreign pickle, refused global: all the same to the caller
        raise unreadable(path, err) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(data).__name__}")
    return data


def runs_of(names: list[str], nbytes, max_bytes: int):
    """`names` cut into consecutive runs of at most `max_bytes` (`nbytes(name)` each; a larger
    tensor makes a run of its own). Readers of memory-mapped files re-open them for each run, so
    the pages one run read are released before the next."""
    run, size = [], 0
    for name in names:
        if run and size + nbytes(name) > max_bytes:
            yield run
            run, size = [], 0
        run.append(name)
        size += nbytes(name)
    if run:
        yield run


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_output_dir(path: str | Path, force: bool = False):
    """Yield a temporary directory next to ``path``; it becomes ``path`` only if the block
    finishes. An existing ``path`` is an error unless ``force``; nothing is left on failure."""
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(f"{path}: already exists (pass --force / force=True to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(path)


class ShardedWriter:
    """Streams tensors into ``model-0000i-of-0000n.safetensors`` files of at most
    ``max_shard_bytes`` each, plus ``model.safetensors.index.json``. Holds at most one shard."""

    def __init__(
        self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in shard for shard in self.shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(
            self.pending, str(self.directory / f"shard-{len(self.shards):05d}.tmp"), metadata=self.metadata
        )
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{i:05d}.tmp").rename(self.directory / final)
            weight_map.update({name: final for name in names})
        write_json(
            self.directory / INDEX_NAME,
            {"metadata": {"total_size": self.total_bytes, **self.metadata}, "weight_map": weight_map},
        )


class ShardedReader:
    """Reads a directory written by :class:`ShardedWriter` (or a single ``model.safetensors``)
    tensor by tensor. Opening it checks that every file the index names exists and is whole."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            self.weight_map: dict[str, str] = weight_map
        elif (self.directory / SINGLE_NAME).is_file():
            self.weight_map = {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        else:
            raise CheckpointError(f"{self.directory}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self.files = {}
        for filename in dict.fromkeys(self.weight_map.values()):
            self.files[filename] = self._open(filename)
            listed = {n for n, f in self.weight_map.items() if f == filename}
            missing = sorted(listed - set(self.files[filename].keys()))
            if missing:
                raise CheckpointError(
                    f"{self.directory / filename}: index lists tensors the file lacks: "
                    f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
                )

    def _open(self, filename: str):
        path = self.directory / filename
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named in {self.directory / INDEX_NAME})")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a complete safetensors file ({err})") from err

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self.weight_map[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.files[self.weight_map[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: no tensor {name!r}")
        # a handle of its own, closed at once: the file's pages this read mapped in are released,
        # so reading a whole checkpoint tensor by tensor does not keep it resident
        with self._open(self.weight_map[name]) as file:
            return file.get_tensor(name)
