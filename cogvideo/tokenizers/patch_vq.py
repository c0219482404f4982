"""A small image tokenizer for CPU-scale runs: one code per non-overlapping patch.

Each frame is cut into ``tokens_side x tokens_side`` patches; a code is the index of the
nearest codebook patch, where "nearest" adds a weighted mean-colour term to the pixel L2
distance (so small shapes keep their colour). Decoding pastes, per position, the mean training
patch seen with the same code *and* the same four neighbour codes (the context table), falling
back to the code's own patch for contexts never seen: the neighbours pin down where an edge or
corner sits inside the patch, which one code alone cannot at small codebook sizes. The codebook
and the context table are fitted by :mod:`cogvideo.tokenizers.patch_fit`.

Saved as safetensors (no pickle): ``codebook`` [K, p*p*3] float32, ``context_keys`` [M]
int64, ``context_patches`` [M, p*p*3] uint8, and ``frame_size``/``tokens_side``/
``colour_weight`` metadata, plus the model ``preset`` it was fitted for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cogvideo.tokenizers.image import check_codes, check_frames

FORMAT = "cogvideo-patch-vq"
FORMAT_VERSION = "1"
CHUNK = 16384  # patches per distance matmul: bounds memory at [CHUNK, codebook_size]
FRAMES_PER_CHUNK = 2048  # frames turned into float patches at a time
MAX_CONTEXT_CODES = 6000  # context keys pack 5 codes into an int64: (K + 1) ** 5 < 2 ** 63
MEAN_WEIGHTS = 1 << 24  # decode_mean: positions x context entries weighed at a time (64 MiB in fp32)


def to_patches(frames: np.ndarray, tokens_side: int) -> torch.Tensor:
    """uint8 [T, S, S, 3] -> float32 [T * n * n, p * p * 3], patches in raster order."""
    t, size = frames.shape[0], frames.shape[1]
    p = size // tokens_side
    x = torch.from_numpy(np.ascontiguousarray(frames)).view(t, tokens_side, p, tokens_side, p, 3)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3).float()


def patches_to_frames(patches: torch.Tensor, tokens_side: int) -> torch.Tensor:
    """[T * n * n, p * p * 3] in raster order -> [T, n * p, n * p, 3], any dtype (to_patches' inverse)."""
    p = int(round((patches.shape[1] // 3) ** 0.5))
    x = patches.reshape(-1, tokens_side, tokens_side, p, p, 3)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens_side * p, tokens_side * p, 3)


def from_patches(patches: torch.Tensor, tokens_side: int) -> np.ndarray:
    return patches_to_frames(patches.round().clamp(0, 255).to(torch.uint8), tokens_side).numpy()


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for every row of x (|c|^2 - 2 x.c, chunked).

    The matmul runs in x's dtype: the fit's precision (:func:`fit_precision`) while fitting, fp32
    when encoding, so that codes are exact."""
    c = codebook.to(x.dtype)
    sq = codebook.float().pow(2).sum(1)
    return torch.cat([(sq - 2 * (x[i : i + CHUNK] @ c.T).float()).argmin(1) for i in range(0, len(x), CHUNK)])


def with_colour(x: torch.Tensor, colour_weight: float) -> torch.Tensor:
    """Patches [N, p*p*3] -> features whose squared distance is the pixel distance plus
    ``colour_weight * p*p`` times the squared distance of the patches' mean colours."""
    if colour_weight == 0:
        return x
    pixels = x.shape[1] // 3
    mean = x.view(len(x), pixels, 3).mean(1)
    return torch.cat([x, (colour_weight * pixels) ** 0.5 * mean], 1)


def context_keys(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """One int64 per position from its code and its up, down, left and right neighbours'
    codes (``codebook_size`` stands for "outside the frame")."""
    padded = np.pad(codes, ((0, 0), (1, 1), (1, 1)), constant_values=codebook_size)
    key = np.zeros(codes.shape, np.int64)
    for part in (
        padded[:, 1:-1, 1:-1],
        padded[:, :-2, 1:-1],
        padded[:, 2:, 1:-1],
        padded[:, 1:-1, :-2],
        padded[:, 1:-1, 2:],
    ):
        key = key * (codebook_size + 1) + part
    return key


def context_codes(keys: np.ndarray, codebook_size: int) -> np.ndarray:
    """context_keys' inverse: int64 [M] -> [5, M], the code and its up, down, left and right
    neighbours' codes (``codebook_size``: outside the frame)."""
    codes = np.empty((5, len(keys)), np.int64)
    rest = np.asarray(keys, np.int64)
    for part in range(4, -1, -1):
        rest, codes[part] = np.divmod(rest, codebook_size + 1)
    return codes


class PatchVQTokenizer:
    """Codes = nearest codebook patch. Decoding uses the context table when it has the
    position's (code, 4 neighbour codes) key, and the code's own patch otherwise."""

    def __init__(
        self,
        codebook: torch.Tensor | np.ndarray,
        frame_size: int,
        tokens_side: int,
        device: str = "cpu",
        context: tuple[np.ndarray, np.ndarray] | None = None,
        colour_weight: float = 0.0,
        preset: str | None = None,
    ):
        if tokens_side <= 0 or frame_size % tokens_side:
            raise ValueError(f"tokens_side: expected a divisor of frame_size={frame_size}, got {tokens_side}")
        self.frame_size, self.tokens_side = frame_size, tokens_side
        self.preset = preset  # the model preset it was fitted for (recorded in the file), if any
        self.patch_size = frame_size // tokens_side
        codebook = torch.as_tensor(codebook, dtype=torch.float32, device=device)
        dim = self.patch_size**2 * 3
        if codebook.ndim != 2 or codebook.shape[1] != dim or len(codebook) == 0:
            raise ValueError(
                f"codebook: expected [codebook_size, {dim}] for {self.patch_size}x{self.patch_size} "
                f"patches, got {list(codebook.shape)}"
            )
        if not colour_weight >= 0:
            raise ValueError(f"colour_weight: expected >= 0, got {colour_weight}")
        self._codebook = codebook
        self.codebook_size = len(codebook)
        self.colour_weight = float(colour_weight)
        self._code_features = with_colour(codebook, self.colour_weight)
        self.context = None
        if context is not None:
            if self.codebook_size > MAX_CONTEXT_CODES:
                raise ValueError(
                    f"context table: codebook_size={self.codebook_size} is above {MAX_CONTEXT_CODES}"
                )
            keys, patches = np.asarray(context[0]), np.asarray(context[1])
            if keys.dtype != np.int64 or keys.ndim != 1 or np.any(keys[1:] <= keys[:-1]):
                raise ValueError(
                    f"context_keys: expected sorted unique int64 [M], got {keys.dtype} {list(keys.shape)}"
                )
            if patches.dtype != np.uint8 or patches.shape != (len(keys), dim):
                raise ValueError(
                    f"context_patches: expected uint8 [{len(keys)}, {dim}], "
                    f"got {patches.dtype} {list(patches.shape)}"
                )
            self.context = (keys, patches)
        self._mean_tables = {}  # decode_mean's, by (device, dtype)

    def at_grid(self, tokens_side: int) -> "PatchVQTokenizer":
        """The same codebook and context table for frames of `tokens_side` patches per side (a
        super-resolution model's high-res frames: same patch size, more patches)."""
        return PatchVQTokenizer(
            self._codebook,
            tokens_side * self.patch_size,
            tokens_side,
            str(self._codebook.device),
            self.context,
            self.colour_weight,
            self.preset,
        )

    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames, self.frame_size)
        codes = [
            nearest(
                with_colour(
                    to_patches(frames[i : i + FRAMES_PER_CHUNK], self.tokens_side).to(self._codebook.device),
                    self.colour_weight,
                ),
                self._code_features,
            ).cpu()
            for i in range(0, len(frames), FRAMES_PER_CHUNK)
        ]
        codes = torch.cat(codes).numpy() if codes else np.zeros(0, np.int64)
        return codes.reshape(len(frames), self.tokens_side, self.tokens_side)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = check_codes(codes, self.tokens_side, self.codebook_size)
        patches = self._codebook[torch.from_numpy(codes.reshape(-1)).to(self._codebook.device)].cpu()
        if self.context is not None and len(self.context[0]):
            table_keys, table_patches = self.context
            keys = context_keys(codes, self.codebook_size).reshape(-1)
            row = np.minimum(np.searchsorted(table_keys, keys), len(table_keys) - 1)
            hit = table_keys[row] == keys
            patches[torch.from_numpy(hit)] = torch.from_numpy(table_patches[row[hit]]).float()
        return from_patches(patches, self.tokens_side)

    def decode_mean(self, probs: torch.Tensor) -> torch.Tensor:
        """The expected decoded frames when every position's code is drawn independently from
        ``probs`` [T, n, n, K] (each row a distribution): float [T, H, W, 3] in probs' dtype, not
        rounded, exactly the mean of :meth:`decode`'s uint8 frames over all code maps weighted by
        their probability. A position decodes to its (code, 4 neighbours) context patch when the
        table has that key, else to its code's rounded codebook patch, so its expected patch is
        sum_c p(c) patch(c) plus, over the table's entries e, P(e's five codes there)
        (patch(e) - patch(code of e)): the neighbours' codes are independent of the position's.
        Cost: positions x table entries x (5 + p*p*3) multiply-adds."""
        probs = torch.as_tensor(probs)
        t, n, k = len(probs), self.tokens_side, self.codebook_size
        if not probs.is_floating_point() or probs.shape[1:] != (n, n, k):
            raise ValueError(
                f"probs: expected float [T, {n}, {n}, {k}], got {probs.dtype} {list(probs.shape)}"
            )
        own, codes, change = self._mean_table(probs.device, probs.dtype)
        patches = probs.reshape(-1, k) @ own
        if len(change):
            # each position's and its neighbours' distributions over K + 1 symbols (K: outside),
            # symbol-major, so that an entry's symbol gathers a contiguous run of positions
            padded = probs.new_zeros(k + 1, t, n + 2, n + 2)
            padded[k] = 1
            padded[:, :, 1:-1, 1:-1] = torch.cat([probs, probs.new_zeros(t, n, n, 1)], -1).permute(3, 0, 1, 2)
            parts = [
                part.reshape(k + 1, -1)
                for part in (
                    padded[..., 1:-1, 1:-1],
                    padded[..., :-2, 1:-1],
                    padded[..., 2:, 1:-1],
                    padded[..., 1:-1, :-2],
                    padded[..., 1:-1, 2:],
                )
            ]
            rows = max(1, MEAN_WEIGHTS // len(change))
            for start in range(0, len(patches), rows):
                weight = parts[0][codes[0], start : start + rows]  # [entries, positions]
                for part, index in zip(parts[1:], codes[1:]):
                    weight *= part[index, start : start + rows]
                patches[start : start + rows] += weight.T @ change
        return patches_to_frames(patches, n)

    def _mean_table(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """decode_mean's terms, made once per device and dtype: the rounded codebook patches
        [K, p*p*3] (what decode draws for a code), and the context table's entries' five codes
        [5, M] and patch minus their code's rounded patch [M, p*p*3] (M = 0 without a table)."""
        if (device, dtype) not in self._mean_tables:
            own = self._codebook.to(device).round().clamp(0, 255).to(dtype)
            keys, table = self.context if self.context is not None else (np.zeros(0, np.int64), None)
            codes = torch.from_numpy(context_codes(keys, self.codebook_size)).to(device)
            change = (
                torch.from_numpy(table).to(device, dtype) - own[codes[0]]
                if len(keys)
                else own.new_zeros(0, own.shape[1])
            )
            self._mean_tables[device, dtype] = (own, codes, change)
        return self._mean_tables[device, dtype]

    def codebook(self) -> np.ndarray:
        return self._codebook.cpu().numpy().copy()

    def save(self, path: str | Path) -> None:
        """Write the tokenizer; it must record the model preset it was fitted for, which data
        preparation reads back (ValueError otherwise)."""
        if not self.preset:
            raise ValueError(f"{path}: a tokenizer file records its model preset: give preset=NAME")
        tensors = {"codebook": self._codebook.cpu().contiguous()}
        if self.context is not None:
            tensors["context_keys"] = torch.from_numpy(self.context[0])
            tensors["context_patches"] = torch.from_numpy(self.context[1])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(
            tensors,
            str(path),
            metadata={
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "frame_size": str(self.frame_size),
                "tokens_side": str(self.tokens_side),
                "colour_weight": repr(self.colour_weight),
                "preset": self.preset,
            },
        )

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PatchVQTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch tokenizer not found: {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        known = {"codebook", "context_keys", "context_patches"}
        if (
            "codebook" not in tensors
            or set(tensors) - known
            or len(set(tensors) & (known - {"codebook"})) == 1
        ):
            raise ValueError(
                f"{path}: expected tensors 'codebook' (+ 'context_keys' and 'context_patches'), "
                f"found {sorted(tensors)}"
            )
        try:
            frame_size, tokens_side = int(meta["frame_size"]), int(meta["tokens_side"])
            colour_weight = float(meta.get("colour_weight", "0"))
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{path}: metadata needs integer 'frame_size' and 'tokens_side' (and a number "
                f"'colour_weight'), got {meta}"
            ) from err
        context = (
            (tensors["context_keys"].numpy(), tensors["context_patches"].numpy())
            if "context_keys" in tensors
            else None
        )
        try:
            return cls(
                tensors["codebook"],
                frame_size,
                tokens_side,
                device,
                context,
                colour_weight,
                meta.get("preset"),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
