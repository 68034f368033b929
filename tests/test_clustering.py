"""k-means, bit masks and the BRCD groups."""
import pytest
import torch

from brcd.clustering import bit_masks, kmeans, nearest_centroid, negative_groups


def clustered_codes(n=1200, bits=32, k=6, flip=0.08, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, bits, generator=g).sign()
    labels = torch.randint(0, k, (n,), generator=g)
    codes = centers[labels] * torch.where(torch.rand(n, bits, generator=g) < flip, -1.0, 1.0)
    return codes, labels, centers


def test_kmeans_recovers_planted_clusters():
    codes, labels, _ = clustered_codes()
    result = kmeans(codes, 6, restarts=5, seed=0)
    centroids, assign, inertia = result
    assert centroids.shape == (6, 32) and assign.shape == (1200,)
    # No worse than the planted partition, and each planted cluster maps to its own found cluster.
    means = torch.stack([codes[labels == c].mean(0) for c in range(6)])
    planted = float(((codes - means[labels]) ** 2).sum())
    assert inertia <= planted * 1.001
    majority = [int(torch.mode(assign[labels == c]).values) for c in range(6)]
    assert sorted(majority) == list(range(6))
    assert torch.equal(nearest_centroid(codes, centroids), assign)
    assert inertia == pytest.approx(float(((codes - centroids[assign]) ** 2).sum()), rel=1e-5)
    # Deterministic for a seed.
    again = kmeans(codes, 6, restarts=5, seed=0)
    assert torch.equal(again.assignments, assign)


@pytest.mark.parametrize("real", [False, True])
def test_plus_plus_init_takes_the_candidate_of_least_potential(real):
    """The greedy k-means++ start scores all of a step's candidates in one product; it must pick what scoring them
    one at a time picks (the lowest total squared distance, the first of equals), from the same random draws."""
    import math

    from brcd.clustering import _plus_plus_init, _sq_dist_argmin

    g = torch.Generator().manual_seed(4)
    x = torch.randn(700, 24, generator=g)
    x = x if real else x.sign()
    k = 12
    got = _plus_plus_init(x, k, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    trials = 2 + int(math.log(k))
    first = torch.randint(x.shape[0], (1,), generator=gen).item()
    want = [x[first]]
    _, d = _sq_dist_argmin(x, x[first : first + 1])
    for _ in range(1, k):
        candidates = torch.multinomial(d / float(d.sum()), trials, replacement=True, generator=gen)
        scored = [torch.minimum(d, _sq_dist_argmin(x, x[c : c + 1])[1]) for c in candidates.tolist()]
        best = min(range(trials), key=lambda t: float(scored[t].double().sum()))
        want.append(x[int(candidates[best])])
        d = scored[best]
    assert torch.equal(got, torch.stack(want))


def test_kmeans_more_restarts_never_worse():
    codes, _, _ = clustered_codes(k=10, flip=0.3, seed=1)
    one = kmeans(codes, 10, restarts=1, seed=3).inertia
    many = kmeans(codes, 10, restarts=4, seed=3).inertia
    assert many <= one + 1e-6


def test_kmeans_with_duplicates_keeps_every_cluster():
    codes = torch.ones(50, 8)
    codes[:3] = -1
    result = kmeans(codes, 4, restarts=2, seed=0)
    assert torch.bincount(result.assignments, minlength=4).min() >= 0
    assert result.centroids.shape == (4, 8) and torch.isfinite(result.centroids).all()


def test_bit_mask_rule_and_margin():
    # Cluster 0: bits 0-3 always +1, bits 4-7 split half/half; cluster 1: all -1.
    codes = torch.tensor([[1, 1, 1, 1, 1, 1, -1, -1], [1, 1, 1, 1, -1, -1, 1, 1]] * 3 + [[-1] * 8] * 4,
                         dtype=torch.float32)
    assign = torch.tensor([0] * 6 + [1] * 4)
    masks = bit_masks(codes, assign, 3, margin=0.1)
    assert masks[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert masks[1].tolist() == [1] * 8
    assert masks[2].tolist() == [1] * 8  # empty cluster keeps every bit
    # |mean| = 1/3 on a bit: dropped at margin 0.5, kept at 0.1.
    codes2 = torch.tensor([[1.0], [1.0], [-1.0]])
    assert bit_masks(codes2, torch.zeros(3, dtype=torch.long), 1, margin=0.5).item() == 0
    assert bit_masks(codes2, torch.zeros(3, dtype=torch.long), 1, margin=0.1).item() == 1
    with pytest.raises(ValueError, match="margin"):
        bit_masks(codes2, torch.zeros(3, dtype=torch.long), 1, margin=1.5)
    with pytest.raises(ValueError, match="assignments"):
        bit_masks(codes2, torch.full((3,), 4), 1)


def test_negative_groups_modes():
    c = torch.tensor([0, 1, 2, 1])
    cv = torch.tensor([0, 2, 2, 1])
    rg, cg, alpha = negative_groups(c, cv, base_alpha=0.8, mode="offset+fn")
    assert rg.tolist() == [0, 1, 2, 1, 0, 1, 2, 1]
    assert cg.tolist() == [0, 1, 2, 1, 0, 2, 2, 1]
    assert alpha.tolist() == pytest.approx([0.8, 1.0, 0.8, 0.8])
    rg, cg, alpha = negative_groups(c, cv, base_alpha=0.5, mode="fn")
    assert torch.equal(rg, cg) and alpha.tolist() == [0.5] * 4
    rg, cg, alpha = negative_groups(c, cv, mode="none")
    assert rg is None and cg is None
    rg, cg, alpha = negative_groups(c, cv, base_alpha=0.8, mode="offset")
    assert rg is None and cg is None and alpha.tolist() == pytest.approx([0.8, 1.0, 0.8, 0.8])
    with pytest.raises(ValueError, match="mode"):
        negative_groups(c, cv, mode="all")
    # The trainer passes this alpha to brcd_loss unchecked (check_alpha=False): base_alpha is checked here.
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="base_alpha"):
            negative_groups(c, cv, base_alpha=bad)


def test_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.randn(5, 4), 6)
    with pytest.raises(ValueError, match="codes"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match="bits"):
        nearest_centroid(torch.randn(5, 4), torch.randn(2, 3))
