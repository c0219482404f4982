"""What a sampled video leaves on disk: mp4 (PyAV), gif, a contact-sheet row, the codes.

Per prompt, in `out/<key>/`: video.mp4, video.gif, codes.npy (image codes [T, h, w]),
sheet_row.png; the job adds record.json (written last: the entry is complete) and, in `out/`,
manifest.json, options.json and contact_sheet.png.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

SHEET_COLUMNS = 9  # frames per contact-sheet row, evenly spaced, first and last included
LABEL_WIDTH = 96


def write_json(path: Path, data) -> None:
    """Atomic: a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    """frames uint8 [T, H, W, 3]; H.264 (yuv420p) when the build has it, else MPEG-4 Part 2."""
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if frame.shape[:2] != (stream.height, stream.width):  # yuv420p needs even sides
                frame = np.pad(frame, ((0, stream.height - height), (0, stream.width - width), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def sheet_columns(num_frames: int, columns: int = SHEET_COLUMNS) -> list[int]:
    if num_frames <= columns:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (columns - 1)) for i in range(columns)})


def write_sheet_row(path: Path, frames: np.ndarray) -> None:
    Image.fromarray(np.concatenate([frames[i] for i in sheet_columns(len(frames))], axis=1)).save(path)


def write_contact_sheet(path: Path, rows: list[tuple[str, Path]]) -> None:
    """Stack sheet rows (label, png path) into one image: prompts x sampled frames."""
    images = [(label, Image.open(p).convert("RGB")) for label, p in rows]
    width = LABEL_WIDTH + max(im.width for _, im in images)
    heights = [max(im.height, 12) for _, im in images]
    sheet = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (label, im), height in zip(images, heights):
        sheet.paste(im, (LABEL_WIDTH, top))
        draw.text((2, top + 1), label.encode("ascii", "replace").decode()[:14], fill="black")
        top += height
    sheet.save(path)


def write_video_entry(entry: Path, codes: np.ndarray, frames: np.ndarray, fps: float) -> dict:
    """Everything but record.json for one prompt; returns the files written."""
    entry.mkdir(parents=True, exist_ok=True)
    np.save(entry / "codes.npy", codes)
    write_mp4(entry / "video.mp4", frames, fps)
    write_gif(entry / "video.gif", frames, fps)
    write_sheet_row(entry / "sheet_row.png", frames)
    return {"mp4": "video.mp4", "gif": "video.gif", "codes": "codes.npy", "sheet_row": "sheet_row.png"}
