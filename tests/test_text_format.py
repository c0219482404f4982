"""The text format has one owner: training composes with it, the checkpoint records it, and
the sampler reads it back, so a model trained on another template samples with that template."""

import json

import pytest
import torch

from cogvideo.checkpoint import CheckpointError, load_text_format, save_model_checkpoint
from cogvideo.checkpoint.training import train_config_text_format
from cogvideo.configio import ConfigError, save_yaml
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.pipeline import VideoPipeline
from cogvideo.sampling.prompts import Prompt
from cogvideo.sampling.strategies import StrategyOptions
from cogvideo.text_format import TextFormat
from cogvideo.tokenizers.patch_vq import PatchVQTokenizer
from cogvideo.tokenizers.text import train_text_tokenizer
from pretrain.config import check_config, load_train_config

CUSTOM = TextFormat(prefix_template="[{duration:.0f}s] {caption}", uncond_text="clip", uncond_prefix=True)


def test_the_release_format_is_the_default():
    # THUDM/CogVideo cogvideo_pipeline.py: str(float(duration)) + "秒", <n>, the text; the
    # guidance text keeps the prefix: "{duration}秒<n>视频"
    fmt = TextFormat()
    for duration in (4.0, 2.0, 1.0, 0.5):
        assert fmt.text("一只猫", duration) == str(float(duration)) + "秒" + "<n>" + "一只猫"
        assert fmt.uncond(duration) == str(float(duration)) + "秒<n>视频"
    assert fmt.text("一只猫 高清摄影", None) == "一只猫 高清摄影"  # frame 0: no prefix
    assert TextFormat(uncond_prefix=False).uncond(4.0) == "视频"


def test_training_config_records_the_format_the_converter_reads(tmp_path):
    cfg = load_train_config(
        None,
        [
            "data.prefix_template='[{duration:.0f}s] {caption}'",
            "data.uncond_text=clip",
            "data.shards=['x.tar']",
            "data.text_tokenizer=t.model",
        ],
    )
    assert cfg.data.text_format() == CUSTOM
    save_yaml(cfg, tmp_path / "train_config.yaml")  # what every training checkpoint holds
    assert train_config_text_format(tmp_path) == CUSTOM
    bad = load_train_config(None, ["data.prefix_template='{duration}秒<n>'", "data.shards=['x.tar']"])
    with pytest.raises(ConfigError, match="data.prefix_template '{duration}秒<n>': needs {caption}"):
        check_config(bad, world_size=1)


def test_checkpoints_carry_the_format_and_old_ones_read_as_the_release(tmp_path):
    cfg = get_preset("tiny")
    path = save_model_checkpoint(tmp_path / "m", build_model(cfg).state_dict(), cfg, text_format=CUSTOM)
    assert load_text_format(path) == CUSTOM
    info = json.loads((path / "config.json").read_text())
    del info["text_format"]  # written before the field existed (or imported from SAT)
    (path / "config.json").write_text(json.dumps(info))
    assert load_text_format(path) == TextFormat()
    info["text_format"] = {"prefix_template": "{caption}", "fps": 8}
    (path / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="text_format: unknown text format keys \\['fps'\\]"):
        load_text_format(path)


def test_a_model_trained_on_another_template_samples_with_it(tmp_path):
    captions = ["[4s] a cat plays", "[2s] a dog runs", "clip", "a cat plays 视频 高清摄影"] * 3
    text_model = train_text_tokenizer(
        captions, tmp_path / "text", vocab_size=80, byte_fallback=False, preset="tiny"
    )
    paths = {}
    for preset, fmt in (("tiny", CUSTOM), ("tiny-stage2", TextFormat())):
        cfg = get_preset(preset).replace(text_length=24, image_position_offset=24, max_position_embeddings=40)
        paths[preset] = save_model_checkpoint(
            tmp_path / preset, build_model(cfg).state_dict(), cfg, text_format=fmt
        )
    PatchVQTokenizer(torch.rand(64, 48) * 255, frame_size=16, tokens_side=4, preset="tiny").save(
        tmp_path / "image.safetensors"
    )
    options = SampleOptions(
        stage1_checkpoint=str(paths["tiny"]),
        stage2_checkpoint=str(paths["tiny-stage2"]),
        text_tokenizer=str(text_model),
        image_tokenizer=str(tmp_path / "image.safetensors"),
        interpolation_levels=1,
        frame0_suffix="",
        video_suffix="",
        **{f"{s}_strategy": StrategyOptions(temperature=0) for s in ("frame0", "stage1", "stage2")},
    )
    options.stage2_guidance = 3.0
    pipeline = VideoPipeline.load(options)
    fed = []
    encode = pipeline.sampler.encode
    pipeline.sampler.encode = lambda text: fed.append(text) or encode(text)
    pipeline.sample([Prompt("cat", "a cat plays")])
    # stage 1 with its trained template and guidance text; stage 2 (trained on the release's) with its own
    assert "[4s] a cat plays" in fed and "[4s] clip" in fed
    assert "2.0秒<n>a cat plays" in fed and "2.0秒<n>视频" in fed
    assert not any(text.startswith("4.0秒") for text in fed)
