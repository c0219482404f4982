"""The text format: how a caption and a duration become the text a model reads. Its one owner.

Training composes every sample's text with a :class:`TextFormat` (the `data.*` keys of the
training config), the checkpoint converter records it in the checkpoint's config.json
(``"text_format"``), and the sampler reads it from there, so a model samples with the format
it was trained on.

The release (THUDM/CogVideo ``cogvideo_pipeline.py``):
- video stages: ``"{duration}秒" <n> text`` (``DEFAULT_PREFIX_TEMPLATE``);
- classifier-free guidance text: ``"{duration}秒<n>视频"``, the duration prefix kept;
- frame 0: prompt + ``" 高清摄影"`` (``FRAME0_SUFFIX``), no prefix;
- stage 1: prompt + ``" 视频"`` (``VIDEO_SUFFIX``) when guided; stage 2: the prompt alone.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from cogvideo.vocab import SEPARATOR_PIECE

SEPARATOR = SEPARATOR_PIECE  # "<n>": ends the duration prefix
# The frame rates CogVideo trained at (stage 1 from 0.25 fps, stage 2 at 2/4/8): the durations its
# prefix takes are (frames - 1) / rate; data preparation's defaults
RELEASE_FRAME_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_PREFIX_TEMPLATE = "{duration:.1f}秒" + SEPARATOR + "{caption}"
UNCOND_CAPTION = "视频"  # "video": the caption of the guidance (unconditional) text
FRAME0_SUFFIX = " 高清摄影"  # "high-definition photography"
VIDEO_SUFFIX = " 视频"
_FIELDS = {"duration", "caption"}


class TextFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TextFormat:
    prefix_template: str = DEFAULT_PREFIX_TEMPLATE  # fields {duration} (seconds, float) and {caption}
    uncond_text: str = UNCOND_CAPTION  # caption of the guidance text (trained on data.caption_dropout)
    uncond_prefix: bool = True  # the guidance text carries the duration prefix, as in the release

    def __post_init__(self):
        try:
            names = {
                name for _, name, _, _ in string.Formatter().parse(self.prefix_template) if name is not None
            }
            self.prefix_template.format(duration=1.0, caption="")
        except (ValueError, IndexError, KeyError) as err:
            raise TextFormatError(f"prefix_template {self.prefix_template!r}: {err}") from None
        if "caption" not in names or not names <= _FIELDS:
            raise TextFormatError(
                f"prefix_template {self.prefix_template!r}: needs {{caption}} and may use "
                f"{{duration}}, nothing else"
            )
        if not self.uncond_text.strip():
            raise TextFormatError("uncond_text: empty")

    @property
    def has_duration(self) -> bool:
        """The prefix template reads the duration (a model trained on it knows how long a clip runs)."""
        return any(name == "duration" for _, name, _, _ in string.Formatter().parse(self.prefix_template))

    def text(self, caption: str, duration: float | None) -> str:
        """The model's text for a caption; `duration` None: the caption alone (frame 0)."""
        if duration is None:
            return caption
        return self.prefix_template.format(duration=float(duration), caption=caption)

    def uncond(self, duration: float | None) -> str:
        """The guidance text of a pass whose conditional text has this duration."""
        return self.text(self.uncond_text, duration if self.uncond_prefix else None)

    def required_chars(self) -> str:
        """Characters a text tokenizer must keep as pieces even when no caption has them: the
        prefix's digits and literal text, and the guidance caption."""
        literal = "".join(text for text, *_ in string.Formatter().parse(self.prefix_template))
        return "".join(sorted(set("0123456789." + literal.replace(SEPARATOR, "") + self.uncond_text) - {" "}))

    def to_dict(self) -> dict:
        return {
            "prefix_template": self.prefix_template,
            "uncond_text": self.uncond_text,
            "uncond_prefix": self.uncond_prefix,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "TextFormat":
        unknown = set(data) - set(cls().to_dict())
        if unknown:
            raise TextFormatError(f"{where}: unknown text format keys {sorted(unknown)}")
        try:
            return cls(**data)
        except TextFormatError as err:
            raise TextFormatError(f"{where}: {err}") from None
