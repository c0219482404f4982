"""Fitting a KL-VAE on frames (cogvideo.models.glober.vae_fit, `cogvideo-fit-vae`): the fit
reconstructs frames it never saw better than the unfitted VAE; the latent rescaling is exact (the
same reconstructions, latents x scale) and gives the preset's scaling_factor unit-variance
latents; the command's folder is one that GLOBER's model and latent prep load."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from cogvideo.family import build_model, resolve_model_section
from cogvideo.metrics import psnr
from cogvideo.models.glober import vae_fit
from cogvideo.models.glober.vae import vae_folder_problem
from cogvideo.models.glober.vae_fit import fit_vae, fold_latent_scale, latent_std, round_trip

F64_ATOL = 1e-10  # float64 sums of a few hundred terms: ~1e-14; a missed factor moves them by >= 1e-2
FIT = dict(steps=30, batch_size=8, lr=1e-2)  # glober-tiny's VAE (16 px, 8 channels): ~1 CPU s


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """Small ops: one thread (more only spin on a busy machine); module-wide, the fit included."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny():
    return resolve_model_section({"family": "glober", "preset": "glober-tiny"})


def square_frames(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [count, size, size, 3]: a flat square of a random colour on a grey background."""
    rng = np.random.default_rng(seed)
    frames = np.full((count, size, size, 3), 96, np.uint8)
    for frame in frames:
        side = int(rng.integers(4, 9))
        y, x = rng.integers(0, size - side, 2)
        frame[y : y + side, x : x + side] = rng.integers(0, 256, 3)
    return frames


@pytest.fixture(scope="module")
def fitted():
    frames = square_frames(96)
    return {"train": frames[:80], "held": frames[80:], "vae": fit_vae(frames[:80], tiny().vae, **FIT)}


def folded_changes(fold, scale: float = 3.7) -> tuple[float, float, float]:
    """How far `fold(vae, scale)` moves, in float64: the posterior mean from scale x, the
    log-variance from + 2 ln(scale), and the decoding of the scaled latents from the old decoding."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny().vae.diffusers_config()).double().eval()
    pixels = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        before = vae.encode(pixels).latent_dist
        decoded = vae.decode(before.mean).sample
        fold(vae, scale)
        after = vae.encode(pixels).latent_dist
        return (
            (after.mean - scale * before.mean).abs().max().item(),
            (after.logvar - before.logvar - 2 * math.log(scale)).abs().max().item(),
            (vae.decode(scale * before.mean).sample - decoded).abs().max().item(),
        )


def test_folding_the_scale_rescales_the_latents_and_keeps_the_reconstructions():
    assert max(folded_changes(fold_latent_scale)) < F64_ATOL

    def without_logvar_shift(vae, scale):  # planted: the posterior's spread left as it was
        fold_latent_scale(vae, scale)
        vae.quant_conv.bias[vae.config.latent_channels :] -= 2 * math.log(scale)

    def without_decoder_side(vae, scale):  # planted: the decoder reads the scaled latents as before
        fold_latent_scale(vae, scale)
        vae.post_quant_conv.weight *= scale

    assert folded_changes(without_logvar_shift)[1] > 1
    assert folded_changes(without_decoder_side)[2] > 1e-2


def test_the_fit_reconstructs_frames_it_never_saw_better_than_the_unfitted_vae(fitted):
    torch.manual_seed(0)
    unfitted = AutoencoderKL(**tiny().vae.diffusers_config()).eval()
    before = psnr(fitted["held"], round_trip(unfitted, fitted["held"]))
    after = psnr(fitted["held"], round_trip(fitted["vae"], fitted["held"]))
    assert after > before + 3, (before, after)  # half the squared error, or less (measured: 12.3 -> 17.6 dB)
    assert not fitted["vae"].training and not any(p.requires_grad for p in fitted["vae"].parameters())


def test_a_fit_that_never_steps_fails_that_comparison(fitted, monkeypatch):
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)  # planted
    torch.manual_seed(0)
    still = fit_vae(fitted["train"], tiny().vae, **{**FIT, "steps": 2})
    torch.manual_seed(0)
    unfitted = AutoencoderKL(**tiny().vae.diffusers_config()).eval()
    assert (
        psnr(fitted["held"], round_trip(still, fitted["held"]))
        < psnr(fitted["held"], round_trip(unfitted, fitted["held"])) + 3
    )


def test_the_fitted_latents_have_unit_variance_under_the_scaling_factor(fitted):
    cfg = tiny().vae
    assert abs(latent_std(fitted["vae"], fitted["train"]) * cfg.scaling_factor - 1) < 1e-4
    # held-out frames of the same world: the same spread, within sampling error
    assert abs(latent_std(fitted["vae"], fitted["held"]) * cfg.scaling_factor - 1) < 0.3


def test_the_command_writes_a_folder_the_model_and_latent_prep_load(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(square_frames(24, seed=1)):
        Image.fromarray(frame).save(frames / f"{i:03d}.png")
    out = tmp_path / "vae"
    vae_fit.main(["preset=glober-tiny", f"frames={frames}", f"out={out}", "steps=4", "batch_size=4"])
    printed = capsys.readouterr().out
    assert (
        "on 22 frames" in printed
        and "held-out PSNR" in printed
        and "on 2 frames" in printed
        and str(out) in printed
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_frames"], summary["held_out_frames"]) == (22, 2)
    assert f"held-out PSNR {summary['held_out_psnr_db']:.2f} dB" in printed
    cfg = tiny()
    with_folder = dataclasses.replace(cfg.vae, path=str(out))
    assert vae_folder_problem(with_folder) is None  # what cogvideo-prep's latents encoder checks
    loaded = build_model(tiny().__class__(**{**vars(cfg), "vae": with_folder}), device="cpu").autoencoder.vae
    reference = AutoencoderKL.from_pretrained(out, use_safetensors=True)
    assert all(torch.equal(t, reference.state_dict()[n]) for n, t in loaded.state_dict().items())


def test_a_preset_of_another_family_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        vae_fit.main(["preset=small", f"frames={tmp_path}", f"out={tmp_path / 'vae'}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "preset: 'small' is not a GLOBER preset" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_scale_and_train_psnr_are_measured_on_a_seeded_subset_of_distinct_frames():
    frames = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)
    picked = vae_fit.subset(frames, 4, seed=3)
    values = picked[:, 0, 0, 0].tolist()
    assert len(set(values)) == 4 and values == sorted(values)  # distinct frames, in their order
    assert np.array_equal(picked, vae_fit.subset(frames, 4, seed=3))  # the seed decides
    assert not np.array_equal(picked, vae_fit.subset(frames, 4, seed=4))
    assert vae_fit.subset(frames, 10) is frames and vae_fit.subset(frames, 99) is frames
