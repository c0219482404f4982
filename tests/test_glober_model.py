"""GLOBER's parts against hand-computed values and their defining properties: the KL term, the
CRA pair sets and labels and its losses, the decoder's independence across frames (a subset of
indices decodes to those frames of a full decode), the encoder's sense of keyframe order, the
TP plan's reach, and the KL-VAE imported from a diffusers folder."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from cogvideo.family import build_model, model_from_record, model_record, plain_model, resolve_model_section
from cogvideo.models.glober import losses
from cogvideo.models.glober.blocks import TemporalAttention
from cogvideo.models.glober.cra import adversarial_loss, cra_pairs
from cogvideo.models.glober.model import TP_PLAN
from cogvideo.models.glober.sampler import GloberSampler, GloberSampling, frame_indices
from cogvideo.models.glober.vae import decode_latents, encode_moments, vae_folder_problem

F64_ATOL = 1e-10  # float64: batch-size-dependent reduction order moves results by ~1e-15; a leak by >= 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**fields):
    return resolve_model_section({"family": "glober", "preset": "glober-tiny", **fields})


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initialisation (zero convolutions and adaLN-Zero included),
    so that each input reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---- KL term --------------------------------------------------------------------------------
def test_the_kl_term_is_eq_2_on_hand_computed_values(monkeypatch):
    """KL = 1/2 sum(mean^2 + std^2 - log std^2 - 1) per video (Eq. 2), averaged over videos."""
    mean, logvar = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, math.log(4.0), math.log(0.25)])
    by_hand = 0.5 * ((1 + 1 - 0 - 1) + (4 + 4 - math.log(4) - 1) + (0.25 + 0.25 - math.log(0.25) - 1))
    cfg = tiny()
    model = build_model(cfg, device="cpu")
    c, g = cfg.encoder.out_channels, cfg.global_size
    params = torch.zeros(2, 2 * c, g, g)  # two videos: the three values, everything else 0 mean, log var 0
    params[:, 0, 0, :3], params[:, c, 0, :3] = mean, logvar
    monkeypatch.setattr(
        model.autoencoder.encoder, "forward", lambda keyframes: DiagonalGaussianDistribution(params)
    )
    batch = _batch(cfg, 2)
    decoded = losses.decode_pass(
        cfg, model.autoencoder, batch["keyframes"], batch["frames"], batch["indices"]
    )
    assert decoded.kl.item() == pytest.approx(by_hand, rel=1e-6)


def test_the_encoders_posterior_is_a_diagonal_gaussian_over_the_global_feature_shape():
    cfg = tiny()
    model = build_model(cfg, device="cpu")
    posterior = model.autoencoder.encoder(_batch(cfg, 3)["keyframes"])
    assert posterior.mean.shape == (3, *cfg.global_shape)
    kl = 0.5 * (posterior.mean**2 + posterior.var - posterior.logvar - 1).flatten(1).sum(1)
    assert torch.allclose(posterior.kl(), kl)


# ---- CRA ------------------------------------------------------------------------------------
def _frames(value: float, batch: int) -> torch.Tensor:
    """[B, 2, 3, 2, 2] whose every pixel names (source value, video, frame): value + 10 b + f."""
    out = torch.empty(batch, 2, 3, 2, 2)
    for b in range(batch):
        for f in range(2):
            out[b, f] = value + 10 * b + f
    return out


def _named(pairs: torch.Tensor, batch: int) -> list[list[tuple[str, ...]]]:
    def name(frame: torch.Tensor) -> str:
        v = int(frame.flatten()[0])
        return f"{'x' if v < 100 else 'xbar'}_{'ij'[v % 10]}"

    kinds = pairs.unflatten(0, (-1, batch))
    return [[(name(p[0]), name(p[1])) for p in kind] for kind in kinds]


def test_the_cra_pair_sets_and_labels_are_the_papers():
    """Eq. 10: the discriminator's real <x_i, x_j> against five fakes (one or both frames
    generated, or the order reversed); the generator's three pairs with a generated frame, as real."""
    batch = 2
    real, fake = _frames(0, batch), _frames(100, batch)
    pairs, labels = cra_pairs(real, fake, for_discriminator=True)
    expected = [
        ("x_i", "x_j"),
        ("x_i", "xbar_j"),
        ("xbar_i", "x_j"),
        ("xbar_i", "xbar_j"),
        ("x_j", "x_i"),
        ("xbar_j", "xbar_i"),
    ]
    assert _named(pairs, batch) == [[e] * batch for e in expected]
    assert labels.tolist() == [1.0] * batch + [0.0] * (5 * batch)
    pairs, labels = cra_pairs(real, fake, for_discriminator=False)
    expected = [("xbar_i", "xbar_j"), ("x_i", "xbar_j"), ("xbar_i", "x_j")]
    assert _named(pairs, batch) == [[e] * batch for e in expected]
    assert labels.tolist() == [1.0] * (3 * batch)
    # every video's pair comes from that video: pixel values carry the video number
    assert all(int(p.flatten()[0]) % 100 // 10 == i % batch for i, p in enumerate(pairs[:, 0]))


def test_the_adversarial_losses_on_hand_computed_values():
    logits, labels = torch.tensor([2.0, -1.0, 0.5, 3.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    nll = [-math.log(1 / (1 + math.exp(-2.0))), -math.log(1 / (1 + math.exp(1.0)))]
    nll += [-math.log(1 - 1 / (1 + math.exp(-0.5))), -math.log(1 - 1 / (1 + math.exp(-3.0)))]
    # two pair kinds of two videos: each kind's mean over videos, summed over kinds
    assert adversarial_loss(logits, labels, 2, "bce").item() == pytest.approx(sum(nll) / 2, rel=1e-6)
    hinge = (max(0, 1 - 2.0) + max(0, 1 + 1.0) + max(0, 1 + 0.5) + max(0, 1 + 3.0)) / 4
    assert adversarial_loss(logits, labels, 2, "hinge").item() == pytest.approx(hinge, rel=1e-6)


def test_the_discriminator_reads_the_slot_order_and_the_indices():
    cfg = tiny()
    model = perturbed(build_model(cfg, device="cpu"))
    frames = torch.rand(1, 2, 3, cfg.frame_size, cfg.frame_size) * 2 - 1
    indices = torch.tensor([[0.25, 0.75]])
    d = model.discriminator
    with torch.no_grad():
        forward, swapped = d(frames, indices), d(frames.flip(1), indices)
        later = d(frames, torch.tensor([[0.5, 1.0]]))
    assert not torch.allclose(forward, swapped) and not torch.allclose(forward, later)


def test_without_the_cra_term_the_autoencoder_loss_is_the_rec_and_kl_terms_alone(monkeypatch):
    """cra_weight 0 (with discriminator_steps 0): the loss is L_rec + kl_weight L_kl of the same
    draws as with the CRA term, and neither the pixels nor the discriminator are computed."""
    cfg = tiny()
    model, batch = perturbed(build_model(cfg, device="cpu")), _batch(cfg, 3)
    torch.manual_seed(5)
    full = losses.autoencoder_loss(cfg, model.autoencoder, model.discriminator, batch)
    without = cfg.replace(cra_weight=0.0, discriminator_steps=0).validate()
    monkeypatch.setattr(losses, "decode_latents", lambda *a: pytest.fail("decoded to pixels"))
    monkeypatch.setattr(model.discriminator, "forward", lambda *a: pytest.fail("ran the discriminator"))
    torch.manual_seed(5)
    alone = losses.autoencoder_loss(without, model.autoencoder, model.discriminator, batch)
    assert torch.equal(alone["rec"], full["rec"]) and torch.equal(alone["kl"], full["kl"])
    assert torch.equal(alone["loss"], full["rec"] + cfg.kl_weight * full["kl"])
    assert not torch.equal(alone["loss"], full["loss"])  # the CRA term was there before
    for steps, weight in ((0, 0.1), (1, 0.0), (-1, 0.0)):
        with pytest.raises(ValueError, match="model.discriminator_steps: .* 0 exactly when cra_weight is 0"):
            cfg.replace(cra_weight=weight, discriminator_steps=steps).validate()


def _autoencoder_grads(cfg, model, batch, **frozen) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = losses.autoencoder_loss(cfg, model.autoencoder, model.discriminator, batch, **frozen)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.autoencoder.named_parameters() if p.requires_grad}


def test_a_frozen_encoder_takes_zero_gradients_of_the_same_loss():
    """encoder_frozen: the same loss value and the same decoder gradients as unfrozen, and every
    encoder parameter a gradient of exact zeros (there, so one optimizer over the auto-encoder
    keeps Adam's moments at zero), the KL term's included (a planted gradient through the KL
    alone, or the feature alone, fails); unfrozen the encoder's gradients are not all zero."""
    cfg = tiny(cra_weight=0.0, discriminator_steps=0, kl_weight=1.0)  # a KL gradient to see
    model, batch = perturbed(build_model(cfg, device="cpu")), _batch(cfg, 3)
    loss, grads = _autoencoder_grads(cfg, model, batch)
    frozen_loss, frozen_grads = _autoencoder_grads(cfg, model, batch, encoder_frozen=True)
    assert torch.equal(frozen_loss, loss)
    encoder = {n for n in grads if n.startswith("encoder.")}
    assert encoder and any(grads[n].abs().max() > 0 for n in encoder)
    for name, grad in frozen_grads.items():
        if name in encoder:
            assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), name
        else:
            assert torch.equal(grad, grads[name]), name


def test_the_autoencoder_part_freezes_the_encoder_by_its_engines_steps():
    """The auto-encoder part's loss reads its engine's optimizer steps (`global_steps`, which its
    checkpoint restores): steps below model.encoder_frozen_steps leave the encoder's gradients
    zero, the first step at it trains the encoder (a planted off-by-one fails one side)."""
    from types import SimpleNamespace

    from cogvideo.models.glober.family import optimized_parts

    cfg = tiny(cra_weight=0.0, discriminator_steps=0, encoder_frozen_steps=3)
    model, batch = perturbed(build_model(cfg, device="cpu")), _batch(cfg, 2)
    part = optimized_parts(cfg)[0]
    encoder_grad = {}
    for steps in (2, 3):
        engines = {
            "autoencoder": SimpleNamespace(module=model.autoencoder, global_steps=steps),
            "discriminator": SimpleNamespace(module=model.discriminator),
        }
        model.zero_grad(set_to_none=True)
        part.loss(cfg, engines, SimpleNamespace(tensors=batch), torch.device("cpu")).backward()
        encoder_grad[steps] = max(p.grad.abs().max() for p in model.autoencoder.encoder.parameters())
    assert part.name == "autoencoder" and encoder_grad[2] == 0 and encoder_grad[3] > 0
    with pytest.raises(ValueError, match="model.encoder_frozen_steps"):
        tiny(encoder_frozen_steps=-1)


# ---- decoding any frame ---------------------------------------------------------------------
def _batch(cfg, b: int) -> dict:
    c, size = cfg.vae.latent_channels, cfg.latent_size
    g = torch.Generator().manual_seed(b)
    return {
        "keyframes": torch.randn(b, cfg.encoder.num_keyframes, c, size, size, generator=g),
        "frames": torch.randn(b, 2, c, size, size, generator=g),
        "indices": torch.tensor([[0.0, 0.5]] * b),
    }


@pytest.fixture(scope="module")
def decoder_model():
    torch.manual_seed(0)
    return perturbed(build_model(tiny(phase="generator"), device="cpu")).double()


def test_a_subset_of_indices_decodes_to_those_frames_of_a_full_decode(decoder_model, monkeypatch):
    cfg = decoder_model.cfg
    options = GloberSampling(frame_steps=2, frame_guidance=2.5, frame_batch=3)
    g = torch.Generator().manual_seed(1)
    global_feature = torch.randn(1, *cfg.global_shape, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 5, *cfg.latent_shape, generator=g, dtype=torch.float64)
    indices = frame_indices(5)
    full = GloberSampler(decoder_model, options).frames(global_feature, indices, noise)
    pick = [3, 1]  # out of order, decoded one frame per batch
    one_at_a_time = GloberSampler(decoder_model, dataclasses.replace(options, frame_batch=1))
    subset = one_at_a_time.frames(global_feature, indices[pick], noise[:, pick])
    assert torch.allclose(subset, full[:, pick], rtol=0, atol=F64_ATOL)
    # the index matters: one noise for every frame still gives a different frame per index
    same_noise = noise[:, :1].expand_as(noise).contiguous()
    frames = GloberSampler(decoder_model, options).frames(global_feature, indices, same_noise)
    assert (frames[:, 1:] - frames[:, :1]).abs().amax() > 1e-3
    # planted: a decoder that mixes the frames of its batch fails the comparison
    decoder = decoder_model.autoencoder.decoder
    honest = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda x, *a: honest(x, *a) + 0.1 * x.mean(0, keepdim=True))
    leaky = GloberSampler(decoder_model, options).frames(global_feature, indices, noise)
    leaky_subset = one_at_a_time.frames(global_feature, indices[pick], noise[:, pick])
    assert not torch.allclose(leaky_subset, leaky[:, pick], rtol=0, atol=1e-3)


def test_sampling_is_deterministic_given_the_noise(decoder_model):
    cfg = decoder_model.cfg
    options = GloberSampling(global_steps=2, frame_steps=2, global_guidance=4.0, frame_guidance=2.0)
    sampler = GloberSampler(decoder_model, options)
    text = torch.full((2, cfg.text_length), cfg.vocab.pad_id)
    text[:, -3:] = torch.tensor([cfg.vocab.text_id(7), cfg.vocab.text_id(9), cfg.vocab.text_id(4)])
    uncond = torch.full_like(text, cfg.vocab.pad_id)
    uncond[:, -1] = cfg.vocab.text_id(1)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, *cfg.global_shape, generator=g, dtype=torch.float64)
    frame_noise = torch.randn(2, 2, *cfg.latent_shape, generator=g, dtype=torch.float64)
    runs = []
    for _ in range(2):
        v = sampler.global_features(text, uncond, noise)
        runs.append(sampler.pixels(sampler.frames(v, frame_indices(2), frame_noise)))
    assert torch.equal(runs[0], runs[1])
    other = sampler.global_features(text, uncond, noise + 0.5)
    assert not torch.allclose(other, sampler.global_features(text, uncond, noise))


def test_the_dits_output_ignores_padding_and_reads_the_caption(decoder_model):
    cfg, dit = decoder_model.cfg, decoder_model.dit
    x = torch.randn(1, *cfg.global_shape, dtype=torch.float64)
    t = torch.tensor([500])
    text = torch.full((1, cfg.text_length), cfg.vocab.pad_id)
    text[0, -2:] = torch.tensor([cfg.vocab.text_id(3), cfg.vocab.text_id(8)])
    with torch.no_grad():
        base = dit(x, t, text)
        pad_row = dit.text_embeddings.weight[cfg.vocab.pad_piece_id].clone()
        dit.text_embeddings.weight[cfg.vocab.pad_piece_id] += 1.0  # pads are masked: no effect
        assert torch.allclose(dit(x, t, text), base, rtol=0, atol=F64_ATOL)
        dit.text_embeddings.weight[cfg.vocab.pad_piece_id] = pad_row
        other = text.clone()
        other[0, -1] = cfg.vocab.text_id(9)
        assert not torch.allclose(dit(x, t, other), base, atol=1e-6)


# ---- the video encoder ----------------------------------------------------------------------
def test_the_encoder_tells_keyframe_order_by_its_slot_positions():
    cfg = tiny(encoder={"num_keyframes": 3})
    encoder = perturbed(build_model(cfg, device="cpu")).autoencoder.encoder.double()
    keyframes = torch.randn(1, 3, *cfg.latent_shape, dtype=torch.float64)
    reordered = keyframes[:, [2, 0, 1]]
    with torch.no_grad():
        assert not torch.allclose(encoder(keyframes).mean, encoder(reordered).mean, atol=1e-6)
        for module in encoder.modules():  # without slot positions attention is blind to order
            if hasattr(module, "positions"):
                module.positions.zero_()
        assert torch.allclose(encoder(keyframes).mean, encoder(reordered).mean, rtol=0, atol=F64_ATOL)


def test_the_encoder_tells_a_video_from_its_reverse_from_its_initialisation():
    """Direction lives only in the keyframes' order. From the family's own initialisation,
    reversing them must move the global feature at least a fifth as far as another video does:
    slot positions drawn at init_std (0.02) moved it 1/30 as far, and the trained demo encoder
    kept that blindness (a video and its reverse 0.6 % apart; direction at 4 s 31 %)."""
    cfg = tiny(encoder={"num_keyframes": 3})
    torch.manual_seed(0)
    encoder = build_model(cfg, device="cpu").autoencoder.encoder.double()
    keyframes = torch.randn(1, 3, *cfg.latent_shape, dtype=torch.float64)
    with torch.no_grad():
        base = encoder(keyframes).mean
        reversed_change = (encoder(keyframes.flip(1)).mean - base).norm()
        other_change = (encoder(torch.randn_like(keyframes)).mean - base).norm()
    assert reversed_change > other_change / 5


def order_effect(**encoder_options) -> tuple[float, float]:
    """How far a reversal of 3 random keyframes moves the encoder's global feature, and how far
    another video does, with the slot positions removed and every temporal attention weighing
    all frames alike (queries and keys zeroed): what is left to tell order is the input layer."""
    cfg = tiny(encoder={"num_keyframes": 3, **encoder_options})
    torch.manual_seed(0)
    encoder = build_model(cfg, device="cpu").autoencoder.encoder.double()
    keyframes = torch.randn(1, 3, *cfg.latent_shape, dtype=torch.float64)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, TemporalAttention):
                module.positions.zero_()
                for layer in (module.attention.to_q, module.attention.to_k):
                    layer.weight.zero_()
                    layer.bias.zero_()
        base = encoder(keyframes).mean
        reversed_change = (encoder(keyframes.flip(1)).mean - base).norm().item()
        other_change = (encoder(torch.randn_like(keyframes)).mean - base).norm().item()
    return reversed_change, other_change


def test_the_encoders_input_positions_mark_order_without_the_attention():
    """The temporal attention's slot positions reach the e_v slot only through its weights and
    values, a pooling a trained encoder can (and the demo's did) make nearly order-blind.
    `encoder.input_positions` tags each frame's features from the input layer on: with the slot
    positions removed and every temporal attention weighing all frames alike (queries and keys
    zeroed), a reversal must still move the global feature at least a tenth as far as another
    video (the family's initialisation gives 0.16-0.54 over seeds 0-5); without them the encoder
    is then exactly blind to order (the planted removal)."""
    reversed_change, other_change = order_effect(input_positions=True)
    assert reversed_change > other_change / 10
    reversed_change, other_change = order_effect(input_positions=False)
    assert reversed_change < F64_ATOL * other_change


def test_the_temporal_input_convolution_reads_each_slots_neighbours_by_offset():
    """`encoder.temporal_kernel: 3` (the released code's 3D convolutions): the input layer's
    features of slot s are bias + sum over dt of a 2D convolution of slot s + dt - 1 with the
    kernel's slice dt, zero beyond the first and last slots (hand-computed per slot in float64;
    a planted reversal of the slots fails)."""
    cfg = tiny(encoder={"num_keyframes": 3, "temporal_kernel": 3})
    encoder = build_model(cfg, device="cpu").autoencoder.encoder.double()
    conv = encoder.conv_in
    x = torch.randn(2, 4, *cfg.latent_shape, dtype=torch.float64)  # [e_v, 3 keyframes]
    expected = torch.stack(
        [
            conv.bias[:, None, None]
            + sum(
                torch.nn.functional.conv2d(x[:, s + dt - 1], conv.weight[:, :, dt], padding=1)
                for dt in range(3)
                if 0 <= s + dt - 1 < 4
            )
            for s in range(4)
        ],
        dim=1,
    )
    with torch.no_grad():
        assert torch.allclose(encoder.input_features(x), expected, rtol=0, atol=F64_ATOL)
        assert not torch.allclose(encoder.input_features(x.flip(1)).flip(1), expected, atol=1e-3)


def test_the_temporal_input_convolution_marks_order_without_the_attention():
    """With the slot positions removed and every temporal attention weighing all frames alike, a
    3D input convolution still tells a video from its reverse (at least a tenth as far as another
    video; the 2D one exactly not, as the input-positions test shows)."""
    reversed_change, other_change = order_effect(temporal_kernel=3)
    assert reversed_change > other_change / 10


def test_the_temporal_output_convolution_reads_e_v_and_the_first_keyframe_by_offset():
    """`encoder.output_temporal_kernel: 3` (the released code's 3D output module, run before its
    split): e_v's moments are the output module's rest applied to bias + a 2D convolution of e_v's
    slot with the kernel's middle slice + one of the first keyframe's slot with its last slice
    (zero before e_v; hand-computed in float64). Later slots do not reach it; the first
    keyframe's slot does (a planted read of the last slot, or of e_v alone, fails)."""
    cfg = tiny(encoder={"num_keyframes": 3, "output_temporal_kernel": 3})
    encoder = build_model(cfg, device="cpu").autoencoder.encoder.double()
    conv = encoder.conv_out[0]
    ch = cfg.encoder.channels * cfg.encoder.channel_mult[-1]
    h = torch.randn(2, 4, ch, cfg.global_size, cfg.global_size, dtype=torch.float64)
    first = conv.bias[:, None, None] + sum(
        torch.nn.functional.conv2d(h[:, s], conv.weight[:, :, s + 1], padding=1) for s in (0, 1)
    )
    later = h.clone()
    later[:, 2:] = torch.randn_like(later[:, 2:])
    changed = h.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    with torch.no_grad():
        expected = encoder.conv_out[1:](first)
        assert torch.allclose(encoder.output(h), expected, rtol=0, atol=F64_ATOL)
        assert torch.allclose(encoder.output(later), expected, rtol=0, atol=F64_ATOL)
        assert not torch.allclose(encoder.output(changed), expected, atol=1e-3)


def test_the_temporal_output_convolution_marks_order_without_the_attention():
    """With the slot positions removed and every temporal attention weighing all frames alike, the
    3D output convolution alone (a 2D input layer) tells a video from its reverse at least a tenth
    as far as another video (0 with the 2D output module: the input-positions test's planted case)."""
    reversed_change, other_change = order_effect(output_temporal_kernel=3)
    assert reversed_change > other_change / 10


@pytest.mark.parametrize(
    "key, conv", [("temporal_kernel", "conv_in"), ("output_temporal_kernel", "conv_out.0")]
)
def test_a_record_without_the_temporal_kernel_loads_2d(key, conv):
    """A record written before `encoder.temporal_kernel` / `output_temporal_kernel` (the field
    absent) loads with the 2D convolution its weights have; the field round-trips through the record."""
    demo = resolve_model_section({"family": "glober", "preset": "glober-demo", "encoder": {key: 3}})
    weight = f"autoencoder.encoder.{conv}.weight"
    assert plain_model(model_from_record(model_record(demo))).get_parameter(weight).dim() == 5
    old_record = model_record(demo)
    del old_record["encoder"][key]
    old = model_from_record(old_record)
    assert getattr(old.encoder, key) == 1
    assert plain_model(old).get_parameter(weight).dim() == 4


@pytest.mark.parametrize("key", ["temporal_kernel", "output_temporal_kernel"])
def test_a_temporal_kernel_must_be_odd_and_positive(key):
    for bad in (0, 2):
        with pytest.raises(ValueError, match=f"encoder.{key}"):
            tiny(encoder={key: bad})


def test_input_positions_are_a_parameter_only_when_switched_on():
    """A checkpoint written before the switch (its record has no such field, its state no such
    parameter) loads with it off."""

    def names(cfg):
        return {n for n, _ in plain_model(cfg).named_parameters()}

    assert names(tiny(encoder={"input_positions": True})) - names(tiny()) == {
        "autoencoder.encoder.input_positions"
    }
    with_positions = resolve_model_section(
        {"family": "glober", "preset": "glober-demo", "encoder": {"input_positions": True}}
    )
    old_record = model_record(with_positions)
    del old_record["encoder"]["input_positions"]
    old = model_from_record(old_record)
    assert not old.encoder.input_positions and "autoencoder.encoder.input_positions" not in names(old)


def test_the_posterior_starts_at_the_configured_log_variance():
    """encoder.init_logvar is the log-variance half of the output head's bias (diffusers'
    DiagonalGaussianDistribution reads mean, then log-variance): with the head's weights zeroed
    the initial posterior's std is exp(init_logvar / 2) and its mean 0, whatever the keyframes."""
    cfg = tiny(encoder={"init_logvar": -6.0})
    encoder = build_model(cfg, device="cpu").autoencoder.encoder
    with torch.no_grad():
        encoder.conv_out[-1].weight.zero_()
        posterior = encoder(torch.randn(2, cfg.encoder.num_keyframes, *cfg.latent_shape))
    assert torch.equal(posterior.mean, torch.zeros_like(posterior.mean))
    assert torch.allclose(posterior.std, torch.full_like(posterior.std, math.exp(-3.0)), rtol=1e-6, atol=0)


# ---- TP plan --------------------------------------------------------------------------------
def test_the_tp_plan_splits_the_dit_and_nothing_else():
    model = build_model(tiny(phase="generator"), device="cpu")
    split = {name for name, _ in model.named_parameters() if TP_PLAN.rule(name) is not None}
    per_block = {"attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"}
    expected = {"dit.text_embeddings.weight"} | {
        f"dit.blocks.{i}.{m}.{p}"
        for i in range(model.cfg.dit.depth)
        for m in per_block
        for p in ("weight", "bias")
        if not (p == "bias" and m in ("attention.proj", "mlp.fc2"))  # row-parallel biases stay whole
    }
    assert split == expected


def test_tensor_parallel_needs_the_dits_widths_to_split():
    with pytest.raises(ValueError, match="model.dit.num_heads: 3 is not divisible by tensor_parallel=2"):
        tiny(phase="generator", dit={"num_heads": 3, "hidden_size": 33}).validate(tensor_parallel=2)
    tiny(phase="generator", dit={"num_heads": 4}).validate(tensor_parallel=2)


# ---- the KL-VAE from a diffusers folder ------------------------------------------------------
def test_an_imported_vae_decodes_what_diffusers_decodes_from_the_same_file(tmp_path):
    cfg = tiny()
    torch.manual_seed(5)
    AutoencoderKL(**cfg.vae.diffusers_config()).save_pretrained(tmp_path / "vae")
    imported = build_model(tiny(vae={"path": str(tmp_path / "vae")}), device="cpu").autoencoder.vae
    assert not any(p.requires_grad for p in imported.parameters())
    reference = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert all(torch.equal(t, reference.state_dict()[n]) for n, t in imported.state_dict().items())
    # in float64: float32 matrix products may round differently by the weights' memory alignment
    imported, reference = imported.double(), reference.double()
    z = torch.randn(2, *cfg.latent_shape, dtype=torch.float64)
    pixels = torch.rand(2, 3, cfg.frame_size, cfg.frame_size, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        expected = reference.decode(z / cfg.vae.scaling_factor).sample
        assert torch.allclose(decode_latents(imported, z), expected, rtol=0, atol=F64_ATOL)
        moments = reference.encode(pixels).latent_dist.parameters
        assert torch.allclose(encode_moments(imported, pixels), moments, rtol=0, atol=F64_ATOL)
        random = build_model(cfg, device="cpu").autoencoder.vae.double()  # not read from the folder
        assert not torch.allclose(decode_latents(random, z), expected, atol=1e-3)


def test_a_vae_folder_of_another_shape_is_named(tmp_path):
    cfg = tiny()
    other = dict(cfg.vae.diffusers_config(), latent_channels=3)
    AutoencoderKL(**other).save_pretrained(tmp_path / "vae")
    problem = vae_folder_problem(dataclasses.replace(cfg.vae, path=str(tmp_path / "vae")))
    assert problem == (
        f"model.vae.path: {tmp_path / 'vae' / 'config.json'} has latent_channels=3, the model config 4"
    )
    assert "has no config.json" in vae_folder_problem(dataclasses.replace(cfg.vae, path=str(tmp_path)))
