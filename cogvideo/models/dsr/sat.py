"""The released `cogview2-dsr` checkpoint's SwissArmyTransformer layout (THUDM/CogVideo
`sr_pipeline/dsr_model.py`, `DsrModel`): CogView2's `transformer.*` backbone plus

* ``mixins.attention_plus.{query_key_value,dense}.{i}.{weight,bias}`` (every layer) ->
  ``layers.{i}.high_attention.*``;
* ``mixins.extra_position_embedding.position_embeddings.weight`` ([new_sequence_length -
  max_sequence_length, h] = [3600, h]) -> ``high_position_embeddings.weight``, row for row
  (high-res slot j has position id max_sequence_length + j and reads row j).

model_config.json as SAT's save_checkpoint writes it for a DsrModel: the backbone's arguments
plus `layout` ([96, 496, 4096] or "96,496,4096"), `new_sequence_length`, `kernel_size` (the
high-res box is 2k-1 rows x k columns) and `kernel_size2` (the low-res square). The release
sets those in code (`DirectSuperResolution`), so a file without them takes them from the base
preset; the high-res grid is read from the table's rows.
"""

from __future__ import annotations

import math

from cogvideo.checkpoint.io import CheckpointError
from cogvideo.checkpoint.sat_layout import SAT_CONFIG, SatLayout, configured, parse_layout
from cogvideo.models.cogvideo.sat import (
    BACKBONE_EXPORT,
    BACKBONE_RENAMES,
    backbone_args,
    backbone_fields,
    plus_mixins,
)
from cogvideo.models.dsr.config import DsrConfig

HIGH_TABLE = "high_position_embeddings.weight"
PLUS_RENAMES, PLUS_EXPORTS = plus_mixins("high_attention", HIGH_TABLE)


class DsrSat(SatLayout):
    family = "dsr"
    default_base = "cogview2-dsr"
    renames = BACKBONE_RENAMES + PLUS_RENAMES
    exports = BACKBONE_EXPORT + PLUS_EXPORTS

    def claims(self, keys: set[str], args: dict) -> bool:
        """A DsrModel's file: attention_plus without CogVideo's mixing gate."""
        plus = any(k.startswith("mixins.attention_plus.") for k in keys)
        gated = any(k.startswith("mixins.attention_plus.attn_distribution.") for k in keys)
        return args.get("model_class") == "DsrModel" or (plus and not gated)

    def model_config(self, args: dict, stage: str, shapes: dict, base: DsrConfig, overrides: dict | None):
        if not isinstance(base, DsrConfig):
            raise CheckpointError(
                f"--base {base.name}: a DSR checkpoint needs a DSR preset (e.g. cogview2-dsr)"
            )
        changes = dict(name="sat-dsr", **backbone_fields(args, base))
        rows = shapes.get(HIGH_TABLE, (0,))[0]
        high = math.isqrt(rows)
        if high * high != rows:
            raise CheckpointError(
                f"{SAT_CONFIG}: the extra position table's {rows} rows are not a square grid"
            )
        changes["high_frame_tokens"] = high
        if "layout" in args:
            text, context, total = parse_layout(args["layout"])
            low = math.isqrt(context - text)
            if low * low != context - text or total - context != rows:
                raise CheckpointError(
                    f"{SAT_CONFIG}: layout {args['layout']} does not fit a square low-res frame and the "
                    f"{rows}-row high-res table"
                )
            changes.update(
                text_length=text, frame_tokens=low, frame_size=low * base.frame_size // base.frame_tokens
            )
        if "kernel_size" in args:
            k = int(args["kernel_size"])
            changes.update(high_window_rows=2 * k - 1, high_window_cols=k)
        if "kernel_size2" in args:
            changes["low_window"] = int(args["kernel_size2"])
        return configured(base, changes, overrides)

    def args(self, cfg: DsrConfig, tensor_parallel: int) -> dict:
        if cfg.high_window_rows != 2 * cfg.high_window_cols - 1:
            raise ValueError(
                f"model.high_window_rows={cfg.high_window_rows}: SAT's DsrModel has a (2k-1) x k box, "
                f"k = high_window_cols={cfg.high_window_cols}"
            )
        return {
            "model_class": "DsrModel",
            **backbone_args(cfg, tensor_parallel),
            "layout": [cfg.text_length, cfg.high_start, cfg.seq_length],
            "new_sequence_length": cfg.max_position_embeddings + cfg.high_tokens,
            "kernel_size": cfg.high_window_cols,
            "kernel_size2": cfg.low_window,
        }


DSR_SAT = DsrSat()
