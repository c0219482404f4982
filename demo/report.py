"""The demo's report folder: one page a person would rather look at, built from a list of model
families' results, each rendered the same way.

    report/index.html        1. held-out videos, animated, each with its prompt, the analyzer's
                                verdict per attribute and the rendered reference beside it
                                (a section per family);
                             2. the targets, met / missed (a column per family);
                             3. plots (a row per family): accuracy by attribute and duration,
                                displacement against duration with the reference line, loss
                                curves, the confusion of colours and shapes;
                             4. every sample, and the full metrics, folded
    report/metrics.json      what the page shows: per family its targets, evaluation, training
                             and every video's verdicts; the run's data, step times, machine
    report/videos/           <family>/<name>.gif|.mp4 generated, <family>/<name>.ref.gif reference
    report/<family>_*.png    the plots

Extension point: a family adds a :class:`FamilyResult` to the list `demo.driver.report` passes to
:func:`write_report` (its sampled videos scored by `demo.evaluation.evaluate_samples`, so every
video carries `analysis`, `verdicts` and `reference_gif`). Nothing here names a family.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from demo import figures
from demo.evaluation import video_name

VERDICT_ATTRIBUTES = ("colour", "shape", "direction", "motion")


@dataclass
class FamilyResult:
    """One model family's results, rendered as a section of the grid, a column of the targets,
    a row of plots and a folded block of metrics."""

    name: str  # short id: file names, HTML ids ("cogvideo")
    title: str  # what the page calls it
    videos: list[dict]  # sampled videos: key, prompt, heldout, duration, seed, fps, dir (video.gif/.mp4),
    # analysis, reference_analysis, verdicts, reference_gif (demo.evaluation.evaluate_samples)
    evaluation: dict  # demo.evaluation.evaluate_samples' summary
    targets: dict  # demo.evaluation.targets: name -> {value, goal, met}
    curves: dict[str, Path] = field(default_factory=dict)  # training stage -> the trainer's metrics.jsonl
    details: dict = field(default_factory=dict)  # anything else worth keeping (training summaries ...)


def write_report(report: Path, families: list[FamilyResult], run: dict) -> Path:
    """Build report/ (see the module docstring); `run`: the run's own figures (data, step
    times, machine). Returns index.html."""
    report.mkdir(parents=True, exist_ok=True)
    for family in families:
        copy_videos(family, report / "videos" / family.name)
    plots = {family.name: draw_plots(report, family) for family in families}
    metrics = {"families": [family_metrics(f) for f in families], **run}
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    index = report / "index.html"
    index.write_text(page(families, run, plots), encoding="utf-8")
    return index


def family_metrics(family: FamilyResult) -> dict:
    return {
        "name": family.name,
        "title": family.title,
        "targets": family.targets,
        "evaluation": family.evaluation,
        **family.details,
        "videos": [
            {
                k: v[k]
                for k in (
                    "name",
                    "prompt",
                    "heldout",
                    "duration",
                    "seed",
                    "analysis",
                    "reference_analysis",
                    "verdicts",
                )
            }
            for v in family.videos
        ],
    }


def copy_videos(family: FamilyResult, folder: Path) -> None:
    """Each sample's gif and mp4 and its reference gif into `folder`; sets each video's `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    for video in family.videos:
        name = video["name"] = video_name(video)
        for ext in ("gif", "mp4"):
            shutil.copyfile(Path(video["dir"]) / f"video.{ext}", folder / f"{name}.{ext}")
        shutil.copyfile(video["reference_gif"], folder / f"{name}.ref.gif")


def draw_plots(report: Path, family: FamilyResult) -> dict[str, Path]:
    """The family's plots by title."""
    evaluation, prefix = family.evaluation, report / family.name
    plots = {
        "held-out accuracy by attribute and duration": figures.accuracy_by_duration(
            evaluation, Path(f"{prefix}_accuracy.png")
        ),
        "displacement against duration": figures.displacement_vs_duration(
            evaluation["displacement_by_duration"], Path(f"{prefix}_displacement.png")
        ),
        "colour and shape confusion (held-out)": figures.confusion(
            family.videos, Path(f"{prefix}_confusion.png")
        ),
    }
    if family.curves:
        plots["training loss and learning rate"] = figures.loss_curves(
            family.curves, Path(f"{prefix}_loss.png")
        )
    return plots


# ---- the page ---------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1280px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .lede{color:#555;margin-top:0}
.grid{display:grid;grid-template-columns:repeat(var(--columns),minmax(0,1fr));gap:10px}
figure.cell{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
.pair{display:flex;gap:4px} .pair div{flex:1;text-align:center;font-size:11px;color:#666}
.pair img{width:100%;image-rendering:pixelated;display:block;border-radius:3px}
figcaption{font-size:12px;margin-top:4px} .prompt{font-weight:600}
ul.verdicts{list-style:none;padding:0;margin:3px 0 0;display:flex;flex-wrap:wrap;gap:3px}
li.verdict{border-radius:3px;padding:0 4px;font-size:11px}
.ok{background:#e3f4e3;color:#185c18} .miss{background:#fbe2e2;color:#8a1111}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots figure{margin:0} .plots img{max-width:100%}
details{margin:.6em 0} summary{cursor:pointer;font-weight:600}
img.thumb{width:64px;image-rendering:pixelated}
"""


def page(families: list[FamilyResult], run: dict, plots: dict[str, dict[str, Path]]) -> str:
    parts = [
        f"<!doctype html><html lang='en'><meta charset='utf-8'><title>Demo report</title><style>{STYLE}</style>",
        "<h1>Demo report</h1>",
        f"<p class='lede'>{html.escape(run_summary(families, run))}</p>",
        "<h2 id='videos'>Held-out prompts: generated (left) and rendered reference (right)</h2>",
    ]
    for family in families:
        parts += [f"<section class='family' id='videos-{family.name}'><h3>{html.escape(family.title)}</h3>"]
        parts += [video_grid(family), "</section>"]
    parts += ["<h2 id='targets'>Targets</h2>", targets_table(families)]
    parts += ["<h2 id='side-by-side'>Side by side (held-out prompts)</h2>", side_by_side(families)]
    parts += ["<h2 id='plots'>Plots</h2>"]
    for family in families:
        parts += [f"<h3>{html.escape(family.title)}</h3><div class='plots'>"]
        for title, path in plots[family.name].items():
            parts += [
                f"<figure><img src='{path.name}' alt='{html.escape(title)}'><figcaption>{html.escape(title)}</figcaption></figure>"
            ]
        parts += ["</div>"]
    parts += ["<h2 id='details'>Every sample and the full metrics</h2>"]
    for family in families:
        parts += [
            f"<details><summary>{html.escape(family.title)}: all {len(family.videos)} samples</summary>",
            samples_table(family),
            "</details>",
            f"<details><summary>{html.escape(family.title)}: full metrics</summary>",
            metrics_table(family_metrics(family), skip=("videos",)),
            "</details>",
        ]
    parts += [
        "<details><summary>The run: data, step times, machine</summary>",
        metrics_table(run),
        "</details>",
    ]
    return "\n".join(parts) + "\n</html>\n"


def run_summary(families: list[FamilyResult], run: dict) -> str:
    met = sum(t["met"] for f in families for t in f.targets.values())
    total = sum(len(f.targets) for f in families)
    machine = run.get("machine", {})
    seconds = run.get("total_seconds")
    return (
        f"{met} of {total} targets met"
        + (f"; {seconds / 60:.1f} min of step time" if seconds else "")
        + (f" on {machine.get('cpu', '')} ({machine.get('cpus', '?')} CPUs)" if machine else "")
        + "."
    )


def grid_videos(family: FamilyResult) -> tuple[list[dict], list[float]]:
    """The grid's videos (held-out prompts of the first seed, rows by prompt, columns by
    duration) and its durations."""
    seed = min(v["seed"] for v in family.videos)
    shown = [v for v in family.videos if v["heldout"] and v["seed"] == seed]
    durations = sorted({v["duration"] for v in shown})
    order = list(dict.fromkeys(v["key"] for v in shown))
    return sorted(shown, key=lambda v: (order.index(v["key"]), v["duration"])), durations


def video_grid(family: FamilyResult) -> str:
    shown, durations = grid_videos(family)
    cells = [video_cell(family.name, v) for v in shown]
    return f"<div class='grid' style='--columns:{len(durations)}'>{''.join(cells)}</div>"


def video_cell(family: str, video: dict) -> str:
    name = html.escape(video["name"])
    items = []
    for attribute in VERDICT_ATTRIBUTES:
        verdict = video["verdicts"][attribute]
        seen = verdict["seen"]
        text = (
            f"{seen:.1f} px/s (ref {verdict['reference']:.1f})" if attribute == "motion" else (seen or "none")
        )
        mark = "✓" if verdict["ok"] else "✗"
        items.append(
            f"<li class='verdict {'ok' if verdict['ok'] else 'miss'}' data-attribute='{attribute}' "
            f"data-ok='{str(verdict['ok']).lower()}'>{mark} {attribute}: {html.escape(str(text))}</li>"
        )
    return (
        f"<figure class='cell' data-family='{family}' data-video='{name}'><div class='pair'>"
        f"<div><img src='videos/{family}/{name}.gif' alt='generated'>generated</div>"
        f"<div><img src='videos/{family}/{name}.ref.gif' alt='reference'>reference</div></div>"
        f"<figcaption><div class='prompt'>{html.escape(video['prompt'])}</div>"
        f"<div>{video['duration']:g} s, seed {video['seed']}</div><ul class='verdicts'>{''.join(items)}</ul>"
        "</figcaption></figure>"
    )


def targets_table(families: list[FamilyResult]) -> str:
    names = list(dict.fromkeys(name for f in families for name in f.targets))
    header = "<tr><th>target</th>" + "".join(f"<th>{html.escape(f.title)}</th>" for f in families) + "</tr>"
    rows = []
    for name in names:
        cells = []
        for family in families:
            t = family.targets.get(name)
            if t is None:
                cells.append("<td>-</td>")
                continue
            cells.append(
                f"<td class='{'ok' if t['met'] else 'miss'}' data-target='{html.escape(name)}' "
                f"data-met='{str(t['met']).lower()}'>{'met' if t['met'] else 'missed'}: {_fmt(t['value'])} "
                f"(goal {html.escape(t['goal'])})</td>"
            )
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return f"<table>{header}{''.join(rows)}</table>"


def comparison_rows(family: FamilyResult) -> dict[str, object]:
    """What every family's column shows whatever its goals: held-out accuracies, direction and
    displacement by duration, FVD, seconds per sampled video (None where not measured)."""
    evaluation = family.evaluation
    accuracy = evaluation["generated"]["accuracy"]["heldout"]
    by_duration = evaluation["generated"]["accuracy_by_duration"]["heldout"]
    rows = {f"held-out {name}": accuracy.get(name) for name in ("colour", "shape", "constant")}
    for duration in sorted(by_duration, key=lambda d: float(d.rstrip("s"))):
        rows[f"held-out direction ({duration})"] = by_duration[duration].get("direction")
    for duration, moves in sorted(evaluation["displacement_by_duration"].items(), key=lambda d: float(d[0])):
        rows[f"displacement at {float(duration):g} s (px / frame; reference)"] = (
            f"{_fmt(moves['generated'])} ({_fmt(moves['reference'])})"
        )
    rows["FVD (held-out)"] = evaluation.get("fvd", {}).get("value")
    rows["seconds per sampled video"] = family.details.get("sampling", {}).get("seconds_per_video")
    if sr := evaluation.get("super_resolution"):  # a super-resolution stage (demo.sr_evaluation)
        for name in ("psnr_db", "ssim"):
            rows[f"SR {name} (bicubic) vs the {sr['scale']}x reference"] = (
                f"{_fmt(sr['sr'][name])} ({_fmt(sr['bicubic'][name])})"
            )
        if ceiling := sr.get("tokenizer_ceiling"):  # absent from evaluations written before it
            rows["SR ceiling: the tokenizer's round trip of the reference (psnr_db, ssim)"] = (
                f"{_fmt(ceiling['psnr_db'])}, {_fmt(ceiling['ssim'])}"
            )
        rows["flicker: SR (low-res)"] = (
            f"{_fmt(sr['flicker']['sr'])} ({_fmt(sr['flicker']['low_res_bicubic'])})"
        )
    return rows


def side_by_side(families: list[FamilyResult]) -> str:
    columns = [comparison_rows(f) for f in families]
    names = list(dict.fromkeys(name for rows in columns for name in rows))
    header = "<tr><th>measure</th>" + "".join(f"<th>{html.escape(f.title)}</th>" for f in families) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{'-' if rows.get(name) is None else _fmt(rows[name])}</td>" for rows in columns)
        + "</tr>"
        for name in names
    )
    return f"<table class='side-by-side'>{header}{body}</table>"


def samples_table(family: FamilyResult) -> str:
    rows = []
    for v in family.videos:
        seen = v["analysis"]
        rows.append(
            "<tr>"
            f"<td><img class='thumb' src='videos/{family.name}/{v['name']}.gif' alt='generated'></td>"
            f"<td>{html.escape(v['prompt'])}</td><td>{'held out' if v['heldout'] else 'seen'}</td>"
            f"<td>{v['duration']:g} s</td><td>{v['seed']}</td>"
            f"<td>{html.escape(' '.join(str(seen[k]) for k in ('colour', 'shape', 'direction')))}</td>"
            f"<td>{seen['displacement']:.2f}</td>"
            f"<td><a href='videos/{family.name}/{v['name']}.mp4'>mp4</a></td></tr>"
        )
    header = "<tr><th>video</th><th>prompt</th><th>set</th><th>duration</th><th>seed</th><th>analyzer saw</th><th>px/keyframe</th><th></th></tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def metrics_table(data: dict, skip: tuple[str, ...] = ()) -> str:
    rows = [
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
        for k, v in _flatten({k: v for k, v in data.items() if k not in skip})
    ]
    return f"<table><tr><th>key</th><th>value</th></tr>{''.join(rows)}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def _flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    if not isinstance(data, dict):
        return [(prefix, data)]
    items = []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        items += _flatten(value, name) if isinstance(value, dict) else [(name, value)]
    return items
