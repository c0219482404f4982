"""CogVideo's hierarchical generation:

1. frame 0 from the stage-1 model with the temporal channel off (or a user-given frame);
2. stage 1: the remaining keyframes token by token, with classifier-free guidance;
3. stage 2, level after level: every window of consecutive frames (F[2i], F[2i+1], F[2i+2]
   for a 5-frame stage-2 model) becomes the given frames of one stage-2 sequence, which
   fills the frames between them; the duration prefix halves at each level
   (5 -> 9 -> 17 -> 33 frames, 2.0 / 1.0 / 0.5 s windows). All windows of a level go
   through the model as one batch.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from cogvideo.models.cogvideo.decode import DecodePass, sample_frames, sample_frames_uncached
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.stage_model import StageModel
from cogvideo.sampling.prompts import TextBudgetError

# the model's text (already composed) -> left-padded ids [text_length]; raises TextBudgetError
Encoder = Callable[[str], torch.Tensor]


def row_generator(seed: int, prompt: str, tag: str) -> torch.Generator:
    """A row's own generator, seeded from (seed, its prompt, the pass it samples in), so a
    video does not depend on its batch neighbours."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{tag}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def window_layout(num_frames: int, stage2_frames: int) -> tuple[int, int]:
    """(windows, frames after interpolation) for a video of `num_frames` frames."""
    stride = (stage2_frames - 1) // 2  # given frames per window, minus the shared endpoint
    if num_frames < 2 or (num_frames - 1) % stride:
        raise ValueError(f"stage 2 with {stage2_frames} frames cannot interpolate a {num_frames}-frame video")
    windows = (num_frames - 1) // stride
    return windows, windows * (stage2_frames - 1) + 1


class HierarchicalSampler:
    def __init__(
        self,
        stage1: StageModel,
        stage2: StageModel | None,
        options: SampleOptions,
        encode: Encoder,
        strategies: dict,
        cached: bool = True,
        frame0: StageModel | None = None,
    ):
        self.stage1, self.stage2, self.options, self.encode = stage1, stage2, options, encode
        self.frame0_model = frame0 or stage1  # stage 1 with its temporal channel off draws frame 0 by default
        self.strategies = strategies  # {"frame0", "stage1", "stage2"} -> strategy
        if options.frame0_duration_prefix and not self.frame0_model.text_format.has_duration:
            raise ValueError(
                f"frame0_duration_prefix: the frame-0 model was trained without a duration prefix (text "
                f"format {self.frame0_model.text_format.prefix_template!r}); set frame0_duration_prefix=false"
            )
        self.decode = sample_frames if cached else sample_frames_uncached

    def _texts(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(t) for t in texts]).to(self.stage1.device)

    def _with_suffix(self, prompt: str, suffix: str, option: str, compose) -> tuple[str, str | None]:
        """compose(prompt + suffix), or compose(prompt) and a note when the suffix alone takes
        the text over the budget and options.suffix_over_budget is "drop"."""
        text = compose(prompt + suffix)
        if not suffix or self.options.suffix_over_budget == "error":
            return text, None
        try:
            self.encode(text)
            return text, None
        except TextBudgetError as err:
            return compose(prompt), f"{option} {suffix!r} dropped ({err})"

    def frame0_text(self, prompt: str) -> tuple[str, str | None]:
        """Frame 0: prompt + frame0_suffix, no duration prefix (the release's CogView2 pass) unless
        options.frame0_duration_prefix."""
        o = self.options
        duration = o.duration if o.frame0_duration_prefix else None
        return self._with_suffix(
            prompt,
            o.frame0_suffix,
            "frame0_suffix",
            lambda text: self.frame0_model.text_format.text(text, duration),
        )

    def stage1_text(self, prompt: str) -> tuple[str, str | None]:
        """Stage 1: the duration prefix and the prompt, + video_suffix when guided (the release's)."""
        o = self.options
        suffix = o.video_suffix if o.stage1_guidance != 1.0 else ""
        return self._with_suffix(
            prompt, suffix, "video_suffix", lambda text: self.stage1.text_format.text(text, o.duration)
        )

    def stage2_text(self, prompt: str, duration: float) -> str:
        """Stage 2: the window's duration prefix and the bare prompt (the release's)."""
        return self.stage2.text_format.text(prompt, duration)

    def _uncond(self, stage: StageModel, rows: int, guidance: float, duration: float) -> torch.Tensor | None:
        """The guidance text block (the stage's trained format), or None when guidance is 1."""
        return None if guidance == 1.0 else self._texts([stage.text_format.uncond(duration)] * rows)

    def texts(self, prompt: str) -> tuple[list[str], list[str]]:
        """Every text one prompt's video feeds a model (guidance texts included), and the notes
        on what was changed to fit them; encoding them all checks the text budget up front."""
        o = self.options
        (frame0, note0), (stage1, note1) = self.frame0_text(prompt), self.stage1_text(prompt)
        texts = [frame0, stage1, self.stage1.text_format.uncond(o.duration)]
        if self.stage2 is not None and o.interpolation_levels:
            num_frames = self.stage1.cfg.num_frames
            for _ in range(o.interpolation_levels):
                stride = len(self.stage2.cfg.given_frames) - 1
                duration = o.duration * stride / (num_frames - 1)
                texts += [self.stage2_text(prompt, duration), self.stage2.text_format.uncond(duration)]
                num_frames = window_layout(num_frames, self.stage2.cfg.num_frames)[1]
        return texts, [n for n in (note0, note1) if n]

    def sample(
        self, prompts: list[str], first_frames: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """Image codes [B, frames, tokens_per_frame] of the final video, in time order."""
        frames = self.keyframes(prompts, self.frame0(prompts, first_frames))
        if self.stage2 is not None:
            for level in range(self.options.interpolation_levels):
                frames = self.interpolate(prompts, frames, level)
        return frames

    def frame0(
        self, prompts: list[str], first_frames: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        first_frames = first_frames or [None] * len(prompts)
        todo = [i for i, f in enumerate(first_frames) if f is None]
        out = [None if f is None else f.long() for f in first_frames]
        if todo:
            o = self.options
            job = DecodePass(
                text=self._texts([self.frame0_text(prompts[i])[0] for i in todo]),
                given={},
                targets=(0,),
                temporal=False,
                text_bias=o.frame0_text_bias,
            )
            gens = [row_generator(o.seed, prompts[i], "frame0") for i in todo]
            codes = self.decode(self.frame0_model, job, self.strategies["frame0"], gens)[0]
            for row, i in enumerate(todo):
                out[i] = codes[row]
        return torch.stack([f.to(self.stage1.device) for f in out])

    def keyframes(self, prompts: list[str], frame0: torch.Tensor) -> torch.Tensor:
        o, cfg = self.options, self.stage1.cfg
        targets = tuple(f for f in cfg.sampling_order if f != 0)
        job = DecodePass(
            text=self._texts([self.stage1_text(p)[0] for p in prompts]),
            given={0: frame0},
            targets=targets,
            guidance=o.stage1_guidance,
            uncond_text=self._uncond(self.stage1, len(prompts), o.stage1_guidance, o.duration),
            text_bias=o.text_bias("stage1"),
        )
        gens = [row_generator(o.seed, p, "stage1") for p in prompts]
        sampled = self.decode(self.stage1, job, self.strategies["stage1"], gens)
        sampled[0] = frame0
        return torch.stack([sampled[f] for f in range(cfg.num_frames)], dim=1)

    def interpolate(
        self, prompts: list[str], frames: torch.Tensor, level: int, windows_per_pass: int = 0
    ) -> torch.Tensor:
        """One stage-2 level: [B, N, n] -> [B, N', n]; `windows_per_pass` 0 = the whole level at once."""
        o, cfg = self.options, self.stage2.cfg
        batch, num_frames, _ = frames.shape
        windows, new_frames = window_layout(num_frames, cfg.num_frames)
        given_slots = cfg.given_frames
        stride = len(given_slots) - 1
        duration = o.duration * stride / (num_frames - 1)  # the span of one window
        rows = [(b, w) for b in range(batch) for w in range(windows)]
        step = windows_per_pass or len(rows)
        out = frames.new_zeros(batch, new_frames, frames.shape[2])
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            given = {
                slot: torch.stack([frames[b, w * stride + i] for b, w in part])
                for i, slot in enumerate(given_slots)
            }
            job = DecodePass(
                text=self._texts([self.stage2_text(prompts[b], duration) for b, _ in part]),
                uncond_text=self._uncond(self.stage2, len(part), o.stage2_guidance, duration),
                given=given,
                targets=tuple(f for f in cfg.sampling_order if f not in given_slots),
                guidance=o.stage2_guidance,
                text_bias=o.text_bias("stage2"),
            )
            gens = [row_generator(o.seed, prompts[b], f"stage2/level{level}/window{w}") for b, w in part]
            window_frames = {**given, **self.decode(self.stage2, job, self.strategies["stage2"], gens)}
            for row, (b, w) in enumerate(part):
                for j in range(cfg.num_frames):
                    out[b, w * (cfg.num_frames - 1) + j] = window_frames[j][row]
        return out
