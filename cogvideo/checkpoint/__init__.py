"""Checkpoint formats: ours, and conversion from SwissArmyTransformer and DeepSpeed ZeRO.

Our format (version 1) is a directory::

    config.json   {"format": "cogvideo", "version": 1,
                   "model": {"family": "cogvideo", ...every field of the family's config}
                            (cogvideo.family.model_record; no "family": CogVideo's),
                   "iteration": int, "tensor_parallel": n, "dtype": "fp32",
                   "num_parameters": int, "source": "where it came from",
                   "text_format": <cogvideo.text_format.TextFormat as a dict: the trained text format>}
    n == 1: model-00001-of-0000k.safetensors ... + model.safetensors.index.json
            (full, merged weights; the index is the Hugging Face one: {"metadata":
            {"total_size"}, "weight_map": {name: file}})
    n  > 1: tp_rank_00/ ... tp_rank_{n-1}/, each holding the same files for that rank's local
            tensors (split by the family's TP plan; CogVideo's QKV strided [Q_r; K_r; V_r])
    optimizer/    (optional) Adam moments of the trainable parameters as full tensors named
                  "exp_avg.<param>" / "exp_avg_sq.<param>" (sharded safetensors + index) and
                  state.json {"step", "param_groups", "params", "source", "dropped"}

Tensor names are the model's full state-dict names (docs/architecture.md). Any stored TP
degree loads at any TP degree (``load_model_state`` slices or merges tensor by tensor). Every
writer can pad the vocabulary rows for a TP split or drop that padding (``VocabResize``). The
tools stream: one tensor is read at a time and each output rank holds at most one shard.
Writers build the whole output in a temporary directory renamed at the end and refuse an
existing output unless forced; readers only use safetensors and ``torch.load(weights_only=True)``.
"""

from cogvideo.checkpoint.format import (
    Checkpoint,
    load_model_config,
    load_model_state,
    load_optimizer_state,
    load_text_format,
    reshard,
    save_model_checkpoint,
)
from cogvideo.checkpoint.io import CheckpointError
from cogvideo.checkpoint.sat import import_sat
from cogvideo.checkpoint.zero import convert_zero, restore_optimizer_state

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "convert_zero",
    "import_sat",
    "load_model_config",
    "load_model_state",
    "load_optimizer_state",
    "load_text_format",
    "reshard",
    "restore_optimizer_state",
    "save_model_checkpoint",
]
