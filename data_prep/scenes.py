"""Scene cuts: PySceneDetect's content detector, scored a chunk of frames at a time.

PySceneDetect's `ContentDetector` (its default weights: hue, saturation and value, no edges)
scores a frame by the mean absolute change of each channel of OpenCV's 8-bit HSV from the frame
before, averaged over the three (the first frame scores 0); its `FlashFilter` in SUPPRESS mode
makes a frame scoring at least the threshold a cut when at least `min_scene_len` frames have
passed since the last cut (the first frame counts as one). Fed from Python one frame at a time,
that cost a third of a millisecond a frame, a third of what decoding a 720p frame costs: here the
colour conversion and the differences run over a chunk of frames in one call each, and the
decisions follow the filter's rule. tests/test_data_prep_scenes.py holds it to PySceneDetect's
own detector, cut for cut and score for score.
"""

from __future__ import annotations

import cv2
import numpy as np

WEIGHTS = (1.0, 1.0, 1.0)  # ContentDetector's default hue, saturation, value weights (edges: 0)


class ContentCuts:
    """Feed consecutive RGB frames in chunks; `cuts` says which frames start a new scene."""

    def __init__(self, threshold: float, min_scene_len: int):
        self.threshold, self.min_scene_len = threshold, min_scene_len
        self.last_hsv: np.ndarray | None = None  # [pixels, 3] of the last frame fed
        self.last_cut = 0  # index of the last cut (the first frame counts as one)
        self.fed = 0  # frames fed so far

    def scores(self, frames: np.ndarray) -> np.ndarray:
        """ContentDetector's score of each of `frames` (uint8 RGB [n, h, w, 3]): float64 [n]."""
        n, h, w, _ = frames.shape
        flat = np.ascontiguousarray(frames).reshape(n * h, w, 3)  # one image: one conversion
        hsv = cv2.cvtColor(flat, cv2.COLOR_RGB2HSV).reshape(n, h * w, 3).astype(np.int32)
        before = np.concatenate([hsv[:1] if self.last_hsv is None else self.last_hsv[None], hsv[:-1]])
        deltas = np.abs(hsv - before).sum(axis=1) / float(h * w)  # [n, 3]: mean |change| per channel
        # the detector's weighted mean, summed in its order: bit-identical scores
        scores = (
            deltas[:, 0] * WEIGHTS[0] + deltas[:, 1] * WEIGHTS[1] + deltas[:, 2] * WEIGHTS[2] + 0.0
        ) / sum(WEIGHTS)
        self.last_hsv = hsv[-1]
        return scores

    def cuts(self, frames: np.ndarray) -> list[bool]:
        """Whether each of `frames` (uint8 RGB [n, h, w, 3], following those fed before) is a cut."""
        out = []
        for score in self.scores(frames).tolist():
            cut = score >= self.threshold and self.fed - self.last_cut >= self.min_scene_len
            if cut:
                self.last_cut = self.fed
            out.append(cut)
            self.fed += 1
        return out
