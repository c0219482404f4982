"""What a sampled video leaves on disk: mp4 (PyAV), gif, a contact-sheet row, the codes.

Per prompt, in `out/<key>/`: video.mp4, video.gif, codes.npy (image codes [T, h, w]; after
super-resolution the high-res ones, the low-res in codes_low.npy; a pixel model's exact
frames in pixels.npy instead), sheet_row.png; the job adds record.json (written last: the entry is complete) and, in `out/`,
manifest.json, options.json and contact_sheet.png.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cogvideo.video_io import write_mp4

SHEET_COLUMNS = 9  # frames per contact-sheet row, evenly spaced, first and last included
SHEET_FRAME_SIDE = 96  # contact-sheet frames are enlarged to at least this many pixels
LABEL_WIDTH = 220  # pixels of the label column
LABEL_MARGIN = 4
LABEL_FONT_SIZE = 14
CJK_FONTS = (
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
)
log = logging.getLogger(__name__)


def write_json(path: Path, data) -> None:
    """Atomic: a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def sheet_columns(num_frames: int, columns: int = SHEET_COLUMNS) -> list[int]:
    if num_frames <= columns:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (columns - 1)) for i in range(columns)})


def write_sheet_row(path: Path, frames: np.ndarray) -> None:
    Image.fromarray(np.concatenate([frames[i] for i in sheet_columns(len(frames))], axis=1)).save(path)


def _is_cjk(char: str) -> bool:
    return "\u2e80" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff" or "\uff00" <= char <= "\uffef"


class LabelFont:
    """Latin text in Pillow's default font, CJK in the first CJK font installed (Debian's
    fonts-droid-fallback, which `.ci/run` installs, fonts-noto-cjk or fonts-wqy-*)."""

    def __init__(self, size: int = LABEL_FONT_SIZE):
        self.latin = ImageFont.load_default(size)
        path = next((p for p in CJK_FONTS if Path(p).is_file()), None)
        self.cjk = ImageFont.truetype(path, size) if path else None
        self.line_height = size + 4

    def _runs(self, text: str):
        """(font, run) pieces of text, each drawn in one font."""
        runs = []
        for char in text:
            font = self.cjk if self.cjk is not None and _is_cjk(char) else self.latin
            if runs and runs[-1][0] is font:
                runs[-1][1] += char
            else:
                runs.append([font, char])
        return runs

    def length(self, text: str) -> float:
        return sum(font.getlength(run) for font, run in self._runs(text))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
        x, y = xy
        for font, run in self._runs(text):
            draw.text((x, y), run, fill="black", font=font)
            x += font.getlength(run)


def wrap_label(text: str, font: LabelFont, width: int) -> list[str]:
    """Greedy wrap to `width` pixels: at spaces where possible, inside a word (or a run of CJK,
    which has no spaces) where not."""
    lines, line = [], ""
    for word in text.replace("\n", " ").split(" "):
        candidate = f"{line} {word}" if line else word
        if font.length(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
            line = ""
        for char in word:
            if line and font.length(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    return [*lines, line] if line else lines


def write_contact_sheet(path: Path, rows: list[tuple[str, Path]]) -> None:
    """Stack sheet rows (label, png path) into one image: prompts x sampled frames. Frames are
    enlarged (nearest neighbour) to at least SHEET_FRAME_SIDE px; labels wrap in their column."""
    font = LabelFont()
    labels = [label for label, _ in rows]
    if font.cjk is None and any(_is_cjk(c) for label in labels for c in label):
        log.warning(
            "%s: no CJK font installed (apt-get install fonts-droid-fallback): CJK in labels shows as '?'",
            path,
        )
        labels = ["".join("?" if _is_cjk(c) else c for c in label) for label in labels]
    images = []
    for _, png in rows:
        image = Image.open(png).convert("RGB")
        scale = max(1, -(-SHEET_FRAME_SIDE // image.height))
        images.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    line_height = font.line_height
    wrapped = [wrap_label(label, font, LABEL_WIDTH - 2 * LABEL_MARGIN) for label in labels]
    heights = [
        max(im.height, len(lines) * line_height + 2 * LABEL_MARGIN) for im, lines in zip(images, wrapped)
    ]
    sheet = Image.new("RGB", (LABEL_WIDTH + max(im.width for im in images), sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for im, lines, height in zip(images, wrapped, heights):
        sheet.paste(im, (LABEL_WIDTH, top))
        for i, line in enumerate(lines):
            font.draw(draw, (LABEL_MARGIN, top + LABEL_MARGIN + i * line_height), line)
        top += height
    sheet.save(path)


def write_video_entry(
    entry: Path, codes: np.ndarray | None, frames: np.ndarray, fps: float, extra_codes: dict | None = None
) -> dict:
    """Everything but record.json for one prompt; returns the files written. `codes`: a token
    model's image codes (None for a pixel-space model); `extra_codes`: more arrays by name
    (e.g. "codes_low", the frames before super-resolution; "pixels", a pixel model's exact
    frames), as NAME.npy."""
    entry.mkdir(parents=True, exist_ok=True)
    arrays = ({} if codes is None else {"codes": codes}) | (extra_codes or {})
    for name, array in arrays.items():
        np.save(entry / f"{name}.npy", array)
    write_mp4(entry / "video.mp4", frames, fps)
    write_gif(entry / "video.gif", frames, fps)
    write_sheet_row(entry / "sheet_row.png", frames)
    files = {"mp4": "video.mp4", "gif": "video.gif", "sheet_row": "sheet_row.png"}
    return files | {name: f"{name}.npy" for name in arrays}
