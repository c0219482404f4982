"""Every preset's geometry and parameter counts (from the real model built on the meta device,
no memory): what the tokenizers must match (frame size, codes per side, codebook size, text
vocabulary, text length) and how big the model is; with a captions file and a text tokenizer, the
captions' lengths in text tokens against each preset's text budget.

    cogvideo-params [PRESET ...]      # any family's presets by name (default: all)
    cogvideo-params PRESET --captions FILE --text-tokenizer MODEL
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cogvideo.captions import read_captions
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.tokenizers.text import caption_lengths, check_fits, length_report, unusable_line


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
    from cogvideo.family import any_preset, families, family_of

    every = sorted(name for family in families() for name in family.presets)
    parser = argparse.ArgumentParser(prog="cogvideo-params", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "presets", nargs="*", default=every, help="preset names, of any family (default: all)"
    )
    parser.add_argument(
        "--captions", help="a captions file (CSV / JSONL / one per line): their lengths in text tokens"
    )
    parser.add_argument(
        "--text-tokenizer", help="the SentencePiece model that counts the tokens (with --captions)"
    )
    args = parser.parse_args(argv)
    if bool(args.captions) != bool(args.text_tokenizer):
        parser.exit(2, f"{parser.prog}: --captions and --text-tokenizer go together\n")
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
    if args.captions:
        try:
            for line in caption_budgets(args.captions, args.text_tokenizer, tokens.values()):
                print(line)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"{parser.prog}: {err}\n")


def caption_budgets(captions: str, text_tokenizer: str, configs) -> list[str]:
    """Each token preset's caption-length report (cogvideo.tokenizers.text.length_report)."""
    rows = read_captions(captions, need_paths=False)
    lines = unusable_line(rows)
    for cfg in configs:
        try:
            encode = check_fits(text_tokenizer, cfg, "--text-tokenizer").encode
        except ValueError as err:  # another preset's vocabulary: say so, go on with the others
            lines += [f"{cfg.name}: not measured: {err}"]
            continue
        report = length_report(caption_lengths(encode, rows, cfg.num_frames), cfg)
        lines += [f"{cfg.name}:"] + [f"  {line}" for line in report]
    return lines


if __name__ == "__main__":
    main()
