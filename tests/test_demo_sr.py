"""The demo's super-resolution stage (configs/demo/dsr/, demo.family_steps' stage.yaml, demo.sr_evaluation):
the synthetic world rendered 3x finer is the same scene; the reference of a low-res frame is the 3x
rendering of what it shows; the SR figures against independently computed PSNR / SSIM / flicker,
and failing with a planted wrong reference or bicubic of the wrong frames; the stage's steps build
on the demo model it starts from and on the hierarchy's samples; its options, videos and a bad
stage.yaml; the demo's tokenizer decodes the 3x grid. All in-process, no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvideo.configio import ConfigError, load_config
from cogvideo.eval import sr as sr_metrics
from cogvideo.family import plain_model
from cogvideo.metrics import psnr_per_frame, ssim_per_frame
from cogvideo.synthetic import COLOURS, render_frames
from cogvideo.video_io import read_video
from data_prep import synthetic as synthetic_videos
from data_prep.config import PrepConfig, prep_model
from data_prep.stages import extract_samples, hash_input
from data_prep.synthetic import plan_videos, render_row
from demo import driver, settings
from demo import sr_evaluation as sr_eval
from demo.family_steps import FamilySteps
from demo.settings import DemoConfig, SampleSettings
from demo.steps import Runner
from demo.tasks import Demo
from pretrain.config import check_config, load_train_config

pytestmark = pytest.mark.filterwarnings("ignore")
DSR = Path(settings.ROOT, "configs", "demo", "dsr")
RADIUS = 6


def scene(colour="red", shape="circle", direction="right", scale=1, frames=5, start=(12.5, 15.5)):
    """A video whose centres lie on pixel centres: its objects' bounding boxes are exact."""
    return render_frames(colour, shape, direction, frames, 32, 1.0, 1.0, start, radius=RADIUS, scale=scale)


def test_the_world_rendered_3x_finer_is_the_same_scene():
    rows = plan_videos(3, seed=4, size=32, duration_s=(1.0, 2.0))
    for row in rows:
        low, high = render_row(row), render_row(row, 3)
        assert high.shape == (len(low), 96, 96, 3)
        np.testing.assert_array_equal(high[:, 1::3, 1::3], low)  # each 3 x 3 block's centre pixel
        assert render_row({**row, "scale": 3}).shape == high.shape  # a row written at 3x says so
    # finer: the shape's edge cuts through low-res pixels, which the 3x grid resolves
    assert (np.abs(render_row(rows[0], 3).astype(int)[:, ::3, ::3] - render_row(rows[0])).sum()) > 0


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_the_reference_is_the_3x_rendering_of_what_each_low_res_frame_shows(shape):
    low = scene("green", shape)
    low[2] = scene("cyan", "square", start=(20.5, 9.5))[0]  # what the frame shows, not the prompt
    low[3] = 16  # an empty frame: background
    reference = sr_metrics.scene_reference(low, 3, RADIUS)
    expected = scene("green", shape, scale=3)
    expected[2] = scene("cyan", "square", scale=3, start=(20.5, 9.5))[0]
    expected[3] = 16
    np.testing.assert_array_equal(reference, expected)


def fake_tokenizer(bank: np.ndarray):
    """decode(codes [T, s, s]) -> bank[codes[:, 0, 0]]: a frame bank indexed by a video's codes;
    encode(frames) adds the frames, rounded down to multiples of 3, to the bank (a lossy round trip)."""

    class Bank:
        def decode(self, codes):
            return self.bank[np.asarray(codes)[:, 0, 0]]

        def encode(self, frames):
            start, self.bank = len(self.bank), np.concatenate([self.bank, np.asarray(frames) // 3 * 3])
            return np.broadcast_to(np.arange(start, len(self.bank))[:, None, None], (len(frames), 1, 1))

    tokenizer = Bank()
    tokenizer.bank = bank
    return tokenizer


def write_videos(
    root: Path, lows: list[np.ndarray], srs: list[np.ndarray], hierarchy_same: list[bool], pixels=False
):
    """Sampled SR videos as cogvideo-sample writes them (codes.npy high-res, codes_low.npy), their
    frames in banks; the hierarchy's samples (same folder names) equal or not. `pixels`: as a
    posterior-mean stage writes them, the SR frames in pixels.npy and no codes.npy."""
    low_bank, high_bank, videos, start = [], [], [], 0
    for n, (low, high, same) in enumerate(zip(lows, srs, hierarchy_same)):
        index = np.arange(start, start + len(low))[:, None, None]
        start += len(low)
        low_bank.append(low)
        high_bank.append(high)
        folder = root / "dsr" / "d4_seed1" / f"video{n}"
        folder.mkdir(parents=True)
        np.save(folder / "codes_low.npy", np.broadcast_to(index, (len(low), 4, 4)).copy())
        if pixels:
            np.save(folder / "pixels.npy", high)
        else:
            np.save(folder / "codes.npy", np.broadcast_to(index, (len(low), 12, 12)).copy())
        theirs = root / "hierarchy" / "d4_seed1" / f"video{n}"
        theirs.mkdir(parents=True)
        np.save(theirs / "codes.npy", np.load(folder / "codes_low.npy") + (0 if same else 1))
        videos.append(
            {"dir": str(folder), "prompt": "a red circle moving right", "duration": 4.0, "heldout": True}
        )
    videos.append({**videos[0], "heldout": False})  # seen prompts are not scored
    return videos, fake_tokenizer(np.concatenate(low_bank)), fake_tokenizer(np.concatenate(high_bank))


def expected_figures(lows, srs, references) -> dict:
    """PSNR / SSIM per frame, averaged; PIL's bicubic of the low-res frames; flicker by hand."""
    reference, sr = np.concatenate(references), np.concatenate(srs)
    bicubic = np.concatenate(
        [
            np.stack([np.asarray(Image.fromarray(f).resize((96, 96), Image.BICUBIC)) for f in low])
            for low in lows
        ]
    )

    def flick(videos):
        return float(np.mean([np.abs(np.diff(v.astype(float), axis=0)).mean() for v in videos]))

    return {
        "sr": (psnr_per_frame(reference, sr).mean(), ssim_per_frame(reference, sr).mean()),
        "bicubic": (psnr_per_frame(reference, bicubic).mean(), ssim_per_frame(reference, bicubic).mean()),
        "flicker": (flick(srs), flick([bicubic[i * 5 : i * 5 + 5] for i in range(len(lows))])),
        # the high-res tokenizer's round trip of the reference (fake_tokenizer: multiples of 3)
        "ceiling": (
            psnr_per_frame(reference, reference // 3 * 3).mean(),
            ssim_per_frame(reference, reference // 3 * 3).mean(),
        ),
    }


def check_summary(tmp_path: Path, pixels=False):
    rng = np.random.default_rng(0)
    lows = [scene("red", "circle", "right"), scene("red", "circle", "down")]
    references = [scene("red", "circle", "right", 3), scene("red", "circle", "down", 3)]
    srs = []
    for ref in references:  # an SR output: the reference, one level off in a few pixels
        off = (rng.random(ref.shape) < 0.05) * rng.choice([-1, 1], ref.shape)
        srs.append(np.clip(ref + off, 0, 255).astype(np.uint8))
    videos, low_tok, high_tok = write_videos(tmp_path, lows, srs, [True, False], pixels)
    got = sr_eval.super_resolution_summary(videos, low_tok, high_tok, RADIUS, tmp_path / "hierarchy")
    want = expected_figures(lows, srs, references)
    assert (got["videos"], got["frames"], got["scale"], got["low_res_same_as_hierarchy"]) == (2, 10, 3, 1)
    for name in ("sr", "bicubic"):
        assert (got[name]["psnr_db"], got[name]["ssim"]) == pytest.approx(want[name], rel=1e-12)
    assert got["psnr_gain_db"] > 0 and got["ssim_gain"] > 0  # the near-exact SR beats bicubic
    ceiling = got["tokenizer_ceiling"]
    assert (ceiling["psnr_db"], ceiling["ssim"]) == pytest.approx(want["ceiling"], rel=1e-12)
    assert ceiling["unchanged_frames"] == 0
    assert (got["flicker"]["sr"], got["flicker"]["low_res_bicubic"]) == pytest.approx(
        want["flicker"], rel=1e-12
    )
    assert got["prompt_scores"]["agreement"] == {"colour": 1.0, "shape": 1.0, "direction": 1.0}
    return got, videos, low_tok, high_tok


def test_the_sr_figures_against_the_rendered_reference_and_bicubic(tmp_path):
    got, videos, low_tok, _ = check_summary(tmp_path)
    wrong = fake_tokenizer(np.stack([np.full((96, 96, 3), COLOURS["blue"], np.uint8)] * 10))
    changed = sr_eval.super_resolution_summary(videos, low_tok, wrong, RADIUS)
    assert changed["prompt_scores"]["agreement"]["colour"] == 0.0  # SR changed what the video shows
    assert (
        changed["prompt_scores"]["sr"]["colour"] == 0.0
        and changed["prompt_scores"]["low_res"]["colour"] == 1.0
    )
    assert "low_res_same_as_hierarchy" not in changed


def test_the_sr_figures_of_a_stage_that_hands_out_pixels(tmp_path):
    """A posterior-mean stage's videos (pixels.npy, no codes.npy): the same figures, its frames read
    as they are, and the demo's evaluation reads them too (decode_and_render)."""
    from demo.evaluation import decode_and_render

    _, videos, _, high_tok = check_summary(tmp_path, pixels=True)
    rows = [{**v, "colour": "red", "shape": "circle", "direction": "right"} for v in videos[:2]]
    generated, _ = decode_and_render(rows, high_tok, 96, 12.0, seed=0)
    for video, frames in zip(videos, generated):
        np.testing.assert_array_equal(frames, np.load(Path(video["dir"]) / "pixels.npy"))


def test_a_wrong_reference_or_bicubic_of_the_wrong_frames_fails(tmp_path, monkeypatch):
    """Planted bugs: the reference the bicubic upsampling itself; the bicubic taken of the SR frames
    (downsampled) instead of the low-res frames SR was given; the ceiling the round trip of the SR
    frames instead of the reference."""
    with monkeypatch.context() as patch:
        patch.setattr(
            sr_eval, "scene_reference", lambda low, scale, radius: sr_metrics.upsample_bicubic(low, 96)
        )
        with pytest.raises(AssertionError):
            check_summary(tmp_path / "reference")

    def bicubic_of_sr(reference, sr, low):
        return sr_metrics.sr_quality(reference, sr, np.asarray(sr)[:, 1::3, 1::3])

    with monkeypatch.context() as patch:
        patch.setattr(sr_eval, "sr_quality", bicubic_of_sr)
        with pytest.raises(AssertionError):
            check_summary(tmp_path / "bicubic")

    def round_trip_of_sr(reference, tokenizer):
        return sr_metrics.tokenizer_ceiling(tokenizer.decode(tokenizer.encode(reference)), tokenizer)

    with monkeypatch.context() as patch:
        patch.setattr(sr_eval, "tokenizer_ceiling", round_trip_of_sr)
        with pytest.raises(AssertionError):
            check_summary(tmp_path / "ceiling")


def test_sr_goals():
    from demo.evaluation import sr_targets

    sr = {
        "psnr_gain_db": 1.5,
        "ssim_gain": -0.01,
        "prompt_scores": {"agreement": {"colour": 1.0, "shape": 0.9, "direction": 1.0}},
        "flicker": {"sr_over_low_res": 1.2},
    }
    goals = {"sr_psnr_gain": 0.0, "sr_ssim_gain": 0.0, "sr_prompts": 0.95, "sr_flicker": 1.5}
    met = {name: t["met"] for name, t in sr_targets(sr, goals).items()}
    assert list(met.values()) == [True, False, False, True]
    assert sr_targets(sr, {"sr_prompts": 0.9})["colour/shape/direction unchanged by SR"]["met"]


def test_the_stage_builds_on_the_demo_model_it_starts_from_and_the_hierarchys_samples():
    cfg = DemoConfig(families=["cogvideo", "dsr"])
    steps = driver.steps_for(cfg)
    names = [s.name for s in steps]
    assert names[9:] == ["dsr_videos", "dsr_shards", "dsr_train", "dsr_sample", "dsr_evaluate", "report"]
    runner = Runner(Path("unused"), steps, driver.step_settings(cfg, steps))
    assert runner.builds_on["dsr_videos"] == ("tokenizers",)
    assert runner.builds_on["dsr_train"] == ("dsr_shards", "backbone")
    assert runner.builds_on["dsr_sample"] == ("dsr_train", "sample")
    fingerprints = runner.fingerprints
    other = DemoConfig(families=["cogvideo", "dsr"], sample=SampleSettings(options=["stage1_guidance=3.0"]))
    steps = driver.steps_for(other)
    changed = Runner(Path("unused"), steps, driver.step_settings(other, steps)).fingerprints
    assert changed["dsr_train"] == fingerprints["dsr_train"]  # the hierarchy's sampling: sampled again
    assert changed["dsr_sample"] != fingerprints["dsr_sample"]
    with pytest.raises(
        ConfigError, match="'dsr' is a stage of cogvideo's pipeline .*list 'cogvideo' before it"
    ):
        DemoConfig(families=["dsr"])


def test_a_bad_stage_file_stops_in_one_line(tmp_path, monkeypatch):
    root = tmp_path / "settings"
    (root / "dsr").mkdir(parents=True)
    for path in DSR.glob("*.yaml"):
        (root / "dsr" / path.name).write_text(path.read_text())
    monkeypatch.setattr(settings, "FAMILY_SETTINGS", root)
    (root / "dsr" / "stage.yaml").write_text("init: stage9\nsample_option: sr_model\nvideo_scale: 0\n")
    with pytest.raises(
        ConfigError, match=r"stage.yaml: bad or unknown \['init', 'sample_option', 'video_scale'\]"
    ):
        DemoConfig(families=["cogvideo", "dsr"])


def test_the_demo_trains_the_whole_dsr_model_from_the_backbone():
    """configs/demo/dsr/train.yaml's model.train_backbone (the release freezes the backbone) holds
    as the trainer resolves it with the init.backbone the demo gives: every parameter trains."""
    given = ["init.backbone=backbone", "data.shards=[x.tar]", "data.text_tokenizer=t.model"]
    cfg = check_config(load_train_config(str(DSR / "train.yaml"), given), 2, has_gpu=False)
    assert cfg.high_slots == "low_res"
    assert all(p.requires_grad for p in plain_model(cfg).parameters())


def test_the_demo_trains_dsr_past_one_pass_over_its_pairs():
    """configs/demo/dsr/train.yaml's schedule as the trainer resolves it: 1200 steps of 2 ranks x
    16 frame pairs, more draws than the 26477 pairs prep.yaml's 3-frame clips give (README
    "Measured": on the same base run, 600 steps (one pass) left SR 1.0 dB lower on exact clips)."""
    given = ["init.backbone=backbone", "data.shards=[x.tar]", "data.text_tokenizer=t.model"]
    train = load_train_config(str(DSR / "train.yaml"), given)
    assert train.training.max_steps * train.training.micro_batch_size * 2 > 26477


def test_the_stage_prepares_a_frame_pair_from_every_third_frame(tmp_path):
    """configs/demo/dsr/prep.yaml cuts each video into 3-frame clips, one training pair each (its
    middle frame), so a 2 s video at 8 fps (17 frames) gives 6 distinct pairs; as one clip (prep's
    default max_clip_s, planted) it gave 1: 3917 pairs in all, which dsr-small memorised."""
    (row,) = plan_videos(1, seed=3, size=32, duration_s=(2.0,))
    synthetic_videos.write_videos(tmp_path, [row], scale=3)
    source = {"entry": "0", "path": str(tmp_path / row["path"]), "caption": row["caption"]}
    frames = render_row(row, 3)

    def pairs(cfg: PrepConfig) -> list[np.ndarray]:
        model = prep_model(cfg)
        rows = extract_samples(hash_input(source), cfg, model, model.high_frame_size)
        return [
            np.frombuffer(r["pixels"], np.uint8).reshape(frames.shape[1:])
            for r in rows
            if r["kind"] == "sample"
        ]

    model = ["model.family=dsr", "model.preset=dsr-small"]
    picked = pairs(load_config(PrepConfig, DSR / "prep.yaml", model))
    nearest = [int(np.abs(frames.astype(int) - p).sum(axis=(1, 2, 3)).argmin()) for p in picked]
    assert nearest[:5] == [1, 4, 7, 10, 13] and len(nearest) == 6 and nearest[5] in (15, 16)
    assert len(pairs(load_config(PrepConfig, DSR / "prep.yaml", [*model, "max_clip_s=60"]))) == 1


def test_the_stage_gets_its_videos_model_and_sampling_options(tmp_path, monkeypatch):
    cfg = DemoConfig(
        out=str(tmp_path / "out"),
        families=["cogvideo", "dsr"],
        sample=SampleSettings(families={"dsr": ["seed=9"]}),
    )
    demo = Demo(cfg)
    rows = plan_videos(2, seed=1, size=32, duration_s=(1.0,))
    captions = demo.path("videos", "captions.jsonl")
    captions.parent.mkdir(parents=True)
    real = {"path": "real/x.mp4", "caption": "a clip"}
    captions.write_text(
        "".join(json.dumps({**r, "path": f"synthetic/{r['path']}"}) + "\n" for r in [*rows, real])
    )
    steps = FamilySteps(demo, "dsr")
    assert steps.videos() == {"videos": 2, "scale": 3}
    written = [
        json.loads(line) for line in demo.path("dsr", "videos", "captions.jsonl").read_text().splitlines()
    ]
    assert [w["path"] for w in written] == [f"synthetic/{r['path']}" for r in rows]  # synthetic only
    frames, _ = read_video(demo.path("dsr", "videos", written[1]["path"]))
    rendered = render_row(rows[1], 3)  # the 3x rendering, through lossless H.264 (RGB <-> YUV rounding)
    assert frames.shape == rendered.shape and np.abs(frames.astype(int) - rendered).max() <= 1

    prepared, trained, sampled = [], [], []
    monkeypatch.setattr(demo, "prepare", lambda *a, **k: prepared.append((a, k)) or {"written": 1})
    monkeypatch.setattr(demo, "train_model", lambda *a: trained.append(a) or {})
    monkeypatch.setattr(
        demo,
        "sample_prompts",
        lambda folder, options, pipeline, settled=None: sampled.append((folder, options, settled)) or {},
    )
    steps.shards()
    assert prepared[0][1] == {"videos": demo.path("dsr", "videos")}
    steps.train("train")
    assert f"init.backbone={demo.path('models', 'backbone')}" in trained[0][1]
    hierarchy = demo.path("samples", f"d{cfg.sample.durations[0]:g}_seed{cfg.sample.seeds[0]}")
    hierarchy.mkdir(parents=True)
    resolved = {"dtype": "bf16", "attention_precision": "fp32"}  # what `auto` resolved them to
    (hierarchy / "options.json").write_text(json.dumps(resolved))
    steps.sample()
    folder, options, settled = sampled[0]
    assert settled == resolved  # the low-res videos are re-sampled in the precision they were sampled in
    chosen = options(2.0, 3)
    assert folder == demo.path("dsr", "samples")
    assert chosen.sr_checkpoint == str(demo.path("dsr", "models", "train"))
    assert chosen.stage1_checkpoint == str(demo.path("models", "stage1")) and chosen.duration == 2.0
    strategy = chosen.sr_strategy
    # the posterior mean at T 1 over all codes (README "Measured": +1.2 dB over mbr on the same logits)
    assert (strategy.kind, strategy.temperature, strategy.top_k, strategy.top_p) == ("mean", 1.0, 0, 1.0)
    assert chosen.sr_frames_per_batch == 12
    assert chosen.seed == 9  # sample.families.dsr over the seed the demo gives
    assert chosen.stage1_guidance == demo.sample_options(2.0, 3).stage1_guidance  # the hierarchy's recipe


def test_the_demo_tokenizer_decodes_the_3x_grid():
    """The patch tokenizer as the demo fits it (its context table too) at 12 x 12 codes: 96 px
    frames; the codes of a 3x rendering decode back to it (22 dB here, 64 codes; the demo's 512-code
    tokenizer: 28.4 dB), a code grid laid out wrongly (shifted one patch) far from it."""
    from cogvideo.metrics import psnr
    from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer

    rows = plan_videos(40, seed=2, size=32, duration_s=(1.0,))
    low = fit_patch_tokenizer(
        np.concatenate([render_row(r) for r in rows]), 64, 32, 4, preset="small", seed=0
    )
    high = low.at_grid(12)
    assert (high.frame_size, high.tokens_side, high.patch_size) == (96, 12, low.patch_size)
    assert len(low.context[0]) and all(np.array_equal(a, b) for a, b in zip(high.context, low.context))
    reference = np.concatenate([render_row(r, 3) for r in rows[:4]])
    codes = high.encode(reference)
    decoded = high.decode(codes)
    assert decoded.shape == reference.shape and decoded.dtype == np.uint8
    assert psnr(reference, decoded) > 20.0
    assert psnr(reference, high.decode(np.roll(codes, 1, axis=2))) < 18.0
