"""Prompt files and prompt text -> the model's left-padded text block."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cogvideo.family_spec import TextModelConfig


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    key: str  # output entry name: stable, unique within the file
    text: str
    first_frame: str | None = None  # image path, used instead of sampling frame 0


def _key(text: str) -> str:
    """Readable and stable when lines are added or reordered: words + a hash of the text."""
    words = re.sub(r"[^\w]+", "_", text.lower()).strip("_")[:40].rstrip("_")
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{words}_{digest}" if words else digest


@dataclass(frozen=True)
class PromptFile:
    prompts: list[Prompt]
    blank_lines: list[int]  # line numbers of the blank lines skipped
    comments: int = 0  # `#` lines

    def skipped(self) -> str:
        """ "" or what was skipped, e.g. "1 blank line skipped (line 4)"."""
        if not self.blank_lines:
            return ""
        lines = ", ".join(map(str, self.blank_lines[:10])) + (", ..." if len(self.blank_lines) > 10 else "")
        return f"{len(self.blank_lines)} blank line(s) skipped (line {lines})"


def read_prompts(path: str | Path) -> PromptFile:
    """One prompt per line (blank lines and `#` comments skipped, and counted), or a `.jsonl` file
    of {"prompt": ..., "first_frame": optional image path, "key": optional name}."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    prompts, lines, blank, comments = [], {}, [], 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            blank.append(lineno)
            continue
        if line.startswith("#"):
            comments += 1
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
                text, first_frame, key = item["prompt"], item.get("first_frame"), item.get("key")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise PromptError(
                    f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({err})"
                ) from err
        else:
            text, first_frame, key = line, None, None
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"{path}:{lineno}: empty prompt")
        if key is not None and (not isinstance(key, str) or not re.fullmatch(r"[\w][\w.-]*", key)):
            raise PromptError(f"{path}:{lineno}: key {key!r} is not a plain folder name")
        prompt = Prompt(key or _key(text.strip()), text.strip(), first_frame)
        if prompt.key in lines:  # the same key would share one output entry
            raise PromptError(
                f"{path}:{lineno}: duplicate of line {lines[prompt.key]} (output key {prompt.key!r})"
            )
        lines[prompt.key] = lineno
        prompts.append(prompt)
    if not prompts:
        raise PromptError(f"{path}: no prompts (empty file)")
    return PromptFile(prompts, blank, comments)


class TextBudgetError(ValueError):
    pass


class TextEncoder:
    """The model's text (composed by the text format) -> ids [text_length], left-padded.

    A text longer than the model's text budget is refused (TextBudgetError), not truncated:
    cutting it would silently drop either the duration prefix or the end of the prompt."""

    def __init__(self, tokenizer, cfg: TextModelConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def __call__(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text)
        budget = self.cfg.text_length
        if len(ids) > budget:
            raise TextBudgetError(
                f"text {text[:60]!r} is {len(ids)} text tokens; the model's text budget "
                f"(model.text_length) is {budget}: shorten the prompt"
            )
        pad = [self.cfg.vocab.pad_id] * (budget - len(ids))
        return torch.tensor(pad + list(ids), dtype=torch.long)
