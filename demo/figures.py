"""The report's plots (matplotlib, Agg), one family's results each: accuracy by attribute and
duration, displacement against duration with the reference line, training loss curves, the
confusion of colours and shapes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the machines that run the demo
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cogvideo.jsonl import read_jsonl  # noqa: E402
from cogvideo.synthetic import COLOURS, SHAPES, parse_caption  # noqa: E402

ATTRIBUTES = ("colour", "shape", "direction", "constant")


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def accuracy_by_duration(evaluation: dict, out: Path) -> Path:
    """Bars: held-out accuracy per attribute, one bar per duration prefix; a tick per bar marks
    the rendered reference's (the analyzer's ceiling)."""
    generated = evaluation["generated"]["accuracy_by_duration"]["heldout"]
    reference = evaluation["reference"]["accuracy_by_duration"]["heldout"]
    durations = sorted(generated, key=lambda d: float(d.rstrip("s")))
    x = np.arange(len(ATTRIBUTES))
    width = 0.8 / len(durations)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for i, d in enumerate(durations):
        left = x - 0.4 + (i + 0.5) * width
        values = [generated[d].get(a, np.nan) for a in ATTRIBUTES]
        ax.bar(left, values, width=width * 0.9, label=f"{d.rstrip('s')} s")
        ceiling = [reference[d].get(a, np.nan) for a in ATTRIBUTES]
        ax.scatter(left, ceiling, marker="_", s=150, color="black", zorder=3)
    ax.scatter([], [], marker="_", color="black", label="reference")
    ax.set_xticks(x, ATTRIBUTES)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.legend(
        fontsize=8, ncol=len(durations) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False
    )
    return _save(fig, out)


def displacement_vs_duration(by_duration: dict[str, dict], out: Path) -> Path:
    """Generated displacement per keyframe step against the duration prefix (mean ± its standard
    error), the rendered reference's line and the ±25 % band around it."""
    durations = sorted(by_duration, key=float)
    x = np.array([float(d) for d in durations])
    reference = np.array([by_duration[d]["reference"] for d in durations])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.fill_between(
        x, 0.75 * reference, 1.25 * reference, color="tab:gray", alpha=0.2, label="reference ± 25 %"
    )
    ax.plot(x, reference, "o--", color="black", label="rendered reference")
    ax.errorbar(
        x,
        [by_duration[d]["generated"] for d in durations],
        yerr=[by_duration[d].get("generated_sem", 0.0) for d in durations],
        fmt="o-",
        capsize=3,
        color="tab:blue",
        label="generated",
    )
    ax.set_xticks(x, [f"{v:g} s" for v in x])
    ax.set_xlabel("duration prefix")
    ax.set_ylabel("px per keyframe step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _save(fig, out)


def loss_curves(curves: dict[str, Path], out: Path) -> Path:
    """Per training stage: loss (log scale, raw and a running mean) and learning rate per step."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), dpi=100, squeeze=False)
    for ax, (stage, path) in zip(axes[0], curves.items()):
        rows = {r["step"]: r for r in read_jsonl(path)}  # a resumed run logs some steps twice
        steps = sorted(rows)
        loss = np.array([rows[s]["loss"] for s in steps])
        ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=0.8)
        window = max(1, len(loss) // 25)
        if window > 1:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=1.6)
        ax.set_yscale("log")
        ax.set_title(f"{stage}: final loss {loss[-window:].mean():.3f}", fontsize=9)
        ax.set_xlabel("optimizer step")
        lr = ax.twinx()
        lr.plot(steps, [rows[s]["lr"] for s in steps], color="tab:orange", lw=1)
        lr.tick_params(axis="y", labelcolor="tab:orange", labelsize=7)
    axes[0][0].set_ylabel("cross-entropy (blue); lr (orange)")
    return _save(fig, out)


def confusion(videos: list[dict], out: Path) -> Path:
    """Held-out videos: the prompt's colour (shape) against the analyzer's reading, row-normalised."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100, gridspec_kw={"width_ratios": [2, 1.2]})
    heldout = [v for v in videos if v["heldout"]]
    for ax, (k, name, labels) in zip(axes, ((0, "colour", list(COLOURS)), (1, "shape", list(SHAPES)))):
        seen_labels = labels + ["none"]
        counts = np.zeros((len(labels), len(seen_labels)))
        for v in heldout:
            asked = parse_caption(v["prompt"])[k]
            seen = v["analysis"][name] or "none"
            counts[labels.index(asked), seen_labels.index(seen)] += 1
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(share):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.6 else "black",
                )
        ax.set_xticks(range(len(seen_labels)), seen_labels, rotation=45, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel(f"{name} seen")
        ax.set_ylabel(f"{name} asked")
    return _save(fig, out)
