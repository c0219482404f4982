"""One command-line convention: every command configured by a dataclass takes `--config FILE.yaml`
plus `key=value` overrides (cogvideo.configio), lists its fields with defaults in `--help`, and
stops a bad key or file with one line and exit status 2 before anything starts."""

from __future__ import annotations

import numpy as np
import pytest

from cluster import plan
from cogvideo.configio import ConfigError, describe_fields
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.glober import vae_fit
from cogvideo.sampling import cli as sample_cli
from cogvideo.tokenizers import patch_fit, text
from cogvideo.tokenizers.patch_fit import fit_patch_tokenizer
from data_prep import pipeline, synthetic
from data_prep.config import PrepConfig
from demo import driver
from pretrain import train
from pretrain.config import TrainConfig

COMMANDS = {  # console script: (main, its dataclass, a field and its default as --help shows them)
    "cogvideo-synth": (synthetic.main, synthetic.SynthConfig, "num_videos = 100"),
    "cogvideo-sample": (sample_cli.main, SampleOptions, "stage1_strategy.top_k = 12"),
    "cogvideo-prep": (pipeline.main, PrepConfig, "shard_samples = 1000"),
    "cogvideo-train": (train.main, TrainConfig, "optim.lr = 0.0002"),
    "cogvideo-train-text-tokenizer": (text.main, text.TextTokenizerConfig, "character_coverage = 1.0"),
    "cogvideo-fit-image-tokenizer": (patch_fit.main, patch_fit.FitImageTokenizerConfig, "codebook_size = 0"),
    "cogvideo-fit-vae": (vae_fit.main, vae_fit.FitVAEConfig, "kl_weight = 1e-06"),
    "python -m demo": (driver.main, driver.DemoConfig, 'preset = "small"'),
    "cogvideo-plan": (plan.main, TrainConfig, "parallel.tensor_parallel = 1"),
}


def exit_code(main, argv: list[str]) -> int:
    """A command's exit status: what it exits with, or returns (console scripts exit with it)."""
    try:
        return main(argv) or 0
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_config_field_with_its_default(name, capsys):
    main, cls, example = COMMANDS[name]
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "--config" in out and "key=value" in out
    assert example in out
    keys = [row.split(" = ")[0].strip() for row in describe_fields(cls)]
    assert len(keys) >= 5 and all(f"  {key} = " in out for key in keys)


def test_field_comments_become_the_help_text():
    rows = {row.split(" = ")[0].strip(): row for row in describe_fields(PrepConfig)}
    assert rows["min_side"].endswith("# pixels; smaller videos are rejected")
    assert "GPUs per tokenizer actor" in rows["tokenizer_gpus"]  # a comment on the lines above the field
    assert "(required)" not in "".join(rows.values())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_unknown_key_is_one_line_and_exit_2(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, _, _ = COMMANDS[name]
    needed = {
        "cogvideo-sample": ["--prompts", "p.txt", "--out", "o"],
        "cogvideo-prep": ["--input", ".", "--out", "o"],
        "cogvideo-plan": ["--gpus", "8"],
    }
    code = exit_code(main, [*needed.get(name, []), "no_such_key=1"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_key" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_synth_bad_values_are_one_line_before_any_video(tmp_path, capsys):
    for bad, message in [
        ("holdout=[red/circle/sideways]", "holdout: 'red/circle/sideways'"),
        ("size=8", "size: synthetic: a 8px frame"),
        ("durations=[]", "durations"),
    ]:
        with pytest.raises(SystemExit) as exit:
            synthetic.main([f"out={tmp_path / 'v'}", bad])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v").exists()


def test_prep_refuses_a_missing_or_misfitted_tokenizer_before_ray_starts(tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(pipeline, "start_ray", no_ray)
    (tmp_path / "v.mp4").write_bytes(b"")
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8)
    fit_patch_tokenizer(frames, 16, 32, 4, preset="small").save(tmp_path / "small.safetensors")
    cases = [
        ([f"tokenizer={tmp_path / 'nowhere.safetensors'}"], "prep.tokenizer: patch tokenizer not found"),
        (
            [f"tokenizer={tmp_path / 'small.safetensors'}", "model.preset=tiny"],
            "encodes 32px frames to 4x4 codes, but the model (tiny) needs 16px and 4x4",
        ),
        (
            [
                f"tokenizer={tmp_path / 'small.safetensors'}",
                "model.vocab={num_image_tokens: 8, "
                "num_text_tokens: 1000, text_offset: 8, vocab_size: 1024, pad_piece_id: 0}",
            ],
            "16 codes, but the model (small) has 8 (model.vocab.num_image_tokens)",
        ),
        ([], "prep.tokenizer: the image tokenizer path is required"),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exit:
            pipeline.main(["--input", str(tmp_path), "--out", str(tmp_path / "out"), *overrides])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def write_without_preset(tokenizer, path):
    """A tokenizer file as written before tokenizer files recorded their preset."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tokenizer.save(path)
    with safe_open(str(path), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "preset"}
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_prep_takes_the_model_preset_from_the_tokenizer(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
    fit_patch_tokenizer(frames, 16, 16, 4, preset="tiny").save(tmp_path / "tiny.safetensors")
    cfg, model = pipeline.settled(PrepConfig(tokenizer=str(tmp_path / "tiny.safetensors")))
    assert cfg.model["preset"] == "tiny" and (model.frame_size, model.frame_tokens) == (16, 4)
    write_without_preset(
        fit_patch_tokenizer(frames, 16, 16, 4, preset="tiny"), tmp_path / "unnamed.safetensors"
    )
    with pytest.raises(
        ConfigError, match="prep.model.preset: required: .*records its preset .*model.preset=NAME"
    ):
        pipeline.settled(PrepConfig(tokenizer=str(tmp_path / "unnamed.safetensors")))


def test_reshard_exits_0_when_it_worked(tmp_path, capsys):
    # console scripts run sys.exit(main()): a returned shard count would be the exit status
    from cogvideo.shards import ClipMeta, encode_sample
    from data_prep import reshard
    from data_prep.output import PrepOutput

    out = PrepOutput(tmp_path, shard_samples=4, shard_bytes=2**20)
    meta = ClipMeta(
        duration=4.0, fps=1.0, stage=1, source="v.mp4", clip_start=0.0, clip_end=4.0, num_frames=5
    )
    for i in range(4):
        out.add_sample(
            encode_sample(f"k{i}", {"frames": np.zeros((5, 4, 4), np.int64)}, "a video", meta),
            {"key": f"k{i}", "source": "v.mp4", "clip": [0, 5], "window": [0, 4], "fps": 1.0, "stage": 1},
        )
    out.commit()
    assert reshard.main([str(tmp_path), "--divisible-by", "2"]) == 0
    assert f"{tmp_path}: 2 shards" in capsys.readouterr().out


def test_every_tokenizer_file_the_project_writes_records_its_preset(tmp_path):
    """The fit needs the preset (the demo's tokenizer step calls it too), a tokenizer without one is
    not written, and the text tokenizer records its own next to its model."""
    import json

    from cogvideo.tokenizers.patch_vq import PatchVQTokenizer
    from cogvideo.tokenizers.text import train_text_tokenizer

    frames = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
    with pytest.raises(TypeError, match="preset"):
        fit_patch_tokenizer(frames, 16, 16, 4)
    unnamed = PatchVQTokenizer(np.zeros((16, 48), np.float32), frame_size=16, tokens_side=4)
    with pytest.raises(ValueError, match="records its model preset"):
        unnamed.save(tmp_path / "unnamed.safetensors")
    assert not (tmp_path / "unnamed.safetensors").exists()
    model = train_text_tokenizer(
        ["a red circle", "a blue square"] * 4, tmp_path / "text", 60, byte_fallback=False, preset="tiny"
    )
    assert json.loads(model.with_suffix(".json").read_text())["preset"] == "tiny"
