"""icetk's released tokenizer files: their names, and finding one from a file or directory path.

They are never downloaded here; a user copies them from the CogView2/CogVideo release."""

from __future__ import annotations

from pathlib import Path

ICETK_TEXT_MODEL = "ice_text.model"
ICETK_IMAGE_MODEL = "ice_image.pt"


def resolve_icetk_file(path: str | Path, file_name: str, what: str, alternative: str = "") -> Path:
    """``path`` itself, or icetk's ``file_name`` inside the directory ``path``; a missing file is a
    FileNotFoundError naming ``what``, where it was looked for and the ``alternative`` to copying it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found: {path} (icetk's {file_name} is never downloaded here: "
            f"copy it there{', or ' + alternative if alternative else ''})"
        )
    return path
