"""The demo's evaluation summary and report folder.

Evaluation: every sampled video is decoded from its image codes and read by an analyzer
(colour, shape, direction, displacement per keyframe step); accuracies are grouped by
held-out / seen and by duration prefix, next to the same figures on rendered reference videos
of the same prompts (the analyzer's own ceiling).

Report:

    report/index.html          everything below on one page
    report/metrics.json        the figures (targets, evaluation, step times, training)
    report/videos/*.mp4|gif    one per sampled prompt, duration and seed
    report/contact_sheet.png   held-out prompts x durations, keyframes side by side
    report/curves_<stage>.png  loss and learning rate per training step
    report/displacement.png    mean displacement per frame by duration prefix
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cogvideo.jsonl import read_jsonl

GAP = 4  # pixels between the durations of one contact-sheet row


# ---- evaluation ---------------------------------------------------------------------------


def keyframe_indices(num_frames: int, keyframes: int = 5) -> np.ndarray:
    """The stage-1 keyframes inside an interpolated video (first, last and evenly between)."""
    return np.linspace(0, num_frames - 1, keyframes).round().astype(int)


def analyze_keyframes(frames: np.ndarray):
    """What a video's keyframes show, by the prompt-following analyzer of cogvideo.eval
    (displacement is per keyframe step, so durations compare)."""
    from cogvideo.eval.prompts import analyze_video

    return analyze_video(frames[keyframe_indices(len(frames))])


def analysis_row(analysis) -> dict:
    return {
        "colour": analysis.colour,
        "shape": analysis.shape,
        "direction": analysis.direction,
        "displacement": analysis.displacement_px_per_frame,
    }


def manifest_entries(videos: list[dict]) -> list:
    """The sampled videos as the prompt scorer's manifest entries."""
    from cogvideo.eval.prompts import ManifestEntry

    return [ManifestEntry(Path(v["dir"]), v["prompt"], v["duration"], v["heldout"]) for v in videos]


def summarize(videos: list[dict], generated: list, references: list) -> dict:
    """The library's prompt-following scores (cogvideo.eval.prompts.score) of the generated
    videos and of their rendered references (the analyzer's own ceiling), side by side."""
    from cogvideo.eval.prompts import score

    entries = manifest_entries(videos)
    scores = {
        name: {k: v for k, v in score(entries, analyses).items() if k != "videos"}
        for name, analyses in (("generated", generated), ("reference", references))
    }
    moves = {
        d: {
            "generated": g["mean_px_per_frame"],
            "generated_sem": g["sem"],
            "videos": g["videos"],
            "reference": scores["reference"]["displacement_by_duration"][d]["mean_px_per_frame"],
        }
        for d, g in scores["generated"]["displacement_by_duration"].items()
    }
    return {**scores, "displacement_by_duration": moves}


def targets(summary: dict) -> dict:
    """The demo's goals: held-out colour >= 95 %, held-out direction >= 85 % at the longest
    duration (the shortest clips move about 1 px per keyframe, below an 8 px patch), and mean
    displacement per frame increasing with the duration prefix."""
    generated = summary["generated"]
    by_duration = summary["displacement_by_duration"]
    durations = sorted(by_duration, key=float)
    longest = durations[-1]
    colour = generated["accuracy"]["heldout"]["colour"]
    direction = generated["accuracy_by_duration"]["heldout"][f"{float(longest):g}s"]["direction"]
    return {
        "held-out colour accuracy": {"value": colour, "goal": ">= 0.95", "met": colour >= 0.95},
        f"held-out direction accuracy ({float(longest):g} s)": {
            "value": direction,
            "goal": ">= 0.85",
            "met": direction >= 0.85,
        },
        "displacement ordered by duration": {
            "value": ", ".join(
                f"{float(d):g} s: {by_duration[d]['generated']:.2f} ± {by_duration[d]['generated_sem']:.2f} px"
                for d in durations
            ),
            "goal": "increasing",
            "met": generated["displacement_increases_with_duration"] is True,  # else "not measured: ..."
        },
    }


def evaluate_samples(
    videos: list[dict], tokenizer, size: int, speed: float, seed: int, fvd_seed: int
) -> dict:
    """Analyze every sampled video (adds `analysis` and `reference_analysis` to each row) and a
    rendered reference of its prompt; score both (cogvideo.eval.prompts); tokenizer PSNR/SSIM on
    the references; FVD of the held-out videos of seed `fvd_seed` against their references."""
    generated, references = decode_and_render(videos, tokenizer, size, speed, seed)
    found = [analyze_keyframes(frames) for frames in generated]
    expected = [analyze_keyframes(reference) for reference in references]
    for video, analysis, reference_analysis in zip(videos, found, expected):
        video["analysis"], video["reference_analysis"] = (
            analysis_row(analysis),
            analysis_row(reference_analysis),
        )
    summary = summarize(videos, found, expected)
    summary["tokenizer"] = tokenizer_round_trip(videos, tokenizer, references)
    summary["fvd"] = heldout_fvd(videos, generated, references, size, fvd_seed)
    return summary


def decode_and_render(
    videos: list[dict], tokenizer, size: int, speed: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each sampled video's frames decoded from its codes, and a rendered reference of its prompt
    with the same frame count and duration (seeded by `seed` + its index)."""
    from cogvideo.synthetic import render_frames

    generated, references = [], []
    for index, video in enumerate(videos):
        frames = tokenizer.decode(np.load(Path(video["dir"]) / "codes.npy"))
        generated.append(frames)
        references.append(
            render_frames(
                video["colour"],
                video["shape"],
                video["direction"],
                len(frames),
                size,
                (len(frames) - 1) / video["duration"],
                speed,
                seed=seed + index,
            )
        )
    return generated, references


def tokenizer_round_trip(videos: list[dict], tokenizer, references: list[np.ndarray]) -> dict:
    """PSNR/SSIM of the references through the image tokenizer, and the analyzer's accuracy on
    the round-tripped references (what the tokenizer alone costs prompt following)."""
    from cogvideo.eval.prompts import score
    from cogvideo.metrics import psnr, reconstruction_report

    round_trip = [tokenizer.decode(tokenizer.encode(r)) for r in references]
    recon = reconstruction_report(np.concatenate(references), np.concatenate(round_trip))
    analyses = [analyze_keyframes(r) for r in round_trip]
    return {
        "frames": recon["frames"],
        "psnr_db": psnr(np.concatenate(references), np.concatenate(round_trip)),
        "ssim": recon["mean_ssim"],
        "protocol": recon["protocol"],
        "analysis_after_round_trip": score(manifest_entries(videos), analyses)["accuracy"]["all"],
    }


def heldout_fvd(
    videos: list[dict], generated: list[np.ndarray], references: list[np.ndarray], size: int, fvd_seed: int
) -> dict:
    """FVD of the held-out videos of seed `fvd_seed` against their rendered references."""
    import time

    from cogvideo.eval.fvd import FEATURES, FVDProtocol, I3DFeatures, frechet_distance

    # I3D at 224 px costs seconds per clip on a CPU: FVD takes one seed's held-out videos
    heldout = [i for i, v in enumerate(videos) if v["heldout"] and v["seed"] == fvd_seed]
    started = time.perf_counter()
    protocol = FVDProtocol()
    i3d = I3DFeatures(protocol=protocol)
    fake = i3d([generated[i] for i in heldout])
    real = i3d([references[i] for i in heldout])
    return {
        "value": frechet_distance(real, fake),
        "protocol": asdict(protocol),
        "precision": i3d.precision.to_dict(),
        "features": FEATURES[protocol.features],
        "real": f"{len(real)} rendered reference videos of the held-out prompts (same prompts, durations, frames)",
        "fake": f"{len(fake)} generated videos of the held-out prompts (seed {fvd_seed})",
        "frames": protocol.num_frames,
        "resolution": f"{size}px upsampled bilinearly to {protocol.resolution}x{protocol.resolution}",
        "fps": sorted({v["fps"] for v in videos}),
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot_curves(metrics_file: Path, stage: str, out: Path) -> Path:
    """Loss (log scale) and learning rate against the step, from the trainer's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["step"]: r for r in read_jsonl(metrics_file)}  # a resumed run logs some steps twice
    steps = sorted(rows)
    loss = np.array([rows[s]["loss"] for s in steps])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=0.8, label="loss")
    window = max(1, len(loss) // 25)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=1.6, label=f"loss ({window}-step mean)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (image tokens)")
    ax.set_title(f"{stage}: {len(steps)} steps, final loss {loss[-window:].mean():.3f}")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [rows[s]["lr"] for s in steps], color="tab:orange", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_displacement(by_duration: dict[str, dict], out: Path) -> Path:
    """Bars: generated vs reference mean displacement per frame, per duration prefix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    durations = sorted(by_duration, key=float)
    x = np.arange(len(durations))
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for offset, key, label in ((-0.2, "generated", "generated"), (0.2, "reference", "rendered reference")):
        values = [by_duration[d].get(key, float("nan")) for d in durations]
        errors = [by_duration[d].get(f"{key}_sem", 0.0) for d in durations]
        ax.bar(x + offset, values, width=0.4, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, [f"{float(d):g} s" for d in durations])
    ax.set_xlabel("duration prefix")
    ax.set_ylabel("px per keyframe step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def contact_sheet(videos: list[dict], out: Path) -> Path:
    """One row per held-out prompt (first seed): its sheet rows at every duration, left to right."""
    from PIL import Image, ImageDraw

    durations = sorted({v["duration"] for v in videos})
    seed = min(v["seed"] for v in videos)
    keys = list(dict.fromkeys(v["key"] for v in videos if v["heldout"]))
    rows = {
        (v["key"], v["duration"]): Image.open(Path(v["dir"]) / "sheet_row.png").convert("RGB")
        for v in videos
        if v["seed"] == seed and v["heldout"]
    }
    width = max(im.width for im in rows.values())
    height = max(im.height for im in rows.values())
    label_w, title_h = 170, 14
    sheet = Image.new(
        "RGB", (label_w + len(durations) * (width + GAP), title_h + len(keys) * (height + GAP)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for j, duration in enumerate(durations):
        draw.text((label_w + j * (width + GAP), 1), f"{duration:g} s", fill="black")
    for i, key in enumerate(keys):
        top = title_h + i * (height + GAP)
        draw.text((2, top + height // 2 - 5), key.replace("_", " "), fill="black")
        for j, duration in enumerate(durations):
            if (key, duration) in rows:
                sheet.paste(rows[key, duration], (label_w + j * (width + GAP), top))
    sheet.save(out)
    return out


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def write_report(report: Path, metrics: dict, videos: list[dict], curves: dict[str, Path]) -> Path:
    """Build report/ from the sampled videos (with their analysis) and the figures; returns index.html."""
    report.mkdir(parents=True, exist_ok=True)
    copy_videos(videos, report / "videos")
    images = draw_figures(report, metrics, videos, curves)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    index = report / "index.html"
    index.write_text("\n".join(index_page(metrics, videos, images)), encoding="utf-8")
    return index


def copy_videos(videos: list[dict], folder: Path) -> None:
    """Copy each sample's mp4 and gif into `folder`, named by prompt, duration and seed (set as `name`)."""
    folder.mkdir(exist_ok=True)
    for video in videos:
        name = f"{video['key']}_d{video['duration']:g}_seed{video['seed']}"
        for ext in ("mp4", "gif"):
            shutil.copyfile(Path(video["dir"]) / f"video.{ext}", folder / f"{name}.{ext}")
        video["name"] = name


def draw_figures(report: Path, metrics: dict, videos: list[dict], curves: dict[str, Path]) -> dict[str, Path]:
    """The report's images by title: contact sheet, displacement by duration, training curves."""
    images = {
        "contact sheet (held-out prompts; columns: duration prefix)": contact_sheet(
            videos, report / "contact_sheet.png"
        )
    }
    displacement = metrics.get("evaluation", {}).get("displacement_by_duration")
    if displacement:
        images["mean displacement per frame by duration prefix"] = plot_displacement(
            displacement, report / "displacement.png"
        )
    for stage, path in curves.items():
        images[f"training: {stage}"] = plot_curves(path, stage, report / f"curves_{stage}.png")
    return images


def index_page(metrics: dict, videos: list[dict], images: dict[str, Path]) -> list[str]:
    """index.html's parts: targets, the metrics by section, step times, the images, the samples."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>CogVideo demo</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img.v{width:96px;image-rendering:pixelated}"
        ".ok{color:green}.miss{color:#b00}</style>",
        "<h1>CogVideo demo report</h1>",
    ]
    targets = metrics.get("targets", {})
    if targets:
        parts += ["<h2>Targets</h2>", _targets_table(targets)]
    for section in ("evaluation", "training", "data"):
        flat = _flatten(metrics.get(section, {}))
        if flat:
            parts += [
                f"<h2>{section.title()}</h2>",
                _table([[html.escape(k), _fmt(v)] for k, v in flat], ["key", "value"]),
            ]
    steps = metrics.get("step_seconds", {})
    if steps:
        rows = [[html.escape(k), f"{v:.0f}"] for k, v in steps.items()] + [
            ["<b>total</b>", f"<b>{sum(steps.values()):.0f}</b>"]
        ]
        parts += ["<h2>Step times (s)</h2>", _table(rows, ["step", "seconds"])]
    for title, path in images.items():
        parts += [f"<h2>{html.escape(title)}</h2>", f"<img src='{path.name}' style='max-width:100%'>"]
    return parts + ["<h2>Samples</h2>", _samples_table(videos)]


def _targets_table(targets: dict) -> str:
    rows = [
        [
            html.escape(name),
            _fmt(t["value"]),
            html.escape(t["goal"]),
            f"<span class='{'ok' if t['met'] else 'miss'}'>{'met' if t['met'] else 'missed'}</span>",
        ]
        for name, t in targets.items()
    ]
    return _table(rows, ["metric", "measured", "target", ""])


def _samples_table(videos: list[dict]) -> str:
    rows = []
    for v in videos:
        found = v.get("analysis", {})
        rows.append(
            [
                f"<img class='v' src='videos/{v['name']}.gif'>",
                html.escape(v["prompt"]),
                "held out" if v["heldout"] else "seen",
                f"{v['duration']:g} s",
                str(v["seed"]),
                html.escape(" ".join(str(found.get(k, "?")) for k in ("colour", "shape", "direction"))),
                _fmt(found.get("displacement", "?")),
                f"<a href='videos/{v['name']}.mp4'>mp4</a>",
            ]
        )
    return _table(rows, ["video", "prompt", "set", "duration", "seed", "analyzer saw", "px/frame", ""])


def _flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    if not isinstance(data, dict):
        return [(prefix, data)]
    items = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        items += _flatten(value, name) if isinstance(value, dict) else [(name, value)]
    return items
