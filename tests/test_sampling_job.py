"""The batch job (local and Ray) with a fake pipeline, prompt files, outputs, bad input."""

import json
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from process_helpers import sleeping_process, write_lock

from cogvideo.configio import to_dict
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.hierarchy import row_generator
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.pipeline import VideoPipeline
from cogvideo.raystart import start_ray
from cogvideo.runlock import LockHeld
from cogvideo.sampling import cli
from cogvideo.sampling.job import run_job
from cogvideo.sampling.prompts import PromptError, TextBudgetError, TextEncoder, read_prompts
from cogvideo.text_format import TextFormat
from cogvideo.video_io import read_video

CFG = get_preset("tiny")


class WordTokenizer:
    """One text id per word."""

    def encode(self, text):
        return [CFG.vocab.text_id(sum(map(ord, w)) % CFG.vocab.num_text_tokens) for w in text.split()]


class FakePipeline:
    """Random codes from the prompt's own generator; frames paint each code as a grey level.
    Logs every sampled key so a test can see what a rerun redid."""

    def __init__(self, options, log_path):
        self.options, self.log_path = options, Path(log_path)
        self.encode = TextEncoder(WordTokenizer(), CFG)

    def check(self, prompt):
        self.encode(TextFormat().text(prompt.text + self.options.video_suffix, self.options.duration))
        return []

    def sample(self, prompts):
        if any("boom" in p.text for p in prompts):
            raise RuntimeError("the model exploded")
        with self.log_path.open("a") as f:
            f.writelines(p.key + "\n" for p in prompts)
        out = []
        for p in prompts:
            gen = row_generator(self.options.seed, p.text, "fake")
            codes = torch.randint(0, 64, (5, 4, 4), generator=gen).numpy()
            frames = np.repeat(np.repeat(codes * 4, 4, 1), 4, 2)[..., None].repeat(3, -1).astype(np.uint8)
            out.append((codes, frames))
        return out

    def fps(self):
        return 1.0


PROMPTS = [
    "a cat plays",
    "boom goes the model",
    "one two three four five six seven eight",
    "a dog runs",
    "rain on a lake",
]


def write_prompts(tmp_path, lines=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(["# comment", *lines, ""]), encoding="utf-8")
    return read_prompts(path).prompts


def check_outputs(out, prompts, options):
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["prompts"], manifest["ok"], manifest["failed"]) == (5, 3, 2)
    status = {e["key"]: e for e in manifest["entries"]}
    assert "RuntimeError: the model exploded" in status[prompts[1].key]["error"]
    assert "text budget" in status[prompts[2].key]["error"]
    for p in (prompts[0], prompts[3], prompts[4]):
        entry = out / p.key
        codes = np.load(entry / "codes.npy")
        assert read_video(entry / "video.mp4")[0].shape == (5, 16, 16, 3)
        assert Image.open(entry / "video.gif").n_frames == 5
        expected = torch.randint(
            0, 64, (5, 4, 4), generator=row_generator(options.seed, p.text, "fake")
        ).numpy()
        assert np.array_equal(codes, expected)
    assert Image.open(out / "contact_sheet.png").height == 3 * 96  # 16 px frames enlarged 6 x
    assert json.loads((out / "options.json").read_text()) == to_dict(options)
    return manifest


def test_local_job_records_failures_and_resumes(tmp_path):
    prompts = write_prompts(tmp_path)
    out, log = tmp_path / "out", tmp_path / "sampled.log"
    options = SampleOptions(batch_size=2, seed=5)
    run_job(prompts, out, options, lambda o: FakePipeline(o, log))
    check_outputs(out, prompts, options)
    assert sorted(log.read_text().split()) == sorted(prompts[i].key for i in (0, 3, 4))

    log.unlink()
    run_job(prompts, out, options, lambda o: FakePipeline(o, log))  # only failures are retried
    assert not log.exists()
    with pytest.raises(ValueError, match="other options .*seed"):
        run_job(prompts, out, SampleOptions(seed=6), lambda o: FakePipeline(o, log))


class BlockedPipeline(FakePipeline):
    """Holds its first batch until `go` is set (the job is running while a second one starts)."""

    def __init__(self, options, log_path, started, go):
        super().__init__(options, log_path)
        self.started, self.go = started, go

    def sample(self, prompts):
        self.started.set()
        assert self.go.wait(60)
        return super().sample(prompts)


@pytest.mark.parametrize("locked", [True, False])
def test_a_second_job_on_a_running_jobs_out_is_refused_and_nothing_is_sampled_twice(
    tmp_path, monkeypatch, locked
):
    """Two jobs on one --out (the second started while the first samples): the second is refused
    in one line naming the holder, the first ends whole and releases the lock. Without the lock
    (planted) the second samples every prompt the first is sampling, and the first then again."""
    if not locked:
        monkeypatch.setattr("cogvideo.sampling.job.RunLock.acquire", lambda self: None)
    prompts = write_prompts(tmp_path)
    out, log = tmp_path / "out", tmp_path / "sampled.log"
    options = SampleOptions(batch_size=2, seed=5)
    started, go, ended = threading.Event(), threading.Event(), []
    first = threading.Thread(
        target=lambda: ended.append(
            run_job(prompts, out, options, lambda o: BlockedPipeline(o, log, started, go))
        )
    )
    first.start()
    try:
        assert started.wait(60)
        if locked:
            with pytest.raises(LockHeld, match=rf"^--out {out}: a live run holds it .*pid {os.getpid()},"):
                run_job(prompts, out, options, lambda o: FakePipeline(o, log))
        else:
            run_job(prompts, out, options, lambda o: FakePipeline(o, log))
    finally:
        go.set()
        first.join(60)
    assert ended[0] == check_outputs(out, prompts, options)  # the first job ended whole
    sampled = log.read_text().split()
    assert (sorted(sampled) == sorted(prompts[i].key for i in (0, 3, 4))) == locked
    assert not (out / "LOCK").exists()


class DtypePipeline(FakePipeline):
    """Also logs the precision it samples in (and its attention's), one line per batch."""

    def sample(self, prompts):
        with self.log_path.with_suffix(".dtype").open("a") as f:
            f.write(f"{self.options.dtype}/{self.options.attention_precision}\n")
        return super().sample(prompts)


@pytest.mark.parametrize("settled", [True, False])
def test_auto_precision_is_resolved_once_per_job_and_kept_on_resume(tmp_path, monkeypatch, settled):
    """`dtype: auto` and `attention_precision: auto` are resolved once, before any pipeline loads:
    every batch samples in that choice and options.json records it; a resumed run keeps it without
    probing again, even where a new probe would choose otherwise (a loaded machine), so a seed
    gives one video. Planted: the job passing `auto` on to each pipeline (which then timed its
    own choice) fails."""
    if not settled:
        monkeypatch.setattr("cogvideo.sampling.job.settle_precision", lambda out, options, precision: options)
    prompts = write_prompts(tmp_path)
    out, log = tmp_path / "out", tmp_path / "sampled.log"
    options = SampleOptions(batch_size=2, seed=5)
    choices, probed = iter([("bf16", True), ("fp32", False)]), []

    def precision(asked):
        probed.append(asked.dtype)
        chosen, upcast = next(choices)
        setting = "fp32" if upcast else "same"
        return SimpleNamespace(
            precision=chosen, attention_setting=setting, describe=lambda: f"{chosen} (timed)"
        )

    run_job(prompts, out, options, lambda o: DtypePipeline(o, log), precision)
    first = log.with_suffix(".dtype").read_text().split()
    (out / prompts[3].key / "record.json").unlink()  # as if killed mid-way
    run_job(prompts, out, options, lambda o: DtypePipeline(o, log), precision)
    dtypes = log.with_suffix(".dtype").read_text().split()
    assert len(dtypes) > len(first) >= 3  # every batch, then the resumed run's
    assert (set(dtypes) == {"bf16/fp32"}) == settled
    recorded = json.loads((out / "options.json").read_text())
    assert ((recorded["dtype"], recorded["attention_precision"]) == ("bf16", "fp32")) == settled
    assert (probed == ["auto"]) == settled


@pytest.mark.slow
def test_ray_job_matches_the_local_one_and_resumes(tmp_path):
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    prompts = write_prompts(tmp_path)
    out, log = tmp_path / "out", tmp_path / "sampled.log"
    options = SampleOptions(batch_size=2, seed=5, workers=2)
    start_ray(num_cpus=2, log_to_driver=False)
    try:
        run_job(prompts, out, options, lambda o: FakePipeline(o, log), use_ray=True)
        manifest = check_outputs(out, prompts, options)  # same codes as the local run's reference
        assert all(e["worker"].startswith("actor-") for e in manifest["entries"] if e["status"] == "ok")
        assert sorted(log.read_text().split()) == sorted(prompts[i].key for i in (0, 3, 4))
        (out / prompts[3].key / "record.json").unlink()  # as if killed mid-way
        log.unlink()
        run_job(prompts, out, options, lambda o: FakePipeline(o, log), use_ray=True)
        assert log.read_text().split() == [prompts[3].key]
        check_outputs(out, prompts, options)
    finally:
        ray.shutdown()


def test_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(PromptError, match="empty.txt: no prompts"):
        read_prompts(empty)
    with pytest.raises(PromptError, match="not found: .*nope.txt"):
        read_prompts(tmp_path / "nope.txt")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "first_frame": "cat.png"}\n{"prompt": "a dog"}\n{"text": 1}\n')
    with pytest.raises(PromptError, match="p.jsonl:3: expected a JSON object with a 'prompt'"):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "a cat", "first_frame": "cat.png"}\n{"prompt": "a cat"}\n')
    with pytest.raises(PromptError, match="p.jsonl:2: duplicate of line 1"):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "a cat", "first_frame": "cat.png"}\n{"prompt": "a cat", "key": "cat2"}\n')
    first, second = read_prompts(jsonl).prompts
    assert first.first_frame == "cat.png" and second.key == "cat2"
    reordered = tmp_path / "r.txt"
    reordered.write_text("a dog\na cat\n")
    assert read_prompts(reordered).prompts[1].key == first.key  # keys survive edits of the file
    jsonl.write_text('{"prompt": "a cat", "key": "../up"}\n')
    with pytest.raises(PromptError, match="key '../up' is not a plain folder name"):
        read_prompts(jsonl)


def test_text_budget_is_refused_not_truncated():
    encode = TextEncoder(WordTokenizer(), CFG)
    ids = encode("a b c")
    assert ids.tolist() == [CFG.vocab.pad_id] * 5 + WordTokenizer().encode("a b c")
    with pytest.raises(TextBudgetError, match="9 text tokens; the model's text budget .* is 8"):
        encode("a b c d e f g h i")


def test_cli_bad_input_names_the_file(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("")
    assert cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "p.txt: no prompts" in capsys.readouterr().err
    prompts.write_text("a cat\n")
    missing = tmp_path / "ckpt" / "stage1"
    assert (
        cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "o"), f"stage1_checkpoint={missing}"])
        == 2
    )
    assert f"stage1_checkpoint: {missing} does not exist" in capsys.readouterr().err
    assert cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "o"), "stage1_guidance=high"]) == 2
    assert "stage1_guidance: expected a number" in capsys.readouterr().err


def test_cli_names_every_bad_option_at_once(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "o"), "stage1_checkpoint=nope"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "cogvideo-sample: text_tokenizer: required (e.g. text_tokenizer=PATH)",
        "cogvideo-sample: image_tokenizer: required (e.g. image_tokenizer=PATH)",
        "cogvideo-sample: stage1_checkpoint: nope does not exist",
        "cogvideo-sample: interpolation_levels=3 needs stage2_checkpoint: give one, or set interpolation_levels=0 "
        "to stop at the keyframes",
        lines[4],
    ]  # the release's cluster strategy without a table: said, never silently replaced
    assert lines[4].startswith(
        "cogvideo-sample: cluster_table: frame0_strategy, stage1_strategy, stage2_strategy "
        "use the release's cluster strategy"
    )
    assert not (tmp_path / "o").exists()  # nothing started


def _fake_files(tmp_path):
    for name in ("stage1", "text.model", "image.safetensors"):
        (tmp_path / name).write_text("")
    return [
        f"stage1_checkpoint={tmp_path / 'stage1'}",
        f"text_tokenizer={tmp_path / 'text.model'}",
        f"image_tokenizer={tmp_path / 'image.safetensors'}",
        "interpolation_levels=0",
        "frame0_strategy.kind=topk",
        "stage1_strategy.kind=topk",
    ]


def fake_pipeline(monkeypatch, log_path):
    """cogvideo-sample's pipeline replaced by FakePipeline, `auto` resolved to fp32 without a model."""
    monkeypatch.setattr(VideoPipeline, "load", lambda options: FakePipeline(options, log_path))
    choice = SimpleNamespace(precision="fp32", attention_setting="same", describe=lambda: "fp32 (test)")
    monkeypatch.setattr(VideoPipeline, "precision", lambda options: choice)


def test_cli_prints_each_failure_and_fails_when_any_prompt_failed(tmp_path, capsys, caplog, monkeypatch):
    fake_pipeline(monkeypatch, tmp_path / "log")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:3] + ["  "] + PROMPTS[3:]))  # a 6-line file with a blank line
    with caplog.at_level("INFO", logger="cogvideo.sampling.job"):
        assert (
            cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "o"), *_fake_files(tmp_path)]) == 1
        )
    out = capsys.readouterr().out
    assert "3 of 5 prompts sampled, 2 failed; 1 blank line(s) skipped (line 4)" in out
    assert "boom_goes_the_model_06f82209: failed: RuntimeError: the model exploded" in out
    assert "text budget" in out.split("one_two_three")[1]  # each failure's reason, not only in record.json
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert [m.split("]")[0] for m in progress] == [f"[{i}/5" for i in range(1, 6)]
    (tmp_path / "boom.txt").write_text("boom goes the model\n")
    assert (
        cli.main(
            ["--prompts", str(tmp_path / "boom.txt"), "--out", str(tmp_path / "b"), *_fake_files(tmp_path)]
        )
        == 1
    )
    assert "0 of 1 prompts sampled, 1 failed" in capsys.readouterr().out
    (tmp_path / "cat.txt").write_text("a cat plays\n")
    assert (
        cli.main(
            ["--prompts", str(tmp_path / "cat.txt"), "--out", str(tmp_path / "c"), *_fake_files(tmp_path)]
        )
        == 0
    )
    assert "1 of 1 prompts sampled, 0 failed\n" in capsys.readouterr().out


def test_cli_on_an_out_a_live_job_holds_is_one_line_and_a_stale_lock_is_taken_over(
    tmp_path, capsys, monkeypatch
):
    fake_pipeline(monkeypatch, tmp_path / "log")
    (tmp_path / "cat.txt").write_text("a cat plays\n")
    argv = ["--prompts", str(tmp_path / "cat.txt"), "--out", str(tmp_path / "o"), *_fake_files(tmp_path)]
    with sleeping_process(60) as pid:
        write_lock(tmp_path / "o", pid=pid, slurm_job_id=None)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"cogvideo-sample: --out {tmp_path / 'o'}: a live run holds it"
        )
        assert f"pid {pid}," in err[0] and not (tmp_path / "log").exists()
    assert cli.main(argv) == 0  # the holder is gone: its lock is taken over, then released
    assert (tmp_path / "log").read_text().split() and not (tmp_path / "o" / "LOCK").exists()


def test_contact_sheet_enlarges_frames_wraps_labels_and_draws_cjk(tmp_path, caplog):
    from cogvideo.sampling import outputs

    rows = []
    for i, label in enumerate(
        [
            "a red ball rolls slowly to the left across a wide green meadow at dusk",
            "一个红色的圆球在绿色的草地上慢慢地向左滚动",
            "????????????????????",
        ]
    ):
        frames = np.full((9, 16, 16, 3), 60 * i, dtype=np.uint8)
        outputs.write_sheet_row(tmp_path / f"row{i}.png", frames)
        rows.append((label, tmp_path / f"row{i}.png"))
    with caplog.at_level("WARNING", logger="cogvideo.sampling.outputs"):
        outputs.write_contact_sheet(tmp_path / "sheet.png", rows)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("L"))
    width = outputs.LABEL_WIDTH
    assert sheet.shape[1] == width + 9 * 96 and sheet.shape[0] >= 3 * 96  # 16 px frames drawn 6 x larger
    labels = sheet[:, :width] < 128  # ink of the label column
    assert not labels[:, width - outputs.LABEL_MARGIN :].any()  # nothing cut at the column's edge
    first_rows = np.flatnonzero(labels[:96].any(1))
    assert first_rows.max() - first_rows.min() > 2 * outputs.LABEL_FONT_SIZE  # the long English label wraps
    if outputs.LabelFont().cjk is not None:
        assert not np.array_equal(labels[96:192], labels[192:288])  # CJK glyphs, not "?" marks
    else:
        assert "no CJK font installed" in caplog.text  # the fallback is said
