"""Every preset's geometry and parameter counts (from the real model built on the meta device,
no memory): what the tokenizers must match (frame size, codes per side, codebook size, text
vocabulary, text length) and how big the model is.

    cogvideo-params [PRESET ...]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cogvideo.config import PRESETS, ModelConfig, get_preset


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


def family_presets() -> dict:
    """Every registered family's presets beside CogVideo's: preset name -> family."""
    from cogvideo.family import REGISTRY, get_family

    cogvideo = get_family("cogvideo")
    return {name: family for family in REGISTRY.values() if family is not cogvideo for name in family.presets}


def main(argv: list[str] | None = None) -> None:
    others = family_presets()
    parser = argparse.ArgumentParser(prog="cogvideo-params", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "presets", nargs="*", default=sorted(PRESETS) + sorted(others), help="preset names (default: all)"
    )
    args = parser.parse_args(argv)
    try:
        configs = {name: get_preset(name) for name in args.presets if name not in others}
        families = {name: others[name].preset(name) for name in args.presets if name in others}
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    if configs:
        print(
            f"{'preset':<18} {'stage':<9} {'frame':>7} {'codes':>7} {'frames':>6} {'text_len':>8} "
            f"{'codebook':>8} {'text_vocab':>10} {'total':>14} {'trainable':>14}"
        )
    for name, cfg in configs.items():
        counts = count_parameters(cfg)
        print(
            f"{name:<18} {cfg.stage:<9} {geometry_row(cfg)} {counts.total:>14,} {counts.trainable:>14,}"
            f"   ({counts.total / 1e9:.2f}B / {counts.trainable / 1e9:.2f}B)"
        )
    if configs:
        print(
            "frame: pixels per side; codes: image tokens per side (model.frame_tokens); codebook: "
            "vocab.num_image_tokens; text_vocab: vocab.num_text_tokens. The tokenizer commands take preset=NAME."
        )
    for name, cfg in families.items():  # other families: their counts and the planner's one-line shape
        family, counts = others[name], count_parameters(cfg)
        shape = family.planner.describe(cfg) if family.planner else ""
        print(f"{name:<18} {family.name:<9} {counts.total:>14,} {counts.trainable:>14,}   {shape}")


if __name__ == "__main__":
    main()
