"""Token sampling strategies over image-code logits.

Every row of a batch draws its random numbers from its own `torch.Generator`, so a prompt's
video depends only on the prompt and the seed, not on which other prompts share its batch
or which worker samples it.

Besides drawing (`topk`, the release's `cluster`), `mbr` decodes by minimum expected error: the code
whose vector (the image tokenizer's codebook row) has the least expected squared distance to the
code drawn from the model's (tempered, truncated) distribution, a project option, not the release's.
`mean` (also the project's) writes no code at all: its frames are the posterior mean, every pixel's
expected value under that distribution through the image tokenizer's decoder (`decode_mean`), the
frame of least expected squared pixel error; it hands out pixels, so only the last stage (super-
resolution) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cogvideo.tokenizers.patch_vq import nearest


@dataclass
class StrategyOptions:
    kind: Literal["topk", "cluster", "mbr", "mean"] = "topk"
    temperature: float = 1.0  # 0 = greedy (argmax; not for mbr, mean)
    top_k: int = 0  # topk, mbr, mean: codes kept (0 = all); cluster: clusters kept
    top_p: float = 1.0  # topk, mbr, mean: nucleus mass kept
    # cluster only: inside the chosen cluster, logits / (temperature * temperature2) (CogLM's rule)
    temperature2: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.temperature2 <= 0:
            raise ValueError(f"strategy: temperatures must be >= 0 (temperature2 > 0), got {self}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"strategy: need top_k >= 0 and 0 < top_p <= 1, got {self}")
        if self.kind == "cluster" and (self.top_k <= 0 or self.temperature == 0):
            raise ValueError("strategy.kind=cluster needs top_k > 0 and temperature > 0")
        if self.kind in ("mbr", "mean") and self.temperature == 0:
            raise ValueError(
                f"strategy.kind={self.kind} needs temperature > 0 (temperature 0 is greedy: kind=topk)"
            )


def uniforms(generators: list[torch.Generator], device) -> torch.Tensor:
    """One U[0, 1) number per row, from that row's own generator."""
    draws = [torch.rand((), generator=g, dtype=torch.float64) for g in generators]
    return torch.stack(draws).to(device)


def sample_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first index whose cumulative mass exceeds u[i]."""
    cdf = probs.double().cumsum(-1)
    x = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, x, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


class TopKStrategy:
    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        return self.sample(logits, lambda: uniforms(generators, logits.device))

    def sample(self, logits: torch.Tensor, draw) -> torch.Tensor:
        """`draw()` gives one U[0, 1) number per row of `logits` [rows, K]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return sample_rows(truncated_probs(logits, self.temperature, self.top_k, self.top_p), draw())


def truncated_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature) over the top_k codes (0 = all), then the smallest prefix by
    probability whose mass reaches top_p; not renormalised (sample_rows scales by the total)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """truncated_probs renormalised: each row sums to 1."""
    probs = truncated_probs(logits, temperature, top_k, top_p)
    return probs / probs.sum(-1, keepdim=True)


class MinimumErrorStrategy:
    """Minimum expected error (Bayes-risk) decoding: with p the tempered, truncated distribution
    over codes and c_k the code vectors, the code k minimising sum_j p_j ||c_k - c_j||^2, which is
    the code nearest the expected vector sum_j p_j c_j (the sum differs from ||c_k - m||^2 by a term
    free of k). Deterministic: it draws nothing. For the patch tokenizer the code vectors are its
    codebook patches (pixels), so this is the code of least expected squared pixel error."""

    def __init__(
        self, code_vectors: torch.Tensor | np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
    ):
        self.code_vectors = torch.as_tensor(code_vectors, dtype=torch.float32)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        return self.sample(logits, None)

    def sample(self, logits: torch.Tensor, draw=None) -> torch.Tensor:
        """Codes [rows] for `logits` [rows, K] (`draw` is not called)."""
        if len(self.code_vectors) != logits.shape[-1]:
            raise ValueError(f"code vectors: {len(self.code_vectors)} codes, logits have {logits.shape[-1]}")
        if self.code_vectors.device != logits.device:  # moved once, not per frame
            self.code_vectors = self.code_vectors.to(logits.device)
        expected = distribution(logits, self.temperature, self.top_k, self.top_p) @ self.code_vectors
        return nearest(expected, self.code_vectors)


class PosteriorMean:
    """kind=mean: no code is chosen. `distribution(logits)` is each position's (tempered, truncated)
    distribution over the codes, which the image tokenizer's `decode_mean` turns into the expected
    decoded frame: under the model's independent per-position distribution, the frame of least
    expected squared pixel error (mbr picks one code per position; this averages what the codes
    would draw). The caller decodes: see cogvideo.models.dsr.sampler.SuperResolution."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, K] logits -> [rows, K] probabilities (float32), each row summing to 1."""
        return distribution(logits, self.temperature, self.top_k, self.top_p)


class ClusterStrategy:
    """CogLM's strategy (SwissArmyTransformer's / CogVideo's `CoglmStrategy`): divide the logits
    by T, pick one of the top-k clusters of the codebook by their summed probability, then a
    code inside that cluster from those logits divided again by T2 (so T * T2 in all)."""

    def __init__(self, labels: torch.Tensor, temperature: float, top_k: int, temperature2: float):
        self.labels = labels.long()
        self.num_clusters = int(self.labels.max()) + 1
        self.temperature, self.top_k, self.temperature2 = temperature, top_k, temperature2

    def __call__(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        return self.sample(logits, lambda: uniforms(generators, logits.device))

    def sample(self, logits: torch.Tensor, draw) -> torch.Tensor:
        """`draw()` gives one U[0, 1) number per row of `logits` [rows, K] (called twice: the
        cluster, then the code)."""
        logits = logits.float()
        labels = self.labels.to(logits.device)
        if labels.numel() != logits.shape[-1]:
            raise ValueError(f"cluster table has {labels.numel()} codes, logits have {logits.shape[-1]}")
        logits = logits / self.temperature
        probs = logits.softmax(-1)
        cluster_probs = probs.new_zeros(len(logits), self.num_clusters)
        cluster_probs.scatter_add_(1, labels.expand_as(probs), probs)
        top_probs, top_clusters = cluster_probs.topk(min(self.top_k, self.num_clusters), dim=-1)
        chosen = top_clusters.gather(1, sample_rows(top_probs, draw())[:, None])
        inside = labels[None, :] == chosen
        code_probs = (logits / self.temperature2).masked_fill(~inside, float("-inf")).softmax(-1)
        return sample_rows(code_probs, draw())


def make_strategy(
    options: StrategyOptions,
    cluster_labels: torch.Tensor | None = None,
    code_vectors: torch.Tensor | np.ndarray | None = None,
):
    """`cluster_labels` (see `load_cluster_table`) is needed by kind=cluster only, `code_vectors`
    (the image tokenizer's `codebook()`, [K, D]) by kind=mbr only. kind=mean gives a
    PosteriorMean, which samples no codes (the super-resolution stage decodes it)."""
    if options.kind == "topk":
        return TopKStrategy(options.temperature, options.top_k, options.top_p)
    if options.kind == "mean":
        return PosteriorMean(options.temperature, options.top_k, options.top_p)
    if options.kind == "mbr":
        if code_vectors is None:
            raise ValueError("strategy.kind=mbr needs the image tokenizer's code vectors (its codebook)")
        return MinimumErrorStrategy(code_vectors, options.temperature, options.top_k, options.top_p)
    if cluster_labels is None:
        raise ValueError("strategy.kind=cluster needs a cluster table (sampling option cluster_table)")
    return ClusterStrategy(cluster_labels, options.temperature, options.top_k, options.temperature2)
