"""HPDM's configuration and presets (Table 8 of the supplement, plus a CPU demo size).

A video is a pyramid of `num_levels` levels: level 1 is the whole video at the patch size
`patch` (T, H, W), each finer level doubles height and width and multiplies the frames by
`temporal_scale`; training sees one patch of `patch` size per level. `block_levels[b]` is how many
levels (coarsest first) block b runs: adaptive computation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from cogvideo.diffusion.edm import EDMConfig
from cogvideo.vocab import VocabLayout

SPATIAL_SCALE = 2  # every finer level doubles height and width (Table 8's pyramids)
COORDINATES = (
    4  # per interface token: its centre (t, y, x) in the whole video in [0, 1], and the patch extent
)


@dataclass
class HPDMConfig:
    name: str = "hpdm-demo"
    condition: Literal["class", "text"] = "class"  # class labels (UCF-101) or caption ids (text-to-video)
    num_classes: int = 101  # class presets; one more row is the null class of guidance
    # class presets: a clip's caption is its class name, its label the name's index here (empty:
    # the caption is the label itself, "0" .. num_classes - 1)
    classes: tuple[str, ...] = ()
    # the caption pieces (the project's text tokenizer): text presets embed them; every preset
    # names it because the trainer checks its tokenizer against it
    vocab: VocabLayout = field(default_factory=lambda: VocabLayout.compact(1, 1000))
    text_length: int = 16  # caption pieces kept; a caption of padding alone is the null condition
    text_dim: int = 256
    patch: tuple[int, int, int] = (5, 16, 16)  # frames, height, width of every level's patch
    tokenizer_patch: tuple[int, int, int] = (1, 4, 4)  # pixels per interface token
    num_levels: int = 2
    temporal_scale: int = 1  # frames multiply by this per finer level (2 for UCF-101's 16 -> 64)
    block_levels: tuple[int, ...] = (1, 2, 2)  # per RIN block: the levels it runs (1..n)
    interface_dim: int = 64  # Table 8's "tokenization dim"
    # learned position embeddings of the interface tokens within their patch (RIN's), factorised as
    # TimeSformer's: one table over the token rows x columns, one over the token frames, so that a
    # place has the same embedding in every frame; added to the map of the raw coordinates (False:
    # the coordinates alone, as checkpoints without the field trained)
    position_embeddings: bool = False
    # their initial spread (normal std): RIN's are unit normal; at init_std (0.02) against a token of
    # unit-variance noise pixels (norm ~1), a level-1 model took ~400 steps to learn even the
    # per-frame mean at sigma 20, 100 steps at 1.0 (README)
    position_std: float = 0.02
    # self-attention among a patch's interface tokens in every block, before the read (not in RIN
    # nor the paper; README: tried on the demo's level 1, direction not moved off chance)
    interface_attention: bool = False
    # a 1x3x3 convolution over the output pixels, across the interface tokens' borders (U-ViT's last
    # layer; README: in the demo's column it lowered the seams 3.28x -> 2.41x but colour 100 -> 42 %)
    output_conv: bool = False
    # each interface token's head writes a footprint twice its pixels' height and width, centred on
    # the token, overlap-added under a tent window that sums to one between token centres (a bilinear
    # blend of neighbouring tokens' pixels): D cannot step at a token border, where the demo's per-token
    # head drew its seams (README: in the demo's column, 4000 steps, seams 1.71x -> 1.02x the
    # references', colour and direction at 4 s kept at 100 %, FVD 572 -> 839; with the sampler's
    # context_grids 2 too, 0.87x: on in hpdm-demo). Needs even token heights and widths
    head_overlap: bool = False
    # the condition (noise level, caption, level) also modulates the interface side: the norm before
    # each block's interface feed-forward and the head's norm (DiT's adaLN final layer). Without it
    # the caption reaches a token only through the write's attention, whose share of any one
    # caption token is the same for every token at first: a caption-dependent place in each frame
    # (direction) has no first-order gradient (README)
    interface_modulation: bool = False
    # text presets: the condition vector takes a learned cond_dim-wide vector per caption piece, summed
    # over the caption's pieces (padding left out), as a class label's row (False: a projection of the
    # mean of the 16 piece embeddings, where one word moves the vector ~1/16 as far and, under Adam,
    # ~40x slower than a class row; README: a level-1 model did not tell "left" from "right")
    piece_conditioning: bool = False
    latent_dim: int = 64
    num_latents: int = 32
    latent_layers: int = 1  # latent self-attention layers per RIN block
    head_dim: int = 16
    ffn_mult: int = 4
    cond_dim: int = 128  # noise level + class/caption + level embedding, modulating the latent norms
    init_std: float = 0.02
    cond_dropout: float = 0.1  # classifier-free guidance: a sample's condition becomes the null one
    # x-prediction (the network outputs the clean patch; README: EDM's F mix left the demo's samples
    # noisy), EDM's c_in, c_noise, sigmas and weight, the weight's sigma floored at 0.05
    edm: EDMConfig = field(default_factory=lambda: EDMConfig(prediction="sample", weight_sigma_min=0.05))
    # training's ln(sigma) mean per level, coarsest first (empty: edm.p_mean at every level); the
    # spread stays edm.p_std
    level_p_mean: tuple[float, ...] = ()
    activation_checkpointing: bool = False  # recompute each RIN block in the backward pass

    # ---- derived ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:  # the TP plan's blocks
        return len(self.block_levels)

    # what the trainer and data preparation read of a family's config
    @property
    def seq_length(self) -> int:  # interface tokens of one training example (a patch per level)
        return self.tokens_per_patch * self.num_levels

    @property
    def hidden_size(self) -> int:
        return self.interface_dim

    @property
    def ffn_size(self) -> int:
        return self.ffn_mult * self.interface_dim

    @property
    def num_frames(self) -> int:  # frames of a prepared clip: the finest level's
        return self.video_size[0]

    @property
    def frame_size(self) -> int:  # data preparation's square frames: the finest level's side
        return self.video_size[2]

    @property
    def stage(self) -> str:
        return f"{self.num_levels}-level pyramid"

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Interface tokens per patch along (T, H, W)."""
        return tuple(p // k for p, k in zip(self.patch, self.tokenizer_patch))

    @property
    def tokens_per_patch(self) -> int:
        return math.prod(self.token_grid)

    @property
    def pixels_per_token(self) -> int:
        return 3 * math.prod(self.tokenizer_patch)

    @property
    def head_footprint(self) -> tuple[int, int, int]:
        """The pixels (T, H, W) one token's head writes: its own, or twice its height and width
        with `head_overlap`."""
        kt, kh, kw = self.tokenizer_patch
        return (kt, 2 * kh, 2 * kw) if self.head_overlap else (kt, kh, kw)

    def level_scale(self, level: int) -> tuple[int, int, int]:
        """How many times larger than level 1 level `level` (1-based) is along (T, H, W)."""
        return (self.temporal_scale ** (level - 1), *(SPATIAL_SCALE ** (level - 1),) * 2)

    def level_size(self, level: int, output: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
        """Level `level`'s video size; `output` is the finest level's (default: the trained one)."""
        if output is None:
            return tuple(p * s for p, s in zip(self.patch, self.level_scale(level)))
        finest = self.level_scale(self.num_levels)
        return tuple(o * s // f for o, s, f in zip(output, self.level_scale(level), finest))

    @property
    def video_size(self) -> tuple[int, int, int]:
        return self.level_size(self.num_levels)

    def level_edm(self, level: int) -> EDMConfig:
        """The EDM settings level `level` (1-based) trains with: its own P_mean where given."""
        if not self.level_p_mean:
            return self.edm
        return dataclasses.replace(self.edm, p_mean=self.level_p_mean[level - 1])

    def levels_of_block(self, block: int) -> range:
        """Levels (1-based) that block `block` (0-based) runs."""
        return range(1, self.block_levels[block] + 1)

    # ---- validation ------------------------------------------------------------------------
    def validate(self, tensor_parallel: int = 1) -> "HPDMConfig":
        def bad(key: str, why: str):
            raise ValueError(f"model.{key}: {why}")

        positive = ("num_levels", "temporal_scale", "interface_dim", "latent_dim", "num_latents", "head_dim")
        for key in (*positive, "latent_layers", "ffn_mult", "cond_dim", "text_length", "text_dim"):
            if getattr(self, key) < (0 if key == "latent_layers" else 1):
                bad(key, f"must be positive, got {getattr(self, key)}")
        if len(self.patch) != 3 or len(self.tokenizer_patch) != 3:
            bad("patch", "patch and tokenizer_patch are (frames, height, width)")
        for axis, (p, k) in enumerate(zip(self.patch, self.tokenizer_patch)):
            if k < 1 or p % k:
                bad(
                    "tokenizer_patch",
                    f"{self.tokenizer_patch} does not tile the patch {self.patch} (axis {axis})",
                )
        if self.head_overlap and (self.tokenizer_patch[1] % 2 or self.tokenizer_patch[2] % 2):
            bad(
                "head_overlap",
                f"needs even token heights and widths, got tokenizer_patch {self.tokenizer_patch}",
            )
        levels = self.block_levels
        if not levels or any(b < a for a, b in zip(levels, levels[1:])) or levels[0] < 1:
            bad("block_levels", f"{levels}: a non-decreasing count of levels per block, from 1")
        if levels[-1] != self.num_levels:
            bad("block_levels", f"the last block must run every level ({self.num_levels}), got {levels}")
        for key, dim in (("interface_dim", self.interface_dim), ("latent_dim", self.latent_dim)):
            if dim % self.head_dim:
                bad("head_dim", f"{self.head_dim} does not divide {key}={dim}")
        if not 0 <= self.cond_dropout < 1:
            bad("cond_dropout", f"must be in [0, 1), got {self.cond_dropout}")
        for problem in self.edm.problems():
            bad("edm", problem)
        if self.level_p_mean and len(self.level_p_mean) != self.num_levels:
            bad("level_p_mean", f"{len(self.level_p_mean)} means for {self.num_levels} levels (or none)")
        if self.classes and len(self.classes) != self.num_classes:
            bad("classes", f"{len(self.classes)} names for num_classes={self.num_classes}")
        self._check_splits(tensor_parallel)
        return self

    def _check_splits(self, tensor_parallel: int) -> None:
        """Attention heads (interface and latents) split evenly over TP ranks."""
        if tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel must be >= 1, got {tensor_parallel}")
        for key, dim in (("interface_dim", self.interface_dim), ("latent_dim", self.latent_dim)):
            heads = dim // self.head_dim
            if heads % tensor_parallel:
                raise ValueError(
                    f"model.{key}: its {heads} heads (head_dim {self.head_dim}) are not divisible by "
                    f"tensor_parallel={tensor_parallel}"
                )

    def replace(self, **changes) -> "HPDMConfig":
        return dataclasses.replace(self, **changes)


def _ucf(name: str, latent_dim: int) -> HPDMConfig:
    """Table 8's UCF-101 models: 16x64x64 patches, pyramid up to 64x256x256 in 3 levels."""
    return HPDMConfig(
        name=name,
        condition="class",
        num_classes=101,
        patch=(16, 64, 64),
        tokenizer_patch=(1, 4, 4),
        num_levels=3,
        temporal_scale=2,
        block_levels=(1, 1, 2, 2, 3, 3),
        interface_dim=1024,
        latent_dim=latent_dim,
        num_latents=768,
        latent_layers=4,
        head_dim=64,
        cond_dim=2048,
    )


PRESETS = {
    # the demo's synthetic world is captioned; its frames are mostly flat background (per-pixel
    # std ~0.2), so where an object goes and its colour are decided at sigma ~0.5-5, rare under
    # EDM's ln(sigma) ~ N(-1.2, 1.2^2): the demo trains there 1.7x as often (N(-0.4, 1.2^2))
    # (README: level 1 drew objects at another place in every frame from raw coordinates alone; a
    # place's own embedding, the same in every frame, lets a latent read and write it across frames)
    # (README: direction at chance was the caption's and the positions' weak paths plus the rare high
    # noise levels where a path is decided: piece_conditioning, interface_modulation, unit-normal
    # position tables, level 1 at P_mean 1.0 and the weight's sigma floored at 0.5)
    "hpdm-demo": lambda: HPDMConfig(
        condition="text",
        position_embeddings=True,
        position_std=1.0,
        interface_modulation=True,
        piece_conditioning=True,
        edm=EDMConfig(prediction="sample", weight_sigma_min=0.5, p_mean=-0.4),
        level_p_mean=(1.0, -0.4),
        # level 1 in three blocks of its own, level 2 in the last (the paper's adaptive computation:
        # finer levels take fewer blocks); (1, 2, 2), level 1 sharing two blocks with level 2, left
        # level 1's direction at chance (README). With these, the demo's column at 4000 steps of a
        # constant rate (configs/demo/hpdm/train.yaml): held-out direction at 4 s 100 %, colour
        # 100 %, FVD 572, seams 1.71x
        block_levels=(1, 1, 1, 2),
        # the head's footprints blended across token borders: the seams were the per-token head's
        # (README). The column with it (and the sampler's context_grids 2, configs/demo/hpdm/
        # sample.yaml; 4000 steps): seams 0.87x / 0.89x the references' on seeds 0 / 1 (target
        # <= 1x met; 1.71x / 1.61x without either, 1.02x / 1.04x with the head alone), colour
        # 100 %, direction at 4 s 100 / 83.3 % (was 100 / 100 %), FVD 852 / 848 (was 572 / 713)
        head_overlap=True,
    ),
    "hpdm-s": lambda: _ucf("hpdm-s", 256),
    "hpdm-m": lambda: _ucf("hpdm-m", 512),
    "hpdm-l": lambda: _ucf("hpdm-l", 1024),
    # text-to-video: 8x36x64 patches up to 64x288x512 in 4 levels; T5-11B's embeddings in the
    # paper, the project's caption pieces here (a 32k SentencePiece vocabulary, learned embeddings)
    "hpdm-t2v": lambda: _ucf("hpdm-t2v", 3072).replace(
        condition="text",
        vocab=VocabLayout.compact(1, 32000),
        text_length=64,
        text_dim=256,
        patch=(8, 36, 64),
        tokenizer_patch=(1, 3, 4),
        num_levels=4,
        block_levels=(1, 2, 2, 3, 3, 4),
    ),
}
