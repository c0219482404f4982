"""Captions files: the one reader of what `cogvideo-prep --captions`, the text tokenizer command and
`cogvideo-params --captions` read, and the one place that matches caption rows to video files.

A captions file is a CSV with a ``path,caption`` header, JSON lines with ``path`` and ``caption``
keys (other keys ignored), or, where no paths are needed (the text tokenizer), plain text with one
caption per line. Every row keeps where it came from (``FILE:LINE``), so each problem is reported
naming its row. A row's problem (an empty caption, one that is not UTF-8, one so long that it
cannot be a caption) is recorded on the row; a file that cannot be read as such is one
:class:`CaptionsFileError` line.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

# A caption is a sentence or two: one this long is a file pasted in, or a quote (") left open in a
# CSV that swallowed the rows after it. Training would cut it to model.text_length anyway.
MAX_CAPTION_CHARS = 65536
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")


class CaptionsFileError(ValueError):
    """The captions file cannot be read: one line naming the file (and row) and the fix."""


@dataclass(frozen=True)
class CaptionRow:
    where: str  # FILE:LINE of the row's first line
    path: str | None  # the video path as the row gives it (None in a plain-text file)
    caption: str | None  # stripped; None when `problem` is set
    problem: str | None = None  # empty_caption, caption_not_utf8, caption_too_long
    detail: str = ""

    def video(self, root: str | Path) -> str:
        """The row's video as an absolute real path (relative paths are relative to `root`)."""
        return os.path.realpath(Path(root) / self.path)


def caption_row(where: str, path: str | None, raw) -> CaptionRow:
    """A row from its raw caption value, with the row's problem if it has one."""
    if not isinstance(raw, str) or not raw.strip():
        return CaptionRow(where, path, None, "empty_caption", where)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as lone surrogates by surrogateescape
        return CaptionRow(where, path, None, "caption_not_utf8", where)
    text = raw.strip()
    if len(text) > MAX_CAPTION_CHARS:
        return CaptionRow(
            where,
            path,
            None,
            "caption_too_long",
            f"{where}: the caption is {len(text):,} characters (at most {MAX_CAPTION_CHARS:,}): a file "
            f'pasted in, or a quote (") left open that swallowed the rows after it',
        )
    return CaptionRow(where, path, text)


@contextlib.contextmanager
def _any_field_size():
    """csv refuses fields over 128 KiB with `_csv.Error`; read them, then judge them per row."""
    saved = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(saved)


def _csv_rows(path: Path, text: str, need_paths: bool) -> list[CaptionRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    with _any_field_size():
        try:
            header = next(reader, None) or []
            wanted = ["path", "caption"] if need_paths else ["caption"]
            if not set(wanted) <= set(header):
                raise CaptionsFileError(
                    f"{path}: expected a header with columns {','.join(wanted)}; got {header or 'an empty file'}"
                )
            column = {name: header.index(name) for name in wanted}
            rows, line = [], reader.line_num + 1
            for fields in reader:
                where, line = f"{path}:{line}", reader.line_num + 1
                if not fields:
                    continue
                value = {name: fields[i] if i < len(fields) else None for name, i in column.items()}
                rows.append(caption_row(where, value.get("path"), value["caption"]))
        except csv.Error as err:
            raise CaptionsFileError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return rows


def _jsonl_rows(path: Path, text: str, need_paths: bool) -> list[CaptionRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaptionsFileError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
        if (
            not isinstance(row, dict)
            or "caption" not in row
            or (need_paths and not isinstance(row.get("path"), str))
        ):
            fields = "path and caption" if need_paths else "caption"
            raise CaptionsFileError(
                f"{where}: expected a JSON object with fields {fields}, got {_short(row)}"
            )
        rows.append(caption_row(where, row.get("path") if need_paths else None, row["caption"]))
    return rows


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def read_captions(path: str | Path, need_paths: bool = True) -> list[CaptionRow]:
    """Every row of a captions file, in order (blank lines skipped). `need_paths`: a CSV or JSONL
    file with paths (what prep reads); without, plain text (one caption per line) is read too."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsFileError(f"{path}: captions file not found")
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path, text, need_paths)
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, text, need_paths)
    if need_paths:
        raise CaptionsFileError(f"{path}: expected a .csv (header path,caption) or .jsonl captions file")
    return [
        caption_row(f"{path}:{number}", None, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def usable_captions(rows: list[CaptionRow]) -> tuple[list[CaptionRow], list[CaptionRow]]:
    """(rows with a caption, rows with a problem)."""
    return [r for r in rows if r.problem is None], [r for r in rows if r.problem is not None]


def near_match(name: str, candidates: list[str]) -> str | None:
    """The candidate `name` was probably meant to be: the same path but for letter case, else the
    same file name in another folder or with another extension, else a close spelling."""
    for same in (
        lambda c: c.lower() == name.lower(),
        lambda c: os.path.basename(c).lower() == os.path.basename(name).lower(),
        lambda c: os.path.splitext(c)[0].lower() == os.path.splitext(name)[0].lower(),
    ):
        found = [c for c in candidates if c != name and same(c)]
        if found:
            return found[0]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.85)
    return close[0] if close else None
