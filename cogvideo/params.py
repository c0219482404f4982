"""Parameter counts of every preset, from the real model built on the meta device (no memory).

    cogvideo-params [PRESET ...]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from cogvideo.config import PRESETS, ModelConfig, get_preset


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    from cogvideo.model import CogVideoModel

    with torch.device("meta"):
        model = CogVideoModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamCounts(total, trainable)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=sorted(PRESETS))
    args = parser.parse_args(argv)
    print(f"{'preset':<18} {'stage':<9} {'total':>14} {'trainable':>14} {'frozen':>14}")
    for name in args.presets:
        cfg = get_preset(name)
        counts = count_parameters(cfg)
        print(f"{name:<18} {cfg.stage:<9} {counts.total:>14,} {counts.trainable:>14,} {counts.frozen:>14,}"
              f"   ({counts.total / 1e9:.2f}B / {counts.trainable / 1e9:.2f}B)")


if __name__ == "__main__":
    main()
