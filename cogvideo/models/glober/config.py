"""GLOBER's configuration (Sun et al., 2023) and named presets.

One config describes the whole family; `phase` says which part trains:

- `autoencoder`: the video auto-encoder (video encoder + diffusion video decoder, the frozen
  KL-VAE) trained with its CRA discriminator, generator and discriminator alternating;
- `generator`: the DiT fitting the frozen video encoder's global features, conditioned on the
  caption; it starts from the finished auto-encoder (training's `init.backbone`).

Shapes: frames of `frame_size` pixels -> KL-VAE latents [latent_channels, L, L] with
L = frame_size / vae.factor -> keyframe latents [K, C', L, L] -> a global feature
[encoder.out_channels, G, G] with G = L / encoder.factor. Presets `glober-ucf101-256`,
`glober-sky-256` and `glober-taichi-128` are the paper's Table 11; `glober-demo` is the CPU demo's
size, `glober-tiny` the tests'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from cogvideo.diffusion.schedule import NoiseSchedule
from cogvideo.vocab import VocabLayout

PHASES = ("autoencoder", "generator")


@dataclass(frozen=True)
class VAEConfig:
    """diffusers' AutoencoderKL. `path`: a local folder in diffusers' layout (config.json +
    diffusion_pytorch_model.safetensors, e.g. Stable Diffusion's `vae/`), whose config must
    match the fields below; empty: these fields, initialised randomly (then fitted, as the demo does)."""

    path: str = ""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # Stable Diffusion's: latents * this have about unit variance

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_config(self) -> dict:
        n = len(self.block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
        )


@dataclass(frozen=True)
class EncoderConfig:
    """The video encoder: keyframe latents -> the global feature (Table 11's "Video Encoder")."""

    channels: int = 320  # D, after the input convolution
    channel_mult: tuple[int, ...] = (1, 2)  # one downsample per extra level
    num_res_blocks: int = 2
    head_channels: int = 64
    attention_resolutions: tuple[int, ...] = (16, 8)  # feature sizes
    out_channels: int = 16  # C'', the global feature's channels
    num_keyframes: int = 4  # K, at equal intervals (16 frames: 0, 5, 10, 15)
    norm_groups: int = 32
    # a learned embedding per frame slot (e_v, keyframe 1..K) added to the input layer's features,
    # so every convolution sees each frame's time (the released code's 3D convolutions mix
    # neighbouring frames instead); off: the temporal attention's slot positions alone mark order
    # (checkpoints written before this switch)
    input_positions: bool = False
    # the input convolution's extent over the frame slots [e_v, keyframe 1..K]: 1, a 2D convolution
    # per frame (the paper's); 3, a 3D (3 x 3 x 3) one as the released code's (`dims: 3`), so every
    # slot's features hold its neighbours' latents through weights of their own (before / after)
    temporal_kernel: int = 1
    # the output module's first 3x3 convolution's extent over the slots: 1, 2D on e_v's slot alone
    # (the paper's temporal split, then the output module); 3, a 3 x 3 x 3 convolution whose output at
    # e_v's slot reads e_v and the first keyframe's slot through weights of their own (zero before
    # e_v), as the released code's output module (`out_vc`, `dims: 3`) runs before its split
    output_temporal_kernel: int = 1
    # the posterior's log-variance where training starts (the bias of the output head's log-variance
    # half); 0: std 1, as the code's zero-initialised variance head. The KL term (weight 1e-6) barely
    # moves it, so it sets the noise the decoder reads the global feature through while training
    init_logvar: float = 0.0

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class DecoderConfig:
    """The video decoder: a diffusers UNet2DConditionModel (Stable Diffusion 1.x's layout at the
    paper's sizes) denoising one frame's latents, guided by the global feature and frame index."""

    channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    num_heads: int = 8
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature sizes
    context_dim: int = 768  # width of the global-feature tokens the UNet cross-attends to
    norm_groups: int = 32
    index_scale: float = 1000.0  # normalised index * this enters the sinusoidal index embedding
    guidance_dropout: float = 0.1  # share of training frames decoded from the null global feature
    # a diffusers UNet2DConditionModel folder of this shape to start from (the paper starts from
    # Stable Diffusion's UNet); empty: random initialisation
    unet_path: str = ""


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The CRA discriminator on pixel frame pairs (sizes from the released code's config)."""

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4, 4)
    num_res_blocks: int = 1
    head_channels: int = 32
    attention_resolutions: tuple[int, ...] = (16, 8)  # full spatio-temporal
    norm_groups: int = 32


@dataclass(frozen=True)
class DiTConfig:
    """The video generator: a DiT (patch 1) over the global feature, the caption's tokens in context."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: int = 4


@dataclass
class GloberConfig:
    name: str = "glober-tiny"
    phase: Literal["autoencoder", "generator"] = "autoencoder"
    frame_size: int = 16  # pixels per frame side
    num_frames: int = 5  # F: frames of a training clip (normalised index i / (F - 1))
    vocab: VocabLayout = field(default_factory=lambda: VocabLayout.compact(64, 96))  # text ids
    text_length: int = 8  # caption tokens the DiT reads, left-padded (pads masked)
    vae: VAEConfig = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
    encoder: EncoderConfig = EncoderConfig(
        channels=8,
        attention_resolutions=(4,),
        out_channels=4,
        head_channels=4,
        num_res_blocks=1,
        num_keyframes=2,
        norm_groups=4,
    )
    decoder: DecoderConfig = DecoderConfig(
        channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        num_heads=2,
        attention_resolutions=(8,),
        context_dim=16,
        norm_groups=4,
    )
    discriminator: DiscriminatorConfig = DiscriminatorConfig(
        channels=8, channel_mult=(1, 2), head_channels=4, attention_resolutions=(8,), norm_groups=4
    )
    dit: DiTConfig = DiTConfig(hidden_size=32, depth=2, num_heads=4)
    schedule: NoiseSchedule = NoiseSchedule()  # the decoder's and the DiT's diffusion
    kl_weight: float = 1e-6  # lambda_1
    cra_weight: float = 0.1  # lambda_2
    adversarial_loss: Literal["bce", "hinge"] = "bce"  # bce: the paper's Eq. 10; hinge: the code's
    generator_steps: int = 1  # the alternation: this many generator (auto-encoder) steps,
    # then this many discriminator steps; 0 with cra_weight 0: the auto-encoder alone, without the
    # CRA's decoding to pixels and discriminator (the CPU demo's budget)
    discriminator_steps: int = 1
    # phase autoencoder: the auto-encoder's first this-many optimizer steps leave the video encoder
    # as initialised (zero gradients: no reconstruction gradient reaches it, the KL term is off), so
    # the decoder first learns to read the initial features, the keyframes' order included; trained
    # together from step 0 the encoder drops order (a video and its reverse 0.6 % apart) before the
    # decoder can use it, and nothing brings it back
    encoder_frozen_steps: int = 0
    init_std: float = 0.02  # the DiT's embeddings
    # recompute in backward: the DiT's blocks (phase generator), the UNet's down and up blocks (phase autoencoder)
    activation_checkpointing: bool = False

    # ---- derived shapes -------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.frame_size // self.vae.factor

    @property
    def global_size(self) -> int:
        return self.latent_size // self.encoder.factor

    @property
    def global_shape(self) -> tuple[int, int, int]:
        return (self.encoder.out_channels, self.global_size, self.global_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.vae.latent_channels, self.latent_size, self.latent_size)

    @property
    def keyframes(self) -> tuple[int, ...]:
        """K frame indices at equal intervals over the clip, first and last included."""
        k, last = self.encoder.num_keyframes, self.num_frames - 1
        return tuple(round(i * last / (k - 1)) for i in range(k)) if k > 1 else (0,)

    @property
    def num_layers(self) -> int:
        return self.dit.depth

    @property
    def seq_length(self) -> int:
        """Positions one training sample runs through its network (throughput's tokens): the DiT's
        caption and global-feature tokens; the auto-encoder's two decoded frames' latent positions."""
        if self.phase == "generator":
            return self.text_length + self.global_size**2
        return 2 * self.latent_size**2

    @property
    def hidden_size(self) -> int:
        """The width of the phase's main matrix products (the precision probe's): the DiT's, or the
        decoder UNet's widest level."""
        if self.phase == "generator":
            return self.dit.hidden_size
        return self.decoder.channels * max(self.decoder.channel_mult)

    @property
    def ffn_size(self) -> int:
        return (self.dit.mlp_ratio if self.phase == "generator" else 4) * self.hidden_size

    # ---- validation -----------------------------------------------------------------
    def validate(self, tensor_parallel: int = 1) -> "GloberConfig":
        def bad(key: str, why: str):
            raise ValueError(f"model.{key}: {why}")

        if self.phase not in PHASES:
            bad("phase", f"{self.phase!r} is not one of {PHASES}")
        if self.encoder_frozen_steps < 0:
            bad("encoder_frozen_steps", f"must be >= 0, got {self.encoder_frozen_steps}")
        for key in ("frame_size", "text_length", "generator_steps"):
            if getattr(self, key) <= 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.discriminator_steps < 0 or (self.discriminator_steps == 0) != (self.cra_weight == 0):
            bad(
                "discriminator_steps",
                f"{self.discriminator_steps} with cra_weight={self.cra_weight}: 0 exactly when cra_weight is 0 "
                "(the auto-encoder without the CRA loss), else positive",
            )
        if self.num_frames < 2:
            bad("num_frames", f"the CRA loss draws two frames i < j: needs >= 2, got {self.num_frames}")
        if not 1 <= self.encoder.num_keyframes <= self.num_frames:
            bad(
                "encoder.num_keyframes",
                f"needs 1..num_frames={self.num_frames}, got {self.encoder.num_keyframes}",
            )
        for key in ("temporal_kernel", "output_temporal_kernel"):
            size = getattr(self.encoder, key)
            if size < 1 or size % 2 == 0:
                bad(f"encoder.{key}", f"needs an odd size >= 1, got {size}")
        if self.frame_size % self.vae.factor or self.latent_size % self.encoder.factor:
            bad(
                "frame_size",
                f"{self.frame_size} px must divide by the KL-VAE's factor {self.vae.factor} and then by the "
                f"video encoder's {self.encoder.factor}",
            )
        if self.latent_size % 2 ** (len(self.decoder.channel_mult) - 1):
            bad(
                "decoder.channel_mult",
                f"{len(self.decoder.channel_mult)} levels do not fit {self.latent_size}-wide latents",
            )
        self._check_groups()
        if not 0 <= self.decoder.guidance_dropout < 1:
            bad("decoder.guidance_dropout", f"must be in [0, 1), got {self.decoder.guidance_dropout}")
        if self.kl_weight < 0 or self.cra_weight < 0:
            bad("kl_weight", "loss weights must be >= 0")
        self.schedule.validate("model.schedule")
        self._check_splits(tensor_parallel)
        return self

    def _check_groups(self) -> None:
        """Group norms split each width evenly; attention heads split theirs."""
        for section, widths in (
            ("vae", [c for c in self.vae.block_out_channels]),
            ("encoder", [self.encoder.channels * m for m in self.encoder.channel_mult]),
            ("decoder", [self.decoder.channels * m for m in self.decoder.channel_mult]),
            ("discriminator", [self.discriminator.channels * m for m in self.discriminator.channel_mult]),
        ):
            part = getattr(self, section)
            groups = part.norm_num_groups if section == "vae" else part.norm_groups
            if any(w % groups for w in widths):
                raise ValueError(
                    f"model.{section}: group norm of {groups} groups does not divide widths {widths}"
                )
        if any(self.encoder.channels * m % self.encoder.head_channels for m in self.encoder.channel_mult):
            raise ValueError("model.encoder.head_channels: does not divide the encoder's widths")
        if self.dit.hidden_size % self.dit.num_heads:
            raise ValueError(
                f"model.dit.num_heads: {self.dit.num_heads} does not divide hidden_size={self.dit.hidden_size}"
            )

    def _check_splits(self, tensor_parallel: int) -> None:
        """Tensor parallelism splits the DiT: its heads, MLP and caption embedding rows (phase
        autoencoder has no DiT: every TP rank holds and runs the whole auto-encoder)."""
        if tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel must be >= 1, got {tensor_parallel}")
        if tensor_parallel == 1:
            return
        for key, size in (
            ("dit.num_heads", self.dit.num_heads),
            ("dit.mlp_ratio * hidden_size", self.dit.mlp_ratio * self.dit.hidden_size),
            ("vocab.num_text_tokens", self.vocab.num_text_tokens),
        ):
            if size % tensor_parallel:
                raise ValueError(f"model.{key}: {size} is not divisible by tensor_parallel={tensor_parallel}")

    def replace(self, **changes) -> "GloberConfig":
        return dataclasses.replace(self, **changes)


def _paper(
    name: str, dit_width: int, dit_depth: int, frame_size: int = 256, vae_levels: int = 4
) -> GloberConfig:
    """Table 11: the auto-encoder's sizes are shared; the KL-VAE (f 8, or f 4 at 128 px: LDM's
    kl-f4 with 3 latent channels) and the DiT's width and depth differ per data set."""
    f4 = vae_levels == 3
    vae = VAEConfig(block_out_channels=(128, 256, 512, 512)[:vae_levels], latent_channels=3 if f4 else 4)
    return GloberConfig(
        name=name,
        frame_size=frame_size,
        num_frames=16,
        vocab=VocabLayout.icetk(),
        text_length=64,
        vae=vae,
        encoder=EncoderConfig(),
        decoder=DecoderConfig(),
        discriminator=DiscriminatorConfig(attention_resolutions=(frame_size // 16, frame_size // 32)),
        dit=DiTConfig(hidden_size=dit_width, depth=dit_depth, num_heads=16, mlp_ratio=4),
    )


PRESETS = {
    "glober-tiny": lambda: GloberConfig(),
    "glober-demo": lambda: GloberConfig(
        name="glober-demo",
        frame_size=32,
        num_frames=5,
        vocab=VocabLayout.compact(512, 1000),
        text_length=16,
        vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16),
        encoder=EncoderConfig(
            channels=32,
            num_res_blocks=1,
            head_channels=16,
            attention_resolutions=(8, 4),
            out_channels=8,
            num_keyframes=3,
            norm_groups=16,
            # the 3D output convolution and a quiet posterior (std 0.05 at init), with the phase
            # file's encoder_frozen_steps: the encoder keeps order (README, GLOBER)
            output_temporal_kernel=3,
            init_logvar=-6.0,
        ),
        decoder=DecoderConfig(
            channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_heads=4,
            attention_resolutions=(8, 4),
            context_dim=64,
            norm_groups=16,
        ),
        discriminator=DiscriminatorConfig(
            channels=16, channel_mult=(1, 2, 2), head_channels=16, attention_resolutions=(8,), norm_groups=16
        ),
        dit=DiTConfig(hidden_size=128, depth=4, num_heads=4),
    ),
    "glober-ucf101-256": lambda: _paper("glober-ucf101-256", 1152, 28),
    "glober-sky-256": lambda: _paper("glober-sky-256", 1024, 20),
    "glober-taichi-128": lambda: _paper("glober-taichi-128", 1024, 20, frame_size=128, vae_levels=3),
}
# each preset's phase generator (the DiT over the frozen auto-encoder): `<preset>-dit`
PRESETS.update(
    {
        f"{name}-dit": (lambda make, name: lambda: make().replace(name=name, phase="generator"))(
            make, f"{name}-dit"
        )
        for name, make in list(PRESETS.items())
        if name != "glober-tiny"
    }
)
