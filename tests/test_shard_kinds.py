"""Shard kinds: each family's samples round-trip through the one schema (cogvideo/shards.py),
a family reading another family's shards stops in one line naming both, and data preparation
writes what the model's family reads (data_prep/encoders.py) through the Ray job."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import webdataset as wds
from ray_prep import prep_on_ray
from test_model_family import FAMILY as MASKED_FAMILY

from cogvideo import family_spec
from cogvideo.family import ModelFamily
from cogvideo.models.cogvideo.config import ModelConfig, get_preset
from cogvideo.shards import ClipMeta, ShardFormatError, decode_sample, encode_sample
from data_prep import synthetic as syn
from pretrain.config import DataConfig
from pretrain.data import DataError, ShardLoader, check_shard_kind

RNG = np.random.default_rng(0)


def meta(kind: str, frames: int = 3) -> ClipMeta:
    return ClipMeta(1.0, 2.0, 1, "v.mp4", 0.0, 1.0, frames, kind=kind)


@pytest.mark.parametrize(
    "kind, arrays",
    [
        ("tokens", {"frames": RNG.integers(0, 40000, (3, 4, 4))}),
        ("tokens", {"frames": RNG.integers(0, 9, (3, 2, 2)), "sr_frames": RNG.integers(0, 9, (3, 6, 6))}),
        ("latents", {"latents": RNG.standard_normal((3, 4, 2, 2)).astype(np.float16)}),
        ("frames", {"pixels": RNG.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)}),
    ],
)
def test_every_kind_round_trips_with_its_dtypes(kind, arrays):
    sample = decode_sample(encode_sample("k", arrays, "a red circle", meta(kind)))
    assert sample.meta.kind == kind and set(sample.arrays) == set(arrays)
    for name, array in arrays.items():
        assert np.array_equal(sample.arrays[name], array)
        codes = np.issubdtype(array.dtype, np.integer) and kind == "tokens"
        assert sample.arrays[name].dtype == (np.int64 if codes else array.dtype)  # pixels stay uint8


def test_arrays_that_do_not_fit_the_kind_are_refused_by_name():
    with pytest.raises(ShardFormatError, match="a latents sample needs arrays \\['latents'\\]"):
        encode_sample("k", {"frames": np.zeros((3, 2, 2), np.int64)}, "c", meta("latents"))
    with pytest.raises(ShardFormatError, match="pixels must be uint8"):
        encode_sample("k", {"pixels": np.zeros((3, 8, 8, 3), np.float32)}, "c", meta("frames"))
    with pytest.raises(ShardFormatError, match="unknown sample kind 'voxels'"):
        encode_sample("k", {}, "c", meta("voxels"))
    fields = encode_sample("k", {"pixels": np.zeros((3, 8, 8, 3), np.uint8)}, "c", meta("frames"))
    del fields["pixels.npy"]
    with pytest.raises(ShardFormatError, match="missing field pixels.npy"):
        decode_sample(fields)


def test_shards_written_before_kinds_read_as_tokens():
    """Schema 1 recorded no kind: its meta.json has no `kind` and its codes are frames.npy."""
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.int16).reshape(3, 2, 2))
    old_meta = {k: v for k, v in vars(meta("tokens")).items() if k != "kind"} | {"schema": 1}
    raw = {
        "__key__": "k",
        "frames.npy": buf.getvalue(),
        "caption.txt": b"c",
        "meta.json": json.dumps(old_meta),
    }
    sample = decode_sample(raw)
    assert sample.meta.kind == "tokens" and sample.arrays["frames"].dtype == np.int64


@dataclass
class PixelToyConfig(ModelConfig):
    name: str = "pixel-toy"


def pixel_example(cfg, sample, text_ids, seed):
    return {"pixels": torch.from_numpy(sample.arrays["pixels"]).permute(0, 3, 1, 2).float() / 255}


@pytest.fixture
def pixel_family(monkeypatch):
    """A family that reads raw frames (registered for the test only; the toy masked family's
    model and plan stand in: only the data path is under test)."""
    family = ModelFamily(
        name="pixel-toy",
        config=PixelToyConfig,
        presets={"pixel-toy": lambda: PixelToyConfig(frame_size=16, num_frames=5)},
        build_model=MASKED_FAMILY.build_model,
        init_weights=MASKED_FAMILY.init_weights,
        tp_plan=MASKED_FAMILY.tp_plan,
        loss=MASKED_FAMILY.loss,
        example=pixel_example,
        train_flops=MASKED_FAMILY.train_flops,
        shard_kind="frames",
        prep_encoder="frames",
    )
    monkeypatch.setitem(family_spec.REGISTRY, family.name, family)
    return family


def write_shard(path, kind_arrays: dict, kind: str, count: int = 4) -> str:
    with wds.TarWriter(str(path)) as sink:
        for i in range(count):
            sink.write(encode_sample(f"s{i}", kind_arrays, f"clip {i}", meta(kind, frames=5)))
    return str(path)


def test_a_family_reading_another_kind_stops_in_one_line_naming_both(tmp_path, pixel_family):
    pixels = write_shard(tmp_path / "pixels.tar", {"pixels": np.zeros((5, 16, 16, 3), np.uint8)}, "frames")
    tokens = write_shard(tmp_path / "tokens.tar", {"frames": np.zeros((5, 4, 4), np.int64)}, "tokens")
    cogvideo = get_preset("tiny")
    message = f"{pixels}: holds frames samples, but model.family=cogvideo reads tokens shards"
    with pytest.raises(DataError, match=message):
        check_shard_kind([pixels], cogvideo)
    loader = ShardLoader([pixels], cogvideo, lambda t: [], DataConfig(stage=1), micro_batch_size=2, seed=0)
    with pytest.raises(DataError, match="model.family=cogvideo reads tokens"):
        next(iter(loader))
    with pytest.raises(DataError, match="model.family=pixel-toy reads frames shards"):
        check_shard_kind([tokens], pixel_family.preset("pixel-toy"))
    check_shard_kind([pixels], pixel_family.preset("pixel-toy"))  # the right kind passes


def test_the_loader_stacks_the_familys_examples(tmp_path, pixel_family):
    frames = RNG.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    shard = write_shard(tmp_path / "pixels.tar", {"pixels": frames}, "frames")
    cfg = pixel_family.preset("pixel-toy")
    encode = lambda t: [cfg.vocab.text_id(1)]  # noqa: E731  (text is not under test)
    data = DataConfig(stage=1, shuffle_buffer=0)
    batch = next(iter(ShardLoader([shard], cfg, encode, data, micro_batch_size=2, seed=0)))
    assert set(batch.tensors) == {"pixels"} and batch.tensors["pixels"].shape == (2, 5, 3, 16, 16)
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(batch.tensors["pixels"][0], expected) and batch.keys == ["s0", "s1"]


@pytest.mark.slow
def test_prep_writes_what_the_models_family_reads(tmp_path, pixel_family):
    """cogvideo-prep model.family=pixel-toy: raw-frame shards (no image tokenizer involved) whose
    pixels are the frames the token job would have tokenized, and which the family's loader reads."""
    rows = syn.plan_videos(2, seed=1, size=16, fps=8, duration_s=(2.0,))
    captions = syn.write_videos(tmp_path / "videos", rows)
    summary, shards, samples = prep_on_ray(
        tmp_path, captions, "model.family=pixel-toy", "model.preset=pixel-toy"
    )
    assert summary["samples"] == len(samples) > 0
    for sample in samples:
        assert sample.meta.kind == "frames" and sample.arrays["pixels"].shape == (5, 16, 16, 3)
    reference = {r["path"]: syn.render_row(r) for r in rows}
    # every stored frame is one of its video's rendered frames (lossless synthetic mp4s, to rounding)
    for sample in samples:
        truth = reference[os.path.basename(sample.meta.source)].astype(int)
        for frame in sample.arrays["pixels"].astype(int):
            assert np.abs(truth - frame).max(axis=(1, 2, 3)).min() <= 8
    check_shard_kind(shards, pixel_family.preset("pixel-toy"))
