"""The codebook cluster table used by CogLM's sampling strategy, and the command that
computes it: k-means over the code vectors of an image tokenizer.

    cogvideo-clusters --image-tokenizer ice_image.pt --clusters 500 --out clusters.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def kmeans(points: torch.Tensor, num_clusters: int, iters: int = 100, seed: int = 0):
    """k-means++ seeding then Lloyd iterations until assignments stop changing.
    Returns (labels [N] long, centroids [num_clusters, D])."""
    points = points.double()
    n = len(points)
    if not 0 < num_clusters <= n:
        raise ValueError(f"clusters: need 0 < clusters <= {n} codes, got {num_clusters}")
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randint(n, (1,), generator=gen)]
    nearest = torch.cdist(points, centroids).squeeze(1) ** 2
    for _ in range(num_clusters - 1):
        pick = torch.multinomial(nearest + 1e-30, 1, generator=gen)
        centroids = torch.cat([centroids, points[pick]])
        nearest = torch.minimum(nearest, ((points - points[pick]) ** 2).sum(-1))
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        distances = torch.cdist(points, centroids)
        new_labels = distances.argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        centroids = sums / counts.clamp(min=1)[:, None]
        for empty in (counts == 0).nonzero().flatten():  # re-seed at the worst-served point
            far = distances.gather(1, labels[:, None]).squeeze(1).argmax()
            centroids[empty] = points[far]
            labels[far] = empty
    return labels, centroids.float()


def save_cluster_table(path: str | Path, labels: torch.Tensor, centroids: torch.Tensor) -> None:
    with open(path, "wb") as f:  # np.savez would append ".npz" to other suffixes
        np.savez(f, labels=labels.numpy().astype(np.int32), centroids=centroids.numpy())


def load_cluster_table(path: str | Path, num_image_tokens: int) -> torch.Tensor:
    """Cluster label per image code, checked against the vocabulary's image range. Reads the
    released tables as they are (CogVideo's `cluster_label2.npy`, CogView2's `cluster_label.npy`:
    one int64 array [20000] of labels 0..499) and the `.npz` of `cogvideo-clusters`; never
    unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster table not found: {path} (compute it with cogvideo-clusters)")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                data = data["labels"]
        labels = np.asarray(data)
    except Exception as err:
        raise ValueError(
            f"{path}: not a cluster table (.npy array of labels, or .npz with 'labels'): "
            f"{type(err).__name__}: {err}"
        ) from None
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: cluster labels must be integers, got {labels.dtype}")
    labels = torch.from_numpy(labels.astype(np.int64))
    if labels.ndim != 1 or len(labels) != num_image_tokens or labels.min() < 0:
        raise ValueError(
            f"{path}: labels shape {list(labels.shape)} do not cover the "
            f"{num_image_tokens} image codes of this model"
        )
    return labels


def codebook_of(image_tokenizer_path: str) -> torch.Tensor:
    from cogvideo.tokenizers.loading import load_image_tokenizer

    return torch.as_tensor(load_image_tokenizer(image_tokenizer_path).codebook()).float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="k-means cluster table of an image tokenizer's codebook")
    parser.add_argument("--image-tokenizer", required=True, help="image tokenizer file")
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    codebook = codebook_of(args.image_tokenizer)
    labels, centroids = kmeans(codebook, args.clusters, args.iters, args.seed)
    save_cluster_table(args.out, labels, centroids)
    sizes = torch.bincount(labels, minlength=args.clusters)
    print(
        f"{args.out}: {len(labels)} codes in {args.clusters} clusters (sizes {int(sizes.min())}..{int(sizes.max())})"
    )


if __name__ == "__main__":
    main()
