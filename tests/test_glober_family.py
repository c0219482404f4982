"""GLOBER registered as a family: Table 11's presets built on the meta device (counts against the
published Stable Diffusion parts and the DiT's block formula), `cogvideo-params`, and the planner
model (activations against autograd's saved tensors of a real CPU step, FLOPs, `cogvideo-plan`)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cogvideo.family import any_preset, family_of, get_family, plain_model, resolve_model_section
from cogvideo.models.glober.flops import meta_batch
from cogvideo.models.glober.losses import autoencoder_loss, generator_loss

SD15_UNET = 859_520_964  # Stable Diffusion 1.x's UNet2DConditionModel (context 768)
SD_VAE = 83_653_863  # Stable Diffusion's AutoencoderKL (kl-f8)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_table_11_presets_are_built_on_the_meta_device():
    cfg = any_preset("glober-ucf101-256")
    assert (cfg.frame_size, cfg.vae.factor, cfg.latent_shape) == (256, 8, (4, 32, 32))
    e, d = cfg.encoder, cfg.decoder
    assert (e.channels, e.channel_mult, e.num_res_blocks, e.head_channels, e.attention_resolutions) == (
        320,
        (1, 2),
        2,
        64,
        (16, 8),
    )
    assert (e.factor, e.out_channels, cfg.global_shape) == (2, 16, (16, 16, 16))
    assert (d.channels, d.channel_mult, d.num_res_blocks, d.num_heads, d.attention_resolutions) == (
        320,
        (1, 2, 4, 4),
        2,
        8,
        (32, 16, 8),
    )
    model = plain_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert count(model.autoencoder.decoder.unet) == SD15_UNET and count(model.autoencoder.vae) == SD_VAE
    taichi = any_preset("glober-taichi-128")
    assert (taichi.frame_size, taichi.vae.factor, taichi.latent_shape) == (128, 4, (3, 32, 32))
    for name, width, depth in (("glober-ucf101-256", 1152, 28), ("glober-sky-256", 1024, 20)):
        dit_cfg = any_preset(f"{name}-dit")
        assert dit_cfg.phase == "generator" and (dit_cfg.dit.hidden_size, dit_cfg.dit.depth) == (width, depth)
        dit = plain_model(dit_cfg).dit
        # adaLN-Zero block: QKV 3h^2+3h, proj h^2+h, MLP 8h^2+5h, modulation 6h^2+6h
        assert count(dit.blocks[0]) == 18 * width**2 + 15 * width
        assert count(dit.text_embeddings) == dit_cfg.vocab.num_text_tokens * width


def test_phase_generator_trains_the_dit_alone():
    model = plain_model(any_preset("glober-demo-dit"))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dit"} and not hasattr(model, "discriminator")
    phase1 = plain_model(any_preset("glober-demo"))
    assert {n.split(".")[0] for n, p in phase1.named_parameters() if p.requires_grad} == {
        "autoencoder",
        "discriminator",
    }
    assert not any(p.requires_grad for p in phase1.autoencoder.vae.parameters())


def test_cogvideo_params_prints_every_glober_preset(capsys):
    from cogvideo.params import main

    main(["glober-ucf101-256", "glober-ucf101-256-dit"])
    lines = capsys.readouterr().out.splitlines()
    phase1, phase2 = lines
    assert phase1.split()[:2] == ["glober-ucf101-256", "glober"] and "UNet 320x640x1280x1280" in phase1
    total = int(phase2.split()[2].replace(",", ""))
    assert total == count(plain_model(any_preset("glober-ucf101-256-dit"))) and "phase generator" in phase2


def _real_saved_bytes(cfg) -> int:
    """Bytes autograd saves for one sample's step on the CPU (flash attention), each storage once."""
    torch.manual_seed(0)
    from cogvideo.family import build_model

    model = build_model(cfg, device="cpu").train()
    batch = {
        k: torch.randn(v.shape) if v.is_floating_point() else torch.full(v.shape, cfg.vocab.pad_id)
        for k, v in meta_batch(cfg).items()
    }
    batch["indices"] = torch.tensor([[0.25, 0.75]])
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if cfg.phase == "generator":
            generator_loss(cfg, model.autoencoder, model.dit, batch)
        else:
            autoencoder_loss(cfg, model.autoencoder, model.discriminator, batch)
    return sum(seen.values())


@pytest.mark.parametrize("phase", ["autoencoder", "generator"])
def test_the_planners_activations_are_what_autograd_saves_on_a_real_step(phase):
    cfg = resolve_model_section({"family": "glober", "preset": "glober-tiny", "phase": phase})
    planner = family_of(cfg).planner
    measured = planner.activation_bytes(cfg, 1, 1, "fp32", False)
    # within 1 KiB: a few index and step tensors share storage differently on the CPU than on meta
    assert abs(measured - _real_saved_bytes(cfg)) < 1024
    assert planner.activation_bytes(cfg, 3, 1, "fp32", False) == 3 * measured
    assert planner.activation_bytes(cfg, 1, 1, "bf16", False) < 0.6 * measured


def test_tensor_parallel_splits_the_dits_activations_and_adds_its_all_reduces():
    planner = get_family("glober").planner
    cfg = any_preset("glober-demo-dit")
    one, two = (planner.activation_bytes(cfg, 1, tp, "bf16", False) for tp in (1, 2))
    layer_one, layer_two = (planner.layer_activation_bytes(cfg, 1, tp, "bf16") for tp in (1, 2))
    assert one / 2 < two < one and layer_two < layer_one
    assert planner.tp_allreduces(cfg, False) == (cfg.dit.depth * 4 + 2, cfg.seq_length * cfg.dit.hidden_size)
    assert planner.tp_allreduces(any_preset("glober-demo"), False) == (0, 0)
    checkpointed = planner.activation_bytes(cfg.replace(activation_checkpointing=True), 1, 1, "bf16", True)
    assert checkpointed < one and planner.recompute_flops(cfg.replace(activation_checkpointing=True)) > 0


def test_train_flops_count_the_dits_forward_and_backward():
    """Phase generator: the frozen encoder's forward plus 3x the DiT's forward; the DiT's matrix
    products by hand: 2 x tokens x (18 h^2 per block) + attention 4 x tokens^2 x h per block."""
    cfg = any_preset("glober-ucf101-256-dit")
    n, h, depth = cfg.seq_length, cfg.dit.hidden_size, cfg.dit.depth
    dit_forward = depth * (2 * n * 12 * h * h + 4 * n * n * h)  # QKV, proj, MLP; QK^T and PV
    total = get_family("glober").train_flops(cfg)
    encoder_only = get_family("glober").train_flops(cfg.replace(dit=cfg.dit.__class__(h, 1, 16, 4))) - (
        3 * (2 * n * 12 * h * h + 4 * n * n * h)
    )
    assert total - encoder_only == pytest.approx(3 * dit_forward, rel=0.02)


def test_cogvideo_plan_plans_phase_generator_under_tensor_parallelism(capsys):
    from cluster.plan import main

    main(
        [
            "--gpus",
            "8",
            "model.family=glober",
            "model.preset=glober-sky-256-dit",
            "parallel.tensor_parallel=2",
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("glober-sky-256-dit (phase generator)") and "TP 2 x DP 4" in out
    assert "tensor-parallel all-reduces" in out and "activations" in out


def test_counting_flops_and_activations_leaves_torchs_generator_alone():
    """The trainer counts FLOPs after restoring a checkpoint's RNG states: counting must not draw."""
    family = get_family("glober")
    cfg = resolve_model_section({"family": "glober", "preset": "glober-tiny", "kl_weight": 2e-6})  # uncached
    before = torch.get_rng_state()
    family.train_flops(cfg)
    family.planner.activation_bytes(cfg, 1, 1, "fp32", False)
    family.planner.recompute_flops(cfg.replace(activation_checkpointing=True))
    assert torch.equal(torch.get_rng_state(), before)
