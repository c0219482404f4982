"""Sampling strategies against exact distributions computed independently, and the k-means
cluster table command.

A strategy draws by inverse CDF from one uniform number per row (two for the cluster strategy:
cluster, then code). Fed an evenly spaced grid of N numbers u_i = (i + 1/2) / N instead of random
ones, the share of rows that land on a code is its probability to within 1/N: an interval of
length p holds p N +- 1 grid points. Two grids of N1 and N2 (cluster x code) leave each code within
1/N1 + 1/N2 + 1/(N1 N2). So the comparison is with the distribution the strategy defines, not a
sampled estimate, at a tolerance far below the differences between plausible readings of it.
"""

import numpy as np
import pytest
import torch

from cogvideo.sampling import clusters, strategies
from cogvideo.sampling.strategies import (
    ClusterStrategy,
    MinimumErrorStrategy,
    PosteriorMean,
    StrategyOptions,
    TopKStrategy,
    make_strategy,
)

GRID = {1: 2000, 2: 500}  # grid points per uniform draw, by draws per row: within 1/GRID per draw


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def grid(n):
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


def exact_frequencies(strategy, logits_row, monkeypatch, draws=1):
    """Each code's share of GRID**draws rows whose uniform draws sweep an evenly spaced grid
    (draw d of row k: grid point (k // points**(draws - 1 - d)) % points), and the bound on its
    distance from the strategy's distribution."""
    points = GRID[draws]
    rows = points**draws
    calls = iter(range(draws))

    def grid_uniforms(gens, device):
        d = next(calls)
        return grid(points)[(torch.arange(rows) // points ** (draws - 1 - d)) % points].to(device)

    monkeypatch.setattr(strategies, "uniforms", grid_uniforms)
    samples = strategy(logits_row.expand(rows, -1), [None] * rows)
    assert next(calls, None) is None, "the strategy drew fewer uniform numbers than expected"
    bound = draws / points + (draws - 1) / points**2
    return np.bincount(samples.numpy(), minlength=len(logits_row)) / rows, bound


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def test_greedy_is_argmax():
    logits = torch.randn(6, 10)
    assert torch.equal(TopKStrategy(temperature=0)(logits, generators(6)), logits.argmax(-1))


def topk_expected():
    return np.concatenate([softmax(LOGITS.numpy()[:3] / 0.7), np.zeros(5)])


def test_topk_temperature_matches_the_renormalised_softmax(monkeypatch):
    got, bound = exact_frequencies(TopKStrategy(temperature=0.7, top_k=3), LOGITS, monkeypatch)
    np.testing.assert_allclose(got, topk_expected(), rtol=0, atol=bound)


def top_p_expected():
    probs = softmax(LOGITS.numpy())
    keep = int(np.searchsorted(np.cumsum(probs), 0.8) + 1)  # first prefix whose mass reaches 0.8
    return np.concatenate([probs[:keep] / probs[:keep].sum(), np.zeros(8 - keep)])


def test_top_p_keeps_the_smallest_prefix_reaching_p(monkeypatch):
    got, bound = exact_frequencies(TopKStrategy(top_p=0.8), LOGITS, monkeypatch)
    np.testing.assert_allclose(got, top_p_expected(), rtol=0, atol=bound)


CLUSTER_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])


def cluster_expected(temperature=1.2, top_k=2, temperature2=0.6):
    labels, x = CLUSTER_LABELS.numpy(), LOGITS.numpy()
    p = softmax(x / temperature)
    cluster_mass = np.array([p[labels == c].sum() for c in range(4)])
    top = np.argsort(-cluster_mass)[:top_k]
    expected = np.zeros(8)
    for c in top:
        # CogLM (CoglmStrategy in THUDM/CogVideo and SwissArmyTransformer): logits = logits / T,
        # then softmax(logits / T2) inside the chosen cluster, so T2 acts on logits already over T
        inside = softmax(np.where(labels == c, x / temperature / temperature2, -np.inf))
        expected += cluster_mass[c] / cluster_mass[top].sum() * inside
    return expected


def test_cluster_strategy_matches_its_two_step_distribution(monkeypatch):
    strategy = ClusterStrategy(CLUSTER_LABELS, temperature=1.2, top_k=2, temperature2=0.6)
    got, bound = exact_frequencies(strategy, LOGITS, monkeypatch, draws=2)
    np.testing.assert_allclose(got, cluster_expected(), rtol=0, atol=bound)


@pytest.mark.parametrize(
    "broken, expected, draws",
    [
        # T2 applied to the raw logits (the other reading of CogLM's rule): in this code that is
        # temperature2 = T2 / T; the two readings differ by 0.021 on a code, the bound is 4e-3
        (
            ClusterStrategy(CLUSTER_LABELS, temperature=1.2, top_k=2, temperature2=0.6 / 1.2),
            cluster_expected,
            2,
        ),
        (ClusterStrategy(CLUSTER_LABELS, temperature=1.2, top_k=3, temperature2=0.6), cluster_expected, 2),
        (TopKStrategy(temperature=1.0, top_k=3), topk_expected, 1),  # temperature ignored
        (TopKStrategy(temperature=0.7, top_k=4), topk_expected, 1),  # one code too many
        (TopKStrategy(top_p=0.7), top_p_expected, 1),  # a prefix cut one code short
    ],
)
def test_planted_strategy_bugs_fail_the_exact_comparison(broken, expected, draws, monkeypatch):
    got, bound = exact_frequencies(broken, LOGITS, monkeypatch, draws=draws)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got, expected(), rtol=0, atol=bound)


def test_a_row_does_not_depend_on_its_batch_neighbours():
    strategy = TopKStrategy(temperature=1.0, top_k=5)
    logits = torch.randn(4, 30)
    together = strategy(logits, generators(4, seed=3))
    alone = torch.cat([strategy(logits[i : i + 1], [generators(4, seed=3)[i]]) for i in range(4)])
    assert torch.equal(together, alone)


# Minimum expected error decoding, worked by hand: four codes on a line (positions 0, 3, 7, 10,
# laid along the unit vector (0.6, 0.8), so squared distances are those of the positions) and
# p = (0.1, 0.15, 0.25, 0.5): the argmax is code 3.
MBR_CODES = torch.tensor([0.0, 3.0, 7.0, 10.0])[:, None] * torch.tensor([0.6, 0.8])
MBR_LOGITS = torch.tensor([0.1, 0.15, 0.25, 0.5]).log()


@pytest.mark.parametrize(
    "options, expected",
    [
        # sum_j p_j (c_k - c_j)^2 for k = 0..3: 63.6, 29.4, 11.8, 19.6 -> code 2 (the expected
        # position 7.2 is nearest 7), not the argmax 3
        (dict(temperature=1.0), 2),
        # p over the top 2 {3, 2}, renormalised: (2/3, 1/3); risks of codes 2, 3: 6, 3 -> code 3
        # (the expected position 9.0)
        (dict(temperature=1.0, top_k=2), 3),
        # the top-p prefix: 0.5 + 0.25 reaches 0.7, the same two codes -> code 3; without
        # renormalising the expected position would be 6.75, nearest 7 (code 2)
        (dict(temperature=1.0, top_p=0.7), 3),
        # T 0.5: p^2 / 0.345 = (0.029, 0.065, 0.181, 0.725), the expected position 8.71 -> code 3
        (dict(temperature=0.5), 3),
    ],
)
def test_minimum_error_decoding_picks_the_code_of_least_expected_squared_error(options, expected):
    strategy = make_strategy(StrategyOptions(kind="mbr", **options), code_vectors=MBR_CODES)
    assert strategy(MBR_LOGITS.expand(3, -1), generators(3)).tolist() == [expected] * 3


def test_minimum_error_decoding_minimises_the_expected_risk_on_random_rows():
    """Against the risk itself, sum_j p_j ||c_k - c_j||^2 in float64, minimised over k, on rows
    whose best code leads the next by more than float32 can blur (1e-3 of the risk)."""
    gen = torch.Generator().manual_seed(0)
    codes, logits = torch.randn(24, 5, generator=gen) * 3, torch.randn(200, 24, generator=gen) * 2
    for options in (dict(temperature=1.0), dict(temperature=0.8, top_k=5)):
        got = MinimumErrorStrategy(codes, **options)(logits, generators(200))
        probs = (logits.double() / options["temperature"]).softmax(-1)
        if "top_k" in options:
            kth = probs.topk(options["top_k"], -1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        risk = probs @ torch.cdist(codes.double(), codes.double()).pow(2)  # [rows, k]
        best = risk.topk(2, -1, largest=False).values
        clear = best[:, 1] - best[:, 0] > 1e-3 * best[:, 0]
        assert clear.sum() > 150
        assert torch.equal(got[clear], risk.argmin(-1)[clear])
        assert (got != logits.argmax(-1)).any()  # not the greedy code


@pytest.mark.parametrize(
    "broken",
    [
        lambda logits, options: logits.argmax(-1),  # greedy
        lambda logits, options: MinimumErrorStrategy(MBR_CODES, 1.0)(logits, []),  # no truncation, T 1
        # code vectors in another order than the codes (positions 0, 3, 10, 7)
        lambda logits, options: MinimumErrorStrategy(MBR_CODES[[0, 1, 3, 2]], **options)(logits, []),
    ],
)
def test_planted_minimum_error_bugs_fail_the_hand_computed_cases(broken):
    cases = [(dict(temperature=1.0), 2), (dict(temperature=1.0, top_k=2), 3), (dict(temperature=0.5), 3)]
    assert any(broken(MBR_LOGITS[None], o).tolist() != [e] for o, e in cases)


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(temperature=1.0), [0.1, 0.15, 0.25, 0.5]),
        (dict(temperature=1.0, top_k=2), [0, 0, 1 / 3, 2 / 3]),
        (dict(temperature=1.0, top_p=0.7), [0, 0, 1 / 3, 2 / 3]),  # renormalised, as mbr's
        (dict(temperature=0.5), np.array([0.01, 0.0225, 0.0625, 0.25]) / 0.345),  # p^2, renormalised
    ],
)
def test_the_posterior_mean_reads_the_tempered_truncated_distribution(options, expected):
    """kind=mean samples no code: it hands the decoder mbr's distribution (the hand-computed cases
    above), each row summing to 1."""
    strategy = make_strategy(StrategyOptions(kind="mean", **options))
    assert isinstance(strategy, PosteriorMean)
    got = strategy.distribution(MBR_LOGITS.expand(3, -1))
    np.testing.assert_allclose(got.numpy(), np.broadcast_to(expected, (3, 4)), rtol=1e-6, atol=1e-7)


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match="top_k > 0"):
        StrategyOptions(kind="cluster", top_k=0)
    with pytest.raises(ValueError, match="cluster_table"):
        make_strategy(StrategyOptions(kind="cluster", top_k=12))
    with pytest.raises(ValueError, match="top_p"):
        StrategyOptions(top_p=0.0)
    with pytest.raises(ValueError, match="kind=mbr needs temperature > 0"):
        StrategyOptions(kind="mbr", temperature=0)
    with pytest.raises(ValueError, match="kind=mean needs temperature > 0"):
        StrategyOptions(kind="mean", temperature=0)
    with pytest.raises(ValueError, match="code vectors"):
        make_strategy(StrategyOptions(kind="mbr"))
    with pytest.raises(ValueError, match="3 codes, logits have 4"):
        MinimumErrorStrategy(MBR_CODES[:3], 1.0)(MBR_LOGITS[None], [])


def blobs(num_clusters=5, per=40, dim=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=gen) * 20
    truth = torch.arange(num_clusters).repeat_interleave(per)
    return centres[truth] + torch.randn(len(truth), dim, generator=gen), truth


def same_partition(a, b):
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_separated_blobs_and_is_a_lloyd_fixed_point():
    points, truth = blobs()
    labels, centroids = clusters.kmeans(points, 5, seed=1)
    assert same_partition(labels, truth)
    assert torch.equal(torch.cdist(points.double(), centroids.double()).argmin(1), labels)
    for c in range(5):
        torch.testing.assert_close(centroids[c], points[labels == c].mean(0), rtol=0, atol=1e-4)


def test_clusters_command_writes_a_table_the_strategy_loads(tmp_path, monkeypatch):
    points, truth = blobs(num_clusters=4, per=16)
    monkeypatch.setattr(clusters, "codebook_of", lambda path: points)
    out = tmp_path / "clusters.npz"
    clusters.main(["--image-tokenizer", "unused", "--clusters", "4", "--out", str(out)])
    options = StrategyOptions(kind="cluster", top_k=2, temperature=1.0)
    strategy = make_strategy(options, clusters.load_cluster_table(out, 64))
    assert same_partition(strategy.labels, truth)
    with pytest.raises(ValueError, match="do not cover the 100 image codes"):
        clusters.load_cluster_table(out, 100)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        clusters.load_cluster_table(tmp_path / "missing.npz", 64)


def test_the_released_cluster_tables_load_as_they_are(tmp_path):
    # CogVideo's cluster_label2.npy / CogView2's cluster_label.npy: np.save of an int64 array
    # [20000] of labels 0..499 (header {'descr': '<i8', 'shape': (20000,)}); CoglmStrategy
    # reads it with np.load and scatters into 500 clusters
    labels = np.random.default_rng(0).permutation(np.arange(20000) % 500).astype(np.int64)
    released = tmp_path / "cluster_label2.npy"
    np.save(released, labels)
    assert released.read_bytes()[:80].count(b"'descr': '<i8'") == 1
    table = clusters.load_cluster_table(released, 20000)
    assert table.dtype == torch.int64 and torch.equal(table, torch.from_numpy(labels))
    strategy = make_strategy(
        StrategyOptions(kind="cluster", temperature=1.05, top_k=12, temperature2=0.89), table
    )
    assert strategy.num_clusters == 500
    codes = strategy(torch.randn(3, 20000), generators(3))
    assert codes.shape == (3,) and int(codes.max()) < 20000
    pickled = tmp_path / "cluster_label.npy"
    np.save(pickled, np.array([{"labels": labels}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cluster_label.npy: not a cluster table"):  # never unpickled
        clusters.load_cluster_table(pickled, 20000)
