"""GLOBER's plain model, its initialisation and its TP plan.

Parameter names (by phase):

    autoencoder.vae.*             diffusers AutoencoderKL, frozen (weights: model.vae.path or a fit)
    autoencoder.encoder.*         the video encoder (trains in phase autoencoder)
    autoencoder.decoder.unet.*    diffusers UNet2DConditionModel (model.decoder.unet_path to start from)
    autoencoder.decoder.projector.*, .guidance.*    global-feature tokens, the additional modules
    discriminator.*               the CRA discriminator (phase autoencoder: the second optimised part)
    dit.*                         the DiT (phase generator; the auto-encoder is frozen there and
                                  comes from phase autoencoder's checkpoint: `from_autoencoder`)

The TP plan splits the DiT only (module-name suffixes that no diffusers layer here carries).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cogvideo import parallel
from cogvideo.models.glober.config import GloberConfig
from cogvideo.models.glober.cra import PairDiscriminator
from cogvideo.models.glober.decoder import VideoDecoder
from cogvideo.models.glober.dit import GlobalDiT, init_dit
from cogvideo.models.glober.encoder import LOGVAR_BIAS, VideoEncoder
from cogvideo.models.glober.pretrained import load_tensor
from cogvideo.models.glober.vae import build_vae
from cogvideo.tp_plan import Column, Row, TPPlan, Vocab

TP_PLAN = TPPlan(
    {
        "dit.text_embeddings": Vocab(),
        "attention.qkv": Column(stride=3),
        "attention.proj": Row(),
        "mlp.fc1": Column(),
        "mlp.fc2": Row(),
    },
    # phase generator trains the DiT's blocks, phase autoencoder the decoder UNet's
    blocks=("dit.blocks", "autoencoder.decoder.unet.down_blocks", "autoencoder.decoder.unet.up_blocks"),
)


class VideoAutoencoder(nn.Module):
    def __init__(self, cfg: GloberConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = build_vae(cfg.vae)
        self.encoder = VideoEncoder(cfg)
        self.decoder = VideoDecoder(cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always as fitted
        return self


class GloberModel(nn.Module):
    def __init__(self, cfg: GloberConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.autoencoder = VideoAutoencoder(cfg)
        if cfg.phase == "autoencoder":
            self.discriminator = PairDiscriminator(cfg)
        else:
            self.autoencoder.requires_grad_(False)
            self.dit = GlobalDiT(cfg)


def init_weights(cfg: GloberConfig, name: str, tensor: torch.Tensor) -> None:
    """Fill parameter `name` (full shape) in place: from the files the config names (the KL-VAE,
    a starting UNet, phase generator's auto-encoder), else the DiT's own initialisation, else
    PyTorch's default for convolutions and linear layers (uniform within 1 / sqrt(fan_in)) with
    zero biases, ones for norm scales, zero for zero convolutions and normal(init_std) for
    learned embeddings, normal(1) for the video-content embedding, the encoder's input positions
    and its temporal slot positions (at init_std the positions were 1-3 % of the group-normed tokens: the trained demo
    encoder gave a video and its reverse global features 0.6 % apart, and no decoder can tell
    which way such a video moves), and the posterior's log-variance bias at `encoder.init_logvar`."""
    source = _source(cfg, name)
    if source is not None:
        with torch.no_grad():
            tensor.copy_(source)
    elif name.startswith("dit."):
        init_dit(cfg, name.removeprefix("dit."), tensor)
    elif name == f"autoencoder.encoder.{LOGVAR_BIAS}":
        with torch.no_grad():
            tensor.zero_()[cfg.encoder.out_channels :] = cfg.encoder.init_logvar
    elif "zero_conv" in name or name.endswith("bias"):
        nn.init.zeros_(tensor)
    elif name.endswith(("video_content", "slot_embeddings", "positions")):
        nn.init.normal_(tensor, std=1.0 if name.endswith(("video_content", "positions")) else cfg.init_std)
    elif tensor.dim() == 1:
        nn.init.ones_(tensor)
    else:
        bound = 1 / math.sqrt(math.prod(tensor.shape[1:]))
        nn.init.uniform_(tensor, -bound, bound)


def _source(cfg: GloberConfig, name: str) -> torch.Tensor | None:
    """The stored tensor parameter `name` starts from, if the config names a file for it."""
    if cfg.vae.path and name.startswith("autoencoder.vae."):
        return load_tensor(cfg.vae.path, name.removeprefix("autoencoder.vae."), "model.vae.path")
    if cfg.decoder.unet_path and name.startswith("autoencoder.decoder.unet."):
        unet_name = name.removeprefix("autoencoder.decoder.unet.")
        return load_tensor(cfg.decoder.unet_path, unet_name, "model.decoder.unet_path")
    return None


def from_autoencoder(state: dict[str, torch.Tensor], cfg: GloberConfig) -> dict[str, torch.Tensor]:
    """Phase generator's starting state from the finished auto-encoder (training's init.backbone:
    a converted phase-autoencoder checkpoint, this TP rank's view of it): its `autoencoder.*`
    weights as trained (the discriminator stays behind) and the DiT initialised as build_model
    would (each full parameter drawn in the model's order, this rank's TP shard kept)."""
    if cfg.phase != "generator":
        raise ValueError("init.backbone: only model.phase=generator starts from a trained auto-encoder")
    with torch.device("meta"):
        expected = {f"autoencoder.{n}": p.shape for n, p in VideoAutoencoder(cfg).named_parameters()}
        dit = {f"dit.{n}": p.shape for n, p in GlobalDiT(cfg).named_parameters()}
    out = {}
    for name, shape in expected.items():
        if name not in state or state[name].shape != shape:
            found = "missing" if name not in state else f"shaped {list(state[name].shape)}"
            raise ValueError(
                f"init.backbone: {name} is {found}, the model needs {list(shape)}: start phase generator "
                "from the phase autoencoder checkpoint of this same model section"
            )
        out[name] = state[name]
    rank, size = parallel.tp_rank(), parallel.tp_size()
    for name, shape in dit.items():
        full = torch.empty(shape)
        init_weights(cfg, name, full)
        out[name] = TP_PLAN.shard_tensor(name, full, rank, size).clone()
    return out
