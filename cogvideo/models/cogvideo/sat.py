"""CogView2's and CogVideo's SwissArmyTransformer layout (THUDM/CogView2, THUDM/CogVideo
``models/cogvideo_model.py``): the CogView2 backbone's names (``transformer.*``, shared with DSR's
layout, which builds on this backbone) and CogVideo's added parameters:

* ``mixins.attention_plus.{query_key_value,dense}.i.*`` -> ``layers.i.temporal_attention.*``
  (the mixin covers all layers, so index i is layer i);
* ``mixins.attention_plus.attn_distribution.i`` ([hidden]) -> ``layers.i.temporal_gate``;
* ``mixins.extra_position_embedding.position_embeddings.weight`` has ``additional_seqlen``
  rows (2000 = 5 frames x 400). Frame f >= 1 token j has position id ``offset + n*f + j`` and
  CogVideo looks it up at row ``id - (offset + n)`` = ``n*(f-1) + j``; so frames 1..F-1 use
  its first ``(F-1)*n`` rows, which are our ``frame_position_embeddings`` row for row (the
  last 400 rows are never read and are dropped; export writes them as zeros).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from cogvideo.checkpoint.io import CheckpointError
from cogvideo.checkpoint.sat_layout import SAT_CONFIG, SatLayout, configured, parse_layout
from cogvideo.models.cogvideo.config import ModelConfig, get_preset
from cogvideo.vocab import VocabLayout

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
BACKBONE_RENAMES = [
    (re.compile(r"^transformer\.(word_embeddings|position_embeddings)\.weight$"), r"\1.weight"),
    (
        re.compile(
            r"^transformer\.layers\.(\d+)\.((?:%s)\.(?:weight|bias))$"
            % "|".join(map(re.escape, _LAYER_PARTS))
        ),
        r"layers.\1.\2",
    ),
    (re.compile(r"^transformer\.final_layernorm\.(weight|bias)$"), r"final_layernorm.\1"),
]
BACKBONE_EXPORT = [
    (re.compile(r"^(word_embeddings|position_embeddings)\.weight$"), r"transformer.\1.weight"),
    (
        re.compile(r"^layers\.(\d+)\.((?:%s)\.(?:weight|bias))$" % "|".join(map(re.escape, _LAYER_PARTS))),
        r"transformer.layers.\1.\2",
    ),
    (re.compile(r"^final_layernorm\.(weight|bias)$"), r"transformer.final_layernorm.\1"),
]


def sat_vocab(args: dict, base: VocabLayout) -> VocabLayout:
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


def backbone_fields(args: dict, base: ModelConfig) -> dict:
    """The CogView2 backbone's fields from SAT arguments: shape, vocabulary size, dropout."""
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
    fields = dict(
        num_layers=args["num_layers"],
        hidden_size=args["hidden_size"],
        num_heads=args["num_attention_heads"],
        vocab=sat_vocab(args, base.vocab),
        max_position_embeddings=args["max_sequence_length"],
        ffn_hidden_size=args.get("inner_hidden_size") or 0,
        layernorm_epsilon=float(args.get("layernorm_epsilon", base.layernorm_epsilon)),
    )
    for key in ("hidden_dropout", "attention_dropout"):
        if key in args:
            fields[key] = float(args[key])
    return fields


def backbone_args(cfg: ModelConfig, tensor_parallel: int) -> dict:
    """The backbone's part of model_config.json (what `backbone_fields` reads back)."""
    return {
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


def plus_mixins(attention: str, table: str) -> tuple[list, list]:
    """The (renames, exports) of the two SAT mixins a CogView2-based model adds: attention_plus's
    per-layer QKV and output projection <-> ``layers.i.<attention>.*``, extra_position_embedding's
    table <-> ``<table>`` (CogVideo's temporal channel; DSR's high-res attention)."""
    renames = [
        (
            re.compile(r"^mixins\.attention_plus\.(query_key_value|dense)\.(\d+)\.(weight|bias)$"),
            rf"layers.\2.{attention}.\1.\3",
        ),
        (re.compile(r"^mixins\.extra_position_embedding\.position_embeddings\.weight$"), table),
    ]
    exports = [
        (
            re.compile(rf"^layers\.(\d+)\.{attention}\.(query_key_value|dense)\.(weight|bias)$"),
            r"mixins.attention_plus.\2.\1.\3",
        ),
        (re.compile(rf"^{re.escape(table)}$"), "mixins.extra_position_embedding.position_embeddings.weight"),
    ]
    return renames, exports


FRAME_TABLE = "frame_position_embeddings.weight"
PLUS_RENAMES, PLUS_EXPORTS = plus_mixins("temporal_attention", FRAME_TABLE)


class CogVideoSat(SatLayout):
    """CogView2 (the backbone alone) and CogVideo's stage 1 / stage 2 (module docstring)."""

    family = "cogvideo"
    default_base = "cogview2-6b"
    renames = (
        BACKBONE_RENAMES
        + PLUS_RENAMES
        + [
            (re.compile(r"^mixins\.attention_plus\.attn_distribution\.(\d+)$"), r"layers.\1.temporal_gate"),
        ]
    )
    exports = (
        BACKBONE_EXPORT
        + PLUS_EXPORTS
        + [
            (re.compile(r"^layers\.(\d+)\.temporal_gate$"), r"mixins.attention_plus.attn_distribution.\1"),
        ]
    )

    def claims(self, keys: set[str], args: dict) -> bool:
        """Every SAT checkpoint of CogView2's backbone or CogVideo (the temporal channel's gate
        marks CogVideo's attention_plus)."""
        plus = any(k.startswith("mixins.attention_plus.") for k in keys)
        gated = any(k.startswith("mixins.attention_plus.attn_distribution.") for k in keys)
        return args.get("model_class") != "DsrModel" and (gated or not plus)

    def stage(self, names: set[str], args: dict) -> str:
        if not any(".temporal_attention." in n for n in names):
            return "backbone"
        return "stage2" if int(args.get("cogvideo_stage", 1)) == 2 else "stage1"

    def as_stage(self, cfg: ModelConfig, tensors, stage: str, target: str, base):
        """CogView2's backbone as a CogVideo stage: the video parts from `init_video_from_backbone`,
        the frame count from `base` when that is a video preset, else the release's."""
        if stage != "backbone":
            return super().as_stage(cfg, tensors, stage, target, base)
        from cogvideo.models.cogvideo.model import init_video_from_backbone

        frames = (
            base.num_frames
            if base is not None and base.num_frames > 1
            else get_preset("cogvideo-stage1").num_frames
        )
        video_cfg = cfg.replace(name=f"sat-{target}", stage=target, num_frames=frames).validate()
        video = init_video_from_backbone(dict(tensors), video_cfg)
        return video_cfg, {n: tuple(t.shape) for n, t in video.items()}, video.items()

    def model_config(self, args: dict, stage: str, shapes: dict, base, overrides: dict | None):
        return sat_model_config(args, stage, base, overrides)

    def args(self, cfg: ModelConfig, tensor_parallel: int) -> dict:
        args = backbone_args(cfg, tensor_parallel)
        if cfg.has_temporal:
            T, n = cfg.text_length, cfg.tokens_per_frame
            args.update(
                layout=f"{T}, {T + n}, {T + cfg.num_frames * n}",
                additional_seqlen=cfg.num_frames * n,
                window_size=cfg.window_size if cfg.stage == "stage2" else -1,
                cogvideo_stage=2 if cfg.stage == "stage2" else 1,
            )
        return args

    def our_shapes(self, cfg: ModelConfig, shapes: dict) -> dict:
        """The extra position table cut to frames 1.. (module docstring), the temporal gates flat."""
        frame_rows = (cfg.num_frames - 1) * cfg.tokens_per_frame
        shapes = dict(shapes)
        if FRAME_TABLE in shapes:
            if shapes[FRAME_TABLE][0] < frame_rows:
                raise CheckpointError(
                    f"extra position table has {shapes[FRAME_TABLE][0]} rows; "
                    f"frames 1..{cfg.num_frames - 1} need {frame_rows}"
                )
            shapes[FRAME_TABLE] = (frame_rows, shapes[FRAME_TABLE][1])
        for name in shapes:
            if name.endswith(".temporal_gate"):
                shapes[name] = (cfg.hidden_size,)
        return shapes

    def our_tensor(self, cfg: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == FRAME_TABLE:
            return tensor[: (cfg.num_frames - 1) * cfg.tokens_per_frame]
        if name.endswith(".temporal_gate"):
            return tensor.reshape(cfg.hidden_size)
        return tensor

    def sat_tensor(self, cfg: ModelConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == FRAME_TABLE:  # SAT's additional_seqlen rows, the unread last frame's as zeros
            rows = cfg.num_frames * cfg.tokens_per_frame
            return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])])
        return tensor


def sat_model_config(
    args: dict, stage: str, base: ModelConfig | None = None, overrides: dict | None = None
) -> ModelConfig:
    """Our (CogVideo) ModelConfig for SAT arguments (model_config.json): shape, vocabulary size,
    dropout, layout and window come from them; what SAT does not record (frame size in pixels,
    the vocabulary's ranges when not icetk's, the frames' position offset: fixed in the released
    code) from `base`; `overrides` (dotted model fields) last."""
    base = base or get_preset("cogview2-6b")
    changes = dict(name=f"sat-{stage}", stage=stage, **backbone_fields(args, base))
    changes["image_position_offset"] = base.position_offset  # the checkpoint's, whatever its text length
    if "layout" in args:
        text, first, total = parse_layout(args["layout"])
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
    return configured(base, changes, overrides)


COGVIDEO_SAT = CogVideoSat()
