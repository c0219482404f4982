"""SwissArmyTransformer checkpoints (CogView2 backbone, CogVideo stage 1/2) <-> our format.

Layout read: ``{dir}/latest`` (an iteration or ``release``), ``{dir}/{iteration}/
mp_rank_XX_model_states.pt`` (``{"module": state_dict}``, one per TP rank), ``{dir}/
model_config.json`` (the SAT arguments). SAT splits tensors over TP ranks exactly as we do
(the CogVideo family's TP plan), so rank files are renamed key by key and merged.

CogVideo's added parameters map as follows (THUDM/CogVideo ``models/cogvideo_model.py``):

* ``mixins.attention_plus.{query_key_value,dense}.i.*`` -> ``layers.i.temporal_attention.*``
  (the mixin covers all layers, so index i is layer i);
* ``mixins.attention_plus.attn_distribution.i`` ([hidden]) -> ``layers.i.temporal_gate``;
* ``mixins.extra_position_embedding.position_embeddings.weight`` has ``additional_seqlen``
  rows (2000 = 5 frames x 400). Frame f >= 1 token j has position id ``offset + n*f + j`` and
  CogVideo looks it up at row ``id - (offset + n)`` = ``n*(f-1) + j``; so frames 1..F-1 use
  its first ``(F-1)*n`` rows, which are our ``frame_position_embeddings`` row for row (the
  last 400 rows are never read and are dropped; export writes them as zeros).

``export_sat`` writes the same layout back, one rank file at a time: what it writes imports to
the tensors it was given, bit for bit. Both take `vocab_size` to pad the vocabulary for a TP
split (the release's 150010 ids -> 150016 for TP 8) or drop that padding again
(``cogvideo.checkpoint.format.VocabResize``).
"""

from __future__ import annotations

import dataclasses
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
from cogvideo.config import ModelConfig, get_preset
from cogvideo.configio import ConfigError, from_dict, merge, to_dict
from cogvideo.family import family_of, get_family
from cogvideo.vocab import VocabLayout

COGVIDEO = get_family("cogvideo")  # the family of every model a SAT checkpoint holds

SAT_CONFIG = "model_config.json"
_RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER_PARTS = (
    "input_layernorm",
    "attention.query_key_value",
    "attention.dense",
    "post_attention_layernorm",
    "third_layernorm",
    "fourth_layernorm",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
_RENAMES = [
    (re.compile(r"^transformer\.(word_embeddings|position_embeddings)\.weight$"), r"\1.weight"),
    (
        re.compile(
            r"^transformer\.layers\.(\d+)\.((?:%s)\.(?:weight|bias))$"
            % "|".join(map(re.escape, _LAYER_PARTS))
        ),
        r"layers.\1.\2",
    ),
    (re.compile(r"^transformer\.final_layernorm\.(weight|bias)$"), r"final_layernorm.\1"),
    (
        re.compile(r"^mixins\.attention_plus\.(query_key_value|dense)\.(\d+)\.(weight|bias)$"),
        r"layers.\2.temporal_attention.\1.\3",
    ),
    (re.compile(r"^mixins\.attention_plus\.attn_distribution\.(\d+)$"), r"layers.\1.temporal_gate"),
    (
        re.compile(r"^mixins\.extra_position_embedding\.position_embeddings\.weight$"),
        "frame_position_embeddings.weight",
    ),
]
FRAME_TABLE = "frame_position_embeddings.weight"


def our_name(sat_key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if pattern.match(sat_key):
            return pattern.sub(replacement, sat_key)
    return None


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
        unknown = [k for k in keys if our_name(k) is None]
        if unknown:
            raise CheckpointError(f"{folder}: keys with no counterpart in our model: {unknown[:20]}")
        self.names = {our_name(k): k for k in keys}
        self.dtype = modules[0][keys[0]].dtype
        local = {name: tuple(modules[0][key].shape) for name, key in self.names.items()}
        self.shapes = full_shapes(COGVIDEO.tp_plan, local, size)

    @property
    def stage(self) -> str:
        if not any(".temporal_attention." in n for n in self.names):
            return "backbone"
        return "stage2" if int(self.args.get("cogvideo_stage", 1)) == 2 else "stage1"

    def tensors(self, chunk_bytes: int = DEFAULT_SHARD_BYTES):
        """Yield (our name, full tensor merged over TP), re-opening the memory-mapped rank files
        every `chunk_bytes`, so the pages read for one run are released before the next."""

        def nbytes(name: str) -> int:
            return math.prod(self.shapes[name]) * self.dtype.itemsize

        for run in runs_of(list(self.names), nbytes, chunk_bytes):
            modules = [_module(file) for file in self.files]
            for name in run:
                yield name, COGVIDEO.tp_plan.merge_tensor(name, [m[self.names[name]] for m in modules])
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


def _sat_vocab(args: dict, base: VocabLayout) -> VocabLayout:
    """The vocabulary of a SAT checkpoint: SAT records only its size. icetk's layout (CogView2,
    CogVideo) when the size holds icetk's ids, else the base preset's ranges at this size."""
    size = args["vocab_size"]
    if size == base.vocab_size:
        return base
    icetk = VocabLayout.icetk()
    layout = icetk if size >= icetk.min_vocab_size else base
    try:
        return dataclasses.replace(layout, vocab_size=size)
    except ValueError as err:
        raise CheckpointError(
            f"{SAT_CONFIG}: vocab_size={size} cannot hold the vocabulary of the base preset "
            f"({err}); pass --base PRESET or --set vocab.num_text_tokens=... etc."
        ) from None


def sat_model_config(
    args: dict, stage: str, base: ModelConfig | None = None, overrides: dict | None = None
) -> ModelConfig:
    """Our ModelConfig for SAT arguments (model_config.json): shape, vocabulary size, dropout,
    layout and window come from them; what SAT does not record (frame size in pixels, the
    vocabulary's ranges when not icetk's, the frames' position offset: fixed in the released
    code) from `base`; `overrides` (dotted model fields) last."""
    base = base or get_preset("cogview2-6b")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
        if not isinstance(args.get(key), int):
            raise CheckpointError(f"{SAT_CONFIG}: integer field {key!r} missing")
    order = args.get("layernorm_order", "sandwich")
    if order != "sandwich":
        raise CheckpointError(
            f"{SAT_CONFIG}: layernorm_order={order!r}; CogView2/CogVideo (and this model) use 'sandwich'"
        )
    per_head = args.get("hidden_size_per_attention_head")
    if per_head and per_head * args["num_attention_heads"] != args["hidden_size"]:
        raise CheckpointError(
            f"{SAT_CONFIG}: hidden_size_per_attention_head={per_head} x num_attention_heads "
            f"!= hidden_size={args['hidden_size']}; this model needs them equal"
        )
    changes = dict(
        stage=stage,
        num_layers=args["num_layers"],
        hidden_size=args["hidden_size"],
        num_heads=args["num_attention_heads"],
        vocab=_sat_vocab(args, base.vocab),
        max_position_embeddings=args["max_sequence_length"],
        image_position_offset=base.position_offset,  # the checkpoint's, whatever its text length
        ffn_hidden_size=args.get("inner_hidden_size") or 0,
        layernorm_epsilon=float(args.get("layernorm_epsilon", base.layernorm_epsilon)),
    )
    for key in ("hidden_dropout", "attention_dropout"):
        if key in args:
            changes[key] = float(args[key])
    if "layout" in args:
        layout = args["layout"]
        text, first, total = [int(x) for x in (layout.split(",") if isinstance(layout, str) else layout)]
        frame_tokens = round((first - text) ** 0.5)
        changes.update(
            text_length=text,
            frame_tokens=frame_tokens,
            num_frames=(total - text) // (first - text),
            frame_size=frame_tokens * base.frame_size // base.frame_tokens,
        )
    if stage == "backbone":
        changes["num_frames"] = 1
    if int(args.get("window_size", -1)) > 0:
        changes.update(window_size=int(args["window_size"]), window_shift=int(args["window_size"]) // 2)
    source = f"{SAT_CONFIG} with --set {overrides}" if overrides else SAT_CONFIG
    try:
        cfg = base.replace(name=f"sat-{stage}", **changes)
        if overrides:
            cfg = from_dict(ModelConfig, merge(to_dict(cfg), overrides), prefix="model")
        return cfg.validate()
    except (ValueError, ConfigError) as err:
        raise CheckpointError(f"{source}: gives an invalid model config: {err}") from None


def import_sat(
    src: str | Path,
    dst: str | Path,
    *,
    base: ModelConfig | str | None = None,
    stage: str | None = None,
    iteration: str | None = None,
    overrides: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    **write,
) -> Path:
    """Convert a SAT checkpoint (any TP degree) to our format at `dst`; the model config comes
    from its model_config.json (see `sat_model_config`), then `overrides`. `write`:
    `write_checkpoint`'s tensor_parallel, force, dtype, vocab_size (pad the vocabulary rows).

    `stage` None keeps the checkpoint's own (backbone, or CogVideo's stage); a backbone imported
    as "stage1"/"stage2" gets its video parts from ``init_video_from_backbone``."""
    sat = SatCheckpoint(src, iteration)
    base = get_preset(base) if isinstance(base, str) else base
    cfg = sat_model_config(sat.args, sat.stage, base, overrides)
    target = stage or sat.stage
    if target != sat.stage and sat.stage != "backbone":
        raise CheckpointError(
            f"{src}: is a CogVideo {sat.stage} checkpoint; it cannot be imported as {target}"
        )
    shapes, tensors = _our_shapes(sat, cfg), _our_tensors(sat, cfg, max_shard_bytes)
    source = f"SwissArmyTransformer {sat.stage} checkpoint {sat.path} (TP={sat.tensor_parallel})"
    if target != sat.stage:
        check_shapes(shapes, cfg, str(src))
        cfg, shapes, tensors = _backbone_as_video(cfg, tensors, target, base)
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


def _our_shapes(sat: SatCheckpoint, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full shapes in our model: the extra position table cut to frames 1.. (module docstring),
    the temporal gates flat."""
    frame_rows = (cfg.num_frames - 1) * cfg.tokens_per_frame
    shapes = dict(sat.shapes)
    if FRAME_TABLE in shapes:
        if shapes[FRAME_TABLE][0] < frame_rows:
            raise CheckpointError(
                f"{sat.path}: extra position table has {shapes[FRAME_TABLE][0]} rows; "
                f"frames 1..{cfg.num_frames - 1} need {frame_rows}"
            )
        shapes[FRAME_TABLE] = (frame_rows, shapes[FRAME_TABLE][1])
    for name in shapes:
        if name.endswith(".temporal_gate"):
            shapes[name] = (cfg.hidden_size,)
    return shapes


def _our_tensors(sat: SatCheckpoint, cfg: ModelConfig, chunk_bytes: int):
    frame_rows = (cfg.num_frames - 1) * cfg.tokens_per_frame
    for name, tensor in sat.tensors(chunk_bytes):
        if name == FRAME_TABLE:
            tensor = tensor[:frame_rows]
        elif name.endswith(".temporal_gate"):
            tensor = tensor.reshape(cfg.hidden_size)
        yield name, tensor
        del tensor


def _backbone_as_video(cfg: ModelConfig, tensors, target: str, base: ModelConfig | None):
    """A backbone's tensors as a `target` video model's (cfg, shapes, tensors); its frame count
    from `base` when that is a video preset, else the release's."""
    from cogvideo.model import init_video_from_backbone

    frames = (
        base.num_frames
        if base is not None and base.num_frames > 1
        else get_preset("cogvideo-stage1").num_frames
    )
    video_cfg = cfg.replace(name=f"sat-{target}", stage=target, num_frames=frames).validate()
    video = init_video_from_backbone(dict(tensors), video_cfg)
    return video_cfg, {n: tuple(t.shape) for n, t in video.items()}, video.items()


# ---- export ------------------------------------------------------------------------------------
_EXPORT_NAMES = [
    (re.compile(r"^(word_embeddings|position_embeddings)\.weight$"), r"transformer.\1.weight"),
    (
        re.compile(r"^layers\.(\d+)\.temporal_attention\.(query_key_value|dense)\.(weight|bias)$"),
        r"mixins.attention_plus.\2.\1.\3",
    ),
    (re.compile(r"^layers\.(\d+)\.temporal_gate$"), r"mixins.attention_plus.attn_distribution.\1"),
    (re.compile(r"^layers\.(.*)$"), r"transformer.layers.\1"),
    (re.compile(r"^final_layernorm\.(weight|bias)$"), r"transformer.final_layernorm.\1"),
    (
        re.compile(r"^frame_position_embeddings\.weight$"),
        "mixins.extra_position_embedding.position_embeddings.weight",
    ),
]


def sat_name(name: str) -> str:
    for pattern, replacement in _EXPORT_NAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    raise CheckpointError(f"{name}: no SwissArmyTransformer counterpart")


def sat_args(cfg: ModelConfig, tensor_parallel: int) -> dict:
    """model_config.json: the SAT arguments `sat_model_config` reads back."""
    args = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "vocab_size": cfg.vocab.vocab_size,
        "max_sequence_length": cfg.position_rows,
        "inner_hidden_size": cfg.ffn_hidden_size or None,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "layernorm_order": "sandwich",
        "hidden_dropout": cfg.hidden_dropout,
        "attention_dropout": cfg.attention_dropout,
        "model_parallel_size": tensor_parallel,
    }
    if cfg.has_temporal:
        T, n = cfg.text_length, cfg.tokens_per_frame
        args.update(
            layout=f"{T}, {T + n}, {T + cfg.num_frames * n}",
            additional_seqlen=cfg.num_frames * n,
            window_size=cfg.window_size if cfg.stage == "stage2" else -1,
            cogvideo_stage=2 if cfg.stage == "stage2" else 1,
        )
    return args


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
    if family_of(ckpt.cfg) is not COGVIDEO:
        raise CheckpointError(
            f"{src}: holds a {family_of(ckpt.cfg).name!r} model; SwissArmyTransformer's layout holds "
            f"CogView2 / CogVideo models (family {COGVIDEO.name!r}) only"
        )
    cfg, resize = VocabResize.of(ckpt.cfg, vocab_size)
    tp = tensor_parallel or ckpt.tensor_parallel
    try:
        cfg.validate(tp)
    except ValueError as err:
        raise CheckpointError(f"cannot export {src} at TP={tp}: {err}") from None
    tag = iteration or str(ckpt.iteration)
    with atomic_output_dir(dst, force) as tmp:
        (tmp / tag).mkdir()
        for rank in range(tp):
            module = {}
            for name in ckpt.names():
                tensor = _sat_tensor(ckpt, cfg, resize, name, rank, tp)
                module[sat_name(name)] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
            torch.save(
                {"module": module, "iteration": ckpt.iteration},
                tmp / tag / f"mp_rank_{rank:02d}_model_states.pt",
            )
            del module
        (tmp / "latest").write_text(tag)
        write_json(tmp / SAT_CONFIG, sat_args(cfg, tp))
    return Path(dst)


def _sat_tensor(ckpt: Checkpoint, cfg: ModelConfig, resize, name: str, rank: int, tp: int) -> torch.Tensor:
    """TP rank `rank`'s part of tensor `name` as SAT stores it (the frame table at SAT's
    additional_seqlen rows, the vocabulary resized)."""
    if resize is not None and resize.applies(name, ckpt.shapes[name]):
        return shard_tensor(ckpt.plan, name, resize.tensor(name, ckpt.full(name)), rank, tp)
    tensor = ckpt.local(name, rank, tp)
    if name == FRAME_TABLE:
        frame_rows = cfg.num_frames * cfg.tokens_per_frame  # SAT's additional_seqlen
        tensor = torch.cat([tensor, tensor.new_zeros(frame_rows - tensor.shape[0], tensor.shape[1])])
    return tensor
