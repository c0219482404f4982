"""Latent shards for GLOBER: data preparation's latents encoder (the model's KL-VAE, a diffusers
folder, on the Ray actors) writes each frame's posterior moments, which are diffusers' encoding of
those frames; GLOBER's loader reads them, and a family of another kind stops in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from ray_prep import prep_on_ray

from cogvideo.configio import ConfigError
from cogvideo.family import any_preset, resolve_model_section
from cogvideo.models.cogvideo.config import get_preset
from data_prep import synthetic as syn
from data_prep.config import PrepConfig
from data_prep.encoders import LatentEncoder, encoder_for
from pretrain.data import DataError, check_shard_kind


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    cfg = any_preset("glober-tiny")
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(**cfg.vae.diffusers_config()).save_pretrained(folder)
    return str(folder)


def prep_config(vae: str) -> PrepConfig:
    return PrepConfig(model={"family": "glober", "preset": "glober-tiny", "vae": {"path": vae}})


def test_the_latents_encoder_is_diffusers_encoding_of_each_frame(vae_folder):
    cfg = prep_config(vae_folder)
    assert encoder_for(cfg) is LatentEncoder
    model = resolve_model_section(cfg.model)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    moments = LatentEncoder(cfg, model)(pixels)["latents"]
    assert moments.shape == (2, 5, 8, 8, 8) and moments.dtype == np.float32
    reference = AutoencoderKL.from_pretrained(vae_folder).eval()
    x = torch.from_numpy(pixels).flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.parameters.unflatten(0, (2, 5))
    assert torch.allclose(torch.from_numpy(moments), expected, rtol=0, atol=1e-5)


def test_the_latents_encoder_needs_the_models_vae_folder(vae_folder, tmp_path):
    with pytest.raises(ConfigError, match="prep.model.vae.path: latent shards need the model's KL-VAE"):
        LatentEncoder.settle(PrepConfig(model={"family": "glober", "preset": "glober-tiny"}))
    other = any_preset("glober-tiny").vae.diffusers_config() | {"latent_channels": 3}
    AutoencoderKL(**other).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="latent_channels=3, the model config 4"):
        LatentEncoder.settle(prep_config(str(tmp_path / "other")))
    LatentEncoder.settle(prep_config(vae_folder))


@pytest.mark.slow
def test_prep_writes_latent_shards_on_ray_that_glober_reads(tmp_path, vae_folder):
    rows = syn.plan_videos(2, seed=1, size=16, fps=8, duration_s=(2.0,))
    captions = syn.write_videos(tmp_path / "videos", rows)
    summary, shards, samples = prep_on_ray(
        tmp_path, captions, "model.family=glober", "model.preset=glober-tiny", f"model.vae.path={vae_folder}"
    )
    assert summary["samples"] == len(samples) > 0
    assert all(s.meta.kind == "latents" and s.arrays["latents"].shape == (5, 8, 8, 8) for s in samples)
    check_shard_kind(shards, any_preset("glober-tiny"))
    with pytest.raises(
        DataError, match="holds latents samples, but model.family=cogvideo reads tokens shards"
    ):
        check_shard_kind(shards, get_preset("tiny"))
