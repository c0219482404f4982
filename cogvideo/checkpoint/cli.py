"""cogvideo-convert: move weights between SwissArmyTransformer, DeepSpeed and our format.

    cogvideo-convert inspect PATH                       # exit 1 when it prints a problem
    cogvideo-convert import-sat SAT_DIR OUT [--stage stage1] [--base PRESET] [--set FIELD=VALUE] [--tp N]
    cogvideo-convert reshard CKPT OUT --tp N            # split or merge tensor-parallel shards
    cogvideo-convert zero DEEPSPEED_DIR OUT [--tag T] [--tp N] [--no-optimizer] [--no-ema]
    cogvideo-convert export CKPT OUT [--dtype bf16]     # full weights, sharded safetensors + index
    cogvideo-convert export-sat CKPT OUT [--tp N]       # back to SwissArmyTransformer's layout

Every command writes OUT atomically and refuses an existing OUT unless --force. Every command
but inspect takes --vocab-size N: padding rows for a TP split (the release's 150010 ids split
over TP 8 at 150016), or back to fewer rows, dropping only unused padding.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from cogvideo.checkpoint.format import (
    CONFIG_NAME,
    Checkpoint,
    check_shapes,
    read_checkpoint_info,
    reshard,
    trainable_names,
)
from cogvideo.checkpoint.io import DEFAULT_SHARD_BYTES, CheckpointError
from cogvideo.checkpoint.sat import SAT_CONFIG, SatCheckpoint, export_sat, import_sat
from cogvideo.checkpoint.training import engine_dirs, tag_dir, train_config_model
from cogvideo.checkpoint.zero import PrefixedPlan, ZeroCheckpoint, convert_zero
from cogvideo.configio import ConfigError, parse_overrides
from cogvideo.family import DEFAULT_FAMILY, family_of, get_family, resolve_model_section
from cogvideo.precision import DTYPES, NAMES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB or 1048576")
    return int(float(match[1]) * 1024 ** " KMG".index(match[2].upper() or " "))


def describe(path: str | Path, base: str | None = None, overrides: dict | None = None) -> dict:
    """What `inspect` prints: format, model, parameter counts, dtype, TP degree, iteration, and
    whether the files are complete (with the problem if not). `base`: see import-sat --base."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return _describe_ours(path)
    if (path / SAT_CONFIG).is_file():
        kind, read = "SwissArmyTransformer", lambda: _describe_sat(path, base, overrides)
    elif any(tag_dir(path, None).rglob("*_model_states.pt")):  # a model trained in parts: one folder each
        kind, read = "DeepSpeed", lambda: _describe_zero(path)
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint (ours has {CONFIG_NAME}, SwissArmyTransformer "
            f"{SAT_CONFIG}, DeepSpeed *_model_states.pt files)"
        )
    try:
        return read() | {"complete": True}
    except CheckpointError as err:
        return {"format": kind, "complete": False, "problem": str(err)}


def _describe_ours(path: Path) -> dict:
    info = read_checkpoint_info(path)
    out = {
        "format": f"cogvideo v{info['version']}",
        "family": info["model"].get("family", DEFAULT_FAMILY),
        "preset": info["model"].get("name"),
        "stage": info["model"].get("stage"),
        "tensor_parallel": info["tensor_parallel"],
        "iteration": info["iteration"],
        "dtype": info.get("dtype"),
    }
    try:
        ckpt = Checkpoint(path)
        check_shapes(ckpt.shapes, ckpt.cfg, str(path))
    except CheckpointError as err:
        return out | {"complete": False, "problem": str(err)}
    return out | _counts(ckpt.shapes, ckpt.cfg) | {"optimizer_state": ckpt.has_optimizer(), "complete": True}


def _describe_sat(path: Path, base: str | None, overrides: dict | None) -> dict:
    sat = SatCheckpoint(path)
    cfg = sat.model_config(base, overrides)
    return {
        "format": "SwissArmyTransformer",
        "family": family_of(cfg).name,
        "preset": cfg.name,
        "stage": sat.stage,
        "tensor_parallel": sat.tensor_parallel,
        "iteration": sat.iteration,
        "dtype": NAMES.get(sat.dtype, str(sat.dtype)),
        **_counts(sat.shapes, cfg),
    }


def _describe_zero(path: Path) -> dict:
    try:
        cfg = train_config_model(tag_dir(path, None))
    except CheckpointError:  # a DeepSpeed checkpoint not written by our trainer
        cfg = None
    family = family_of(cfg) if cfg else get_family(DEFAULT_FAMILY)
    tag = tag_dir(path, None)
    dirs = engine_dirs(tag, cfg) if cfg else [("", tag)]
    zeros = [
        (prefix, ZeroCheckpoint(folder, PrefixedPlan(family.tp_plan, prefix))) for prefix, folder in dirs
    ]
    zero = zeros[0][1]
    shapes = {prefix + name: shape for prefix, part in zeros for name, shape in part.shapes.items()}
    return {
        "format": f"DeepSpeed ZeRO-{zero.stage}",
        "family": family.name,
        "preset": cfg.name if cfg else None,
        "stage": getattr(cfg, "stage", None),
        **({"optimised_parts": [folder.name for _, folder in dirs]} if len(dirs) > 1 else {}),
        "tensor_parallel": zero.tp,
        "data_parallel": zero.dp,
        "iteration": sum(part.iteration for _, part in zeros),
        "dtype": "fp32 (master weights)",
        **_counts(shapes, cfg),
    }


def _counts(shapes: dict, cfg) -> dict:
    sizes = {n: torch.Size(s).numel() for n, s in shapes.items()}
    total = sum(sizes.values())
    trainable = sum(sizes[n] for n in trainable_names(cfg) if n in sizes) if cfg is not None else None
    return {"parameters": total, "trainable_parameters": trainable}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvideo-convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe a checkpoint (ours, SAT or DeepSpeed)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    _sat_model_flags(p, "SAT checkpoints: as for import-sat")
    p = _writer(
        sub,
        "import-sat",
        "SwissArmyTransformer checkpoint (CogView2, CogVideo, CogView2-DSR) -> ours",
        "SAT checkpoint dir",
    )
    p.add_argument(
        "--stage",
        choices=["backbone", "stage1", "stage2"],
        help="default: the checkpoint's own; stage1/stage2 from a backbone initialises the video parts",
    )
    _sat_model_flags(p)
    p.add_argument("--iteration", help="default: the one named by SAT_DIR/latest")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to store")
    p = _writer(
        sub, "reshard", "split or merge the tensor-parallel shards of our checkpoint", "our checkpoint"
    )
    p.add_argument("--tp", type=int, required=True)
    p = _writer(
        sub, "zero", "consolidate a DeepSpeed ZeRO-1/2/3 checkpoint (any TP x DP) into ours", "DeepSpeed dir"
    )
    p.add_argument("--tag", help="default: the one named by DIR/latest")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the model section, as training's model: (preset=NAME, family=NAME, FIELD=VALUE); "
        "default: the one in the checkpoint's train_config.yaml",
    )
    p.add_argument("--no-optimizer", action="store_true", help="weights only")
    p.add_argument(
        "--no-ema",
        action="store_true",
        help="the raw weights (and their Adam moments) of a run that kept an average of its weights "
        "(optim.ema_decay), whose average is exported by default",
    )
    _writer(
        sub,
        "export",
        "full (merged) weights as sharded safetensors with an index, no optimizer",
        "our checkpoint",
    )
    p = sub.add_parser("export-sat", help="our checkpoint -> SwissArmyTransformer (mp_rank_XX files)")
    _output_flags(p, "our checkpoint", "output directory (SAT layout)")
    p.add_argument(
        "--tp", type=int, help="tensor-parallel degree of the rank files (default: the checkpoint's)"
    )
    p.add_argument("--iteration", help="iteration folder name (default: the checkpoint's iteration)")
    return parser


def _output_flags(p: argparse.ArgumentParser, src: str, out: str) -> None:
    p.add_argument("src", help=src)
    p.add_argument("out", help=out)
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    p.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="rows of the vocabulary: more adds zero padding rows (e.g. 150016 for TP 8 from the "
        "release's 150010), fewer drops padding (never ids in use); default: kept",
    )


def _writer(sub, name: str, help: str, src: str) -> argparse.ArgumentParser:
    """A command writing our format."""
    p = sub.add_parser(name, help=help)
    _output_flags(p, src, "output directory (our format)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, help="e.g. 2GB")
    return p


def _sat_model_flags(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """What model_config.json does not record (import-sat; inspect of a SAT checkpoint)."""
    p.add_argument(
        "--base",
        default=None,
        help=help
        or "preset (any family's) for what model_config.json does not record: frame size in pixels, the "
        "vocabulary's ranges when not icetk's (default: cogview2-6b, or cogview2-dsr for a DSR "
        "checkpoint); shapes and vocab size come from the file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=help or "override a model field after model_config.json (dotted, e.g. text_length=64)",
    )


def run(args: argparse.Namespace) -> Path | dict:
    if args.command == "inspect":
        return describe(args.path, args.base, parse_overrides(args.set))
    write = dict(force=args.force, dtype=DTYPES.get(args.dtype or ""), vocab_size=args.vocab_size)
    if args.command == "export-sat":
        return export_sat(args.src, args.out, tensor_parallel=args.tp, iteration=args.iteration, **write)
    write["max_shard_bytes"] = args.max_shard_size
    if args.command == "import-sat":
        overrides = parse_overrides(args.set)
        return import_sat(
            args.src,
            args.out,
            base=args.base,
            stage=args.stage,
            iteration=args.iteration,
            tensor_parallel=args.tp,
            overrides=overrides,
            **write,
        )
    if args.command in ("reshard", "export"):
        tp, optimizer = (args.tp, True) if args.command == "reshard" else (1, False)
        return reshard(args.src, args.out, tp, optimizer=optimizer, **write)
    cfg = resolve_model_section(parse_overrides(args.set)) if args.set else None
    return convert_zero(
        args.src,
        args.out,
        cfg,
        tag=args.tag,
        tensor_parallel=args.tp,
        optimizer=not args.no_optimizer,
        ema=not args.no_ema,
        **write,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"cogvideo-convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    if isinstance(result, dict):  # inspect
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            width = max(map(len, result))
            for key, value in result.items():
                counted = isinstance(value, int) and not isinstance(value, bool)
                print(f"{key:<{width}}  {f'{value:,}' if counted else value}")
        return 0 if result.get("complete") else 1  # the problem is printed above
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
