"""Every preset's geometry and parameter counts (from the real model built on the meta device,
no memory): what the tokenizers must match (frame size, codes per side, codebook size, text
vocabulary, text length) and how big the model is.

    cogvideo-params [PRESET ...]      # any family's presets by name (default: all)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cogvideo.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    from cogvideo.family import plain_model

    model = plain_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamCounts(total, trainable)


def geometry_row(cfg: ModelConfig) -> str:
    """Frame size, image codes per side, frames, text tokens, codebook size and text vocabulary."""
    return (
        f"{cfg.frame_size:>5}px {cfg.frame_tokens:>3}x{cfg.frame_tokens:<3} {cfg.num_frames:>6} "
        f"{cfg.text_length:>8} {cfg.vocab.num_image_tokens:>8} {cfg.vocab.num_text_tokens:>10}"
    )


def main(argv: list[str] | None = None) -> None:
    from cogvideo.family import REGISTRY, any_preset, family_of

    every = sorted(name for family in REGISTRY.values() for name in family.presets)
    parser = argparse.ArgumentParser(prog="cogvideo-params", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "presets", nargs="*", default=every, help="preset names, of any family (default: all)"
    )
    args = parser.parse_args(argv)
    try:
        configs = {name: any_preset(name) for name in args.presets}
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    tokens = {name: cfg for name, cfg in configs.items() if family_of(cfg).shard_kind == "tokens"}
    if tokens:
        print(
            f"{'preset':<18} {'stage':<9} {'frame':>7} {'codes':>7} {'frames':>6} {'text_len':>8} "
            f"{'codebook':>8} {'text_vocab':>10} {'total':>14} {'trainable':>14}"
        )
    for name, cfg in tokens.items():
        counts = count_parameters(cfg)
        print(
            f"{name:<18} {cfg.stage:<9} {geometry_row(cfg)} {counts.total:>14,} {counts.trainable:>14,}"
            f"   ({counts.total / 1e9:.2f}B / {counts.trainable / 1e9:.2f}B)"
        )
    if tokens:
        print(
            "frame: pixels per side; codes: image tokens per side (model.frame_tokens); codebook: "
            "vocab.num_image_tokens; text_vocab: vocab.num_text_tokens. The tokenizer commands take preset=NAME."
        )
    for name, cfg in configs.items():  # families that read no tokens: counts and the planner's one-line shape
        if name in tokens:
            continue
        family, counts = family_of(cfg), count_parameters(cfg)
        shape = family.planner.describe(cfg) if family.planner else ""
        print(f"{name:<18} {family.name:<9} {counts.total:>14,} {counts.trainable:>14,}   {shape}")


if __name__ == "__main__":
    main()
