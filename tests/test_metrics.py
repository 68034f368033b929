"""Retrieval metrics: the original's mAP vectors, a brute-force reference, label forms and both paradigms."""
import numpy as np
import pytest
import torch

import brcd
from brcd import metrics
from brcd import reference as ref
from conftest import device_params


def labelled_codes(n, nbits, classes, gen, flip=0.2):
    labels = torch.randint(0, classes, (n,), generator=gen)
    centers = torch.randn(classes, nbits, generator=gen).sign()
    codes = centers[labels] * torch.where(torch.rand(n, nbits, generator=gen) < flip, -1.0, 1.0)
    return codes, labels


@pytest.mark.parametrize("device", device_params())
def test_reference_map_vectors(reference_cases, device):
    cases = [c for c in reference_cases if c["kind"] == "map"]
    assert cases
    for c in cases:
        got = metrics.mean_average_precision(c["query_codes"].to(device), c["db_codes"].to(device),
                                             c["query_labels"].to(device), c["db_labels"].to(device),
                                             topk=int(c["topk"]))
        assert abs(got - float(c["map"])) <= 1e-12


def brute_force_map(qc, dc, ql, dl, topk):
    """An independent NumPy mAP: full distance matrix, stable sort (ties to the smaller index)."""
    q = (qc.numpy() > 0).astype(np.int64)
    d = (dc.numpy() > 0).astype(np.int64)
    dist = (q[:, None, :] != d[None, :, :]).sum(-1)
    rel = (ql.numpy()[:, None] == dl.numpy()[None, :]) if ql.dim() == 1 else (ql.numpy() @ dl.numpy().T > 0)
    aps = []
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")[:topk]
        r = rel[i, order].astype(float)
        if r.sum() == 0:
            aps.append(0.0)
            continue
        aps.append(float(((np.cumsum(r) / np.arange(1, len(r) + 1)) * r).sum() / r.sum()))
    return float(np.mean(aps))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("nbits,topk", [(16, 50), (33, None), (64, 1000)])
def test_map_matches_brute_force(device, nbits, topk):
    gen = torch.Generator().manual_seed(nbits)
    qc, ql = labelled_codes(40, nbits, 5, gen)
    dc, dl = labelled_codes(700, nbits, 5, gen)
    want = brute_force_map(qc, dc, ql, dl, topk or 700)
    got = metrics.mean_average_precision(qc.to(device), dc.to(device), ql.to(device), dl.to(device), topk=topk)
    assert abs(got - want) <= 1e-12
    # Packed codes and one-hot labels give the same number.
    onehot = lambda x: torch.nn.functional.one_hot(x, 5)
    got2 = metrics.mean_average_precision(brcd.pack_codes(qc), brcd.pack_codes(dc), onehot(ql), onehot(dl), topk)
    assert abs(got2 - want) <= 1e-12
    assert abs(ref.mean_average_precision(qc, dc, ql, dl, topk) - want) <= 1e-12


def test_multi_hot_labels():
    gen = torch.Generator().manual_seed(1)
    qc, dc = torch.randn(30, 32, generator=gen), torch.randn(400, 32, generator=gen)
    ql = (torch.rand(30, 70, generator=gen) < 0.05).long()  # 70 classes: beyond one machine word
    dl = (torch.rand(400, 70, generator=gen) < 0.05).long()
    ql[0] = 0  # a query with no label: nothing relevant, scores 0
    aps = metrics.average_precisions(qc, dc, ql, dl, topk=100)
    assert aps[0] == 0
    assert abs(float(aps.mean()) - brute_force_map(qc, dc, ql.double(), dl.double(), 100)) <= 1e-12
    # The op reads labels of any real dtype (a label is a value > 0) and any strides, as it reads codes.
    qp, dp = brcd.pack_codes(qc), brcd.pack_codes(dc)
    want = torch.ops.brcd.average_precision(qp, dp, ql > 0, dl > 0, 100)
    scaled = lambda x: torch.where(x > 0, 0.7, -1.0).to(torch.float16)  # negatives and zeros are no label
    strided = lambda x: x.T.contiguous().T  # the same values, column-major
    for q_labels, d_labels in ((scaled(ql), scaled(dl)), (strided(ql), strided(dl)), (ql.to(torch.int8), dl.bool())):
        got = torch.ops.brcd.average_precision(qp, dp, q_labels, d_labels, 100)
        assert torch.equal(got, want)


@pytest.mark.parametrize("labels", ["ids", "multi-hot"])
def test_average_precisions_of_the_gpu_path_on_cpu_tensors(labels):
    """The torch-ops twin of the CPU AP op (what GPUs run) agrees with it and with brute force, ties included."""
    gen = torch.Generator().manual_seed(7)
    qc, dc = torch.randn(40, 24, generator=gen), torch.randn(700, 24, generator=gen)
    dc[100:200] = dc[5]  # heavy ties
    if labels == "ids":
        ql, dl = torch.randint(0, 6, (40,), generator=gen), torch.randint(0, 6, (700,), generator=gen)
    else:
        ql, dl = (torch.rand(40, 70, generator=gen) < 0.05).long(), (torch.rand(700, 70, generator=gen) < 0.05).long()
    qp, dp, ql_, dl_ = metrics._prepare(qc, dc, ql, dl)
    for k in (1, 37, 700):
        by_ops = metrics._average_precisions_by_ops(qp, dp, ql_, dl_, k)
        by_op = torch.ops.brcd.average_precision(qp, dp, ql_, dl_, k)
        assert torch.allclose(by_ops, by_op, rtol=0, atol=1e-12)
        exact = (ql, dl) if labels == "ids" else (ql.double(), dl.double())
        want = brute_force_map(qc, dc, *exact, k)
        assert abs(float(by_ops.mean()) - want) <= 1e-12


def test_precision_metrics_against_brute_force():
    gen = torch.Generator().manual_seed(2)
    qc, ql = labelled_codes(25, 12, 4, gen, flip=0.15)
    dc, dl = labelled_codes(300, 12, 4, gen, flip=0.15)
    dist = ref.hamming_distance(ref.pack_codes(qc), ref.pack_codes(dc))
    rel = ql[:, None] == dl[None, :]
    # P@k
    _, idx = ref.hamming_topk(ref.pack_codes(qc), ref.pack_codes(dc), 20)
    want = float(torch.gather(rel, 1, idx).double().mean())
    assert abs(metrics.precision_at_k(qc, dc, ql, dl, 20) - want) <= 1e-12
    # precision within radius 2; a query that retrieves nothing scores 0
    inside = dist <= 2
    per_q = torch.where(inside.sum(1) > 0, (inside & rel).sum(1).double() / inside.sum(1).clamp_min(1), 0.0)
    assert abs(metrics.precision_within_radius(qc, dc, ql, dl, radius=2) - float(per_q.double().mean())) <= 1e-12
    # PR curve at radius 3
    curve = metrics.precision_recall_curve(qc, dc, ql, dl)
    inside = dist <= 3
    got_p = float(curve["precision"][3])
    has = inside.sum(1) > 0
    want_p = float(((inside & rel).sum(1)[has].double() / inside.sum(1)[has]).mean())
    want_r = float(((inside & rel).sum(1).double() / rel.sum(1)).mean())
    assert abs(got_p - want_p) <= 1e-12 and abs(float(curve["recall"][3]) - want_r) <= 1e-12
    assert abs(float(curve["recall"][-1]) - 1.0) <= 1e-12


@pytest.mark.parametrize("nbits,n", [(1, 50), (7, 300), (64, 20_000), (130, 2000)])
@pytest.mark.parametrize("labels", ["ids", "multi-hot"])
def test_distance_histograms_match_brute_force(nbits, n, labels):
    """The CPU op behind the PR curve and precision within a radius: per query, the count of codes and of relevant
    codes at each distance, exactly; n = 20,000 crosses the scan's chunks of the database. Its torch-ops twin (the
    GPU path) agrees too."""
    gen = torch.Generator().manual_seed(nbits + n)
    qp = ref.pack_codes(torch.randn(11, nbits, generator=gen))
    dp = ref.pack_codes(torch.randn(n, nbits, generator=gen))
    dp[n // 3 : n // 2] = dp[0]  # heavy ties
    if labels == "ids":
        ql, dl = torch.randint(0, 5, (11,), generator=gen), torch.randint(0, 5, (n,), generator=gen)
        rel = ql[:, None] == dl[None, :]
    else:
        ql, dl = torch.rand(11, 70, generator=gen) < 0.05, torch.rand(n, 70, generator=gen) < 0.05
        rel = (ql.double() @ dl.double().T) > 0
    dist = ref.hamming_distance(qp, dp).long()
    width = 8 * qp.shape[1] + 1
    want_all = torch.stack([torch.bincount(d, minlength=width) for d in dist])
    want_rel = torch.stack([torch.bincount(d[r], minlength=width) for d, r in zip(dist, rel)])
    all_counts, rel_counts = torch.ops.brcd.distance_histograms(qp, dp, ql, dl)
    assert torch.equal(all_counts, want_all) and torch.equal(rel_counts, want_rel)
    by_ops = metrics._radius_histograms_by_ops(qp, dp, ql, dl)
    assert torch.equal(by_ops[0], want_all) and torch.equal(by_ops[1], want_rel)
    with pytest.raises(ValueError, match="db_labels"):
        torch.ops.brcd.distance_histograms(qp, dp, ql, dl[:-1])


def test_two_paradigms():
    gen = torch.Generator().manual_seed(3)
    student_q, ql = labelled_codes(20, 32, 4, gen)
    student_db, dl = labelled_codes(200, 32, 4, gen)
    teacher_db = student_db.clone()
    teacher_db[:, :8] *= -1
    out = metrics.evaluate_paradigms(student_q, student_db, teacher_db, ql, dl, topk=50)
    assert out["map_symmetric"] == metrics.mean_average_precision(student_q, student_db, ql, dl, 50)
    assert out["map_asymmetric"] == metrics.mean_average_precision(student_q, teacher_db, ql, dl, 50)


def test_metric_bad_input():
    qc, dc = torch.randn(3, 16), torch.randn(10, 16)
    ql, dl = torch.arange(3), torch.arange(10)
    with pytest.raises(ValueError, match="db_labels"):
        metrics.mean_average_precision(qc, dc, ql, dl[:9])
    with pytest.raises(ValueError, match="query_labels"):
        metrics.mean_average_precision(qc, dc, ql[:2], dl)
    with pytest.raises(ValueError, match="bit count"):
        metrics.mean_average_precision(qc, torch.randn(10, 24), ql, dl)
    with pytest.raises(ValueError, match="empty"):
        metrics.mean_average_precision(qc, dc[:0], ql, dl[:0])
    with pytest.raises(ValueError, match="topk must be a positive integer or None, got 0"):  # above n: the whole
        metrics.mean_average_precision(qc, dc, ql, dl, topk=0)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match=f"topk must be an int or None, got {type(bad).__name__}"):
            metrics.mean_average_precision(qc, dc, ql, dl, topk=bad)
    whole = metrics.mean_average_precision(qc, dc, ql, dl, topk=5)
    assert metrics.mean_average_precision(qc, dc, ql, dl, topk=np.int64(5)) == whole  # NumPy integers are integers
    with pytest.raises(ValueError, match="k must be an integer between 1 and the database size 10, got 11"):
        metrics.precision_at_k(qc, dc, ql, dl, 11)
    with pytest.raises(ValueError, match="classes"):
        metrics.mean_average_precision(qc, dc, torch.eye(3), torch.ones(10, 4))


def test_candidate_lists_survive_a_misleading_sample():
    """The CPU top-k and AP guess a distance bound from a strided sample of the database. Here the sampled codes are
    copies of the query and every other code is far: the bound admits too few codes and the scan must widen it."""
    nbits, n, k = 64, 16384, 3000
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(1, nbits, generator=gen).sign()
    db = torch.randn(n, nbits, generator=gen).sign()
    db[:, :30] = -query[:, :30]  # distance >= 30 from the query ...
    # ... except every 8th block of 8 codes, which holds every block a strided sample of the database reads.
    sampled = torch.arange(n).view(-1, 8)[::8].flatten()
    db[sampled] = query
    labels = torch.randint(0, 3, (n,), generator=gen)
    qp, dp = brcd.pack_codes(query), brcd.pack_codes(db)
    d, i = brcd.hamming_topk(qp, dp, k)
    rd, ri = ref.hamming_topk(qp, dp, k)
    assert torch.equal(d, rd) and torch.equal(i, ri)
    want = brute_force_map(query, db, labels[:1], labels, k)
    assert abs(metrics.mean_average_precision(query, db, labels[:1], labels, topk=k) - want) <= 1e-12


@pytest.mark.parametrize("topk", [300, 2500])
def test_map_on_a_database_large_enough_to_sample(topk):
    gen = torch.Generator().manual_seed(topk)
    qc, ql = labelled_codes(37, 32, 6, gen)
    dc, dl = labelled_codes(9000, 32, 6, gen)
    want = brute_force_map(qc, dc, ql, dl, topk)
    assert abs(metrics.mean_average_precision(qc, dc, ql, dl, topk=topk) - want) <= 1e-12
    multi = torch.nn.functional.one_hot(dl, 6) | (torch.rand(9000, 6, generator=gen) < 0.2).long()
    qmulti = torch.nn.functional.one_hot(ql, 6)
    want = brute_force_map(qc, dc, qmulti.double(), multi.double(), topk)
    assert abs(metrics.mean_average_precision(qc, dc, qmulti, multi, topk=topk) - want) <= 1e-12


@pytest.mark.parametrize("nbits", [300, 16])
def test_candidate_scans_without_packed_keys(nbits):
    """The AVX-512 candidate scan appends (index, distance) as one packed key where both fit: codes of at most 256
    bits and databases of at most 2^22 codes. Longer codes (300 bits) and a database past 2^22 codes (16 bits) take
    the unpacked path: same rankings and AP."""
    gen = torch.Generator().manual_seed(nbits)
    n = 5000 if nbits > 64 else (1 << 22) + 37
    qc, ql = labelled_codes(3, nbits, 4, gen)
    dc, dl = labelled_codes(n, nbits, 4, gen)
    k = 300 if nbits > 64 else 70_000  # dense enough for the candidate scan (k >= n / 64)
    qp, dp = brcd.pack_codes(qc), brcd.pack_codes(dc)
    d, i = brcd.hamming_topk(qp, dp, k)
    rd, ri = ref.hamming_topk(qp, dp, k)
    assert torch.equal(d, rd) and torch.equal(i, ri)
    want = brute_force_map(qc, dc, ql, dl, 200)
    assert abs(metrics.mean_average_precision(qp, dp, ql, dl, topk=200) - want) <= 1e-12


def test_map_with_class_ids_of_any_size():
    """Small class ids take the per-class member sets of the CPU AP op, others a direct comparison: same value."""
    gen = torch.Generator().manual_seed(7)
    qc, ql = labelled_codes(25, 24, 4, gen)
    dc, dl = labelled_codes(3000, 24, 4, gen)
    want = metrics.mean_average_precision(qc, dc, ql, dl, topk=200)
    assert abs(want - brute_force_map(qc, dc, ql, dl, 200)) <= 1e-12
    for shift in (10**6, -7):
        assert abs(metrics.mean_average_precision(qc, dc, ql * 7 + shift, dl * 7 + shift, topk=200) - want) <= 1e-12
    ql2 = ql.clone()
    ql2[0] = 99  # a class no database item has: that query scores 0
    aps = metrics.average_precisions(qc, dc, ql2, dl, topk=200)
    assert aps[0] == 0


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("labels", ["ids", "multi-hot"])
@pytest.mark.parametrize("max_k", [1, 37, 1000])
def test_precision_recall_at_k_against_the_reference(device, labels, max_k):
    gen = torch.Generator().manual_seed(max_k)
    qc, ql = labelled_codes(23, 16, 5, gen, flip=0.2)
    dc, dl = labelled_codes(400, 16, 5, gen, flip=0.2)
    dc[200:300] = dc[:100]  # ties, ranked by index
    ql[0] = 7  # a class the database lacks: precision 0 at every N, and no part in the recall
    if labels == "multi-hot":
        ql, dl = [torch.nn.functional.one_hot(x, 8) | (torch.rand(len(x), 8, generator=gen) < 0.2).long()
                  for x in (ql, dl)]
        ql[0] = 0
        ql[0, 7] = 1
        dl[:, 7] = 0
    got = metrics.precision_recall_at_k(qc.to(device), dc.to(device), ql.to(device), dl.to(device), max_k=max_k)
    want_p, want_r = ref.precision_recall_at_k(qc, dc, ql, dl, max_k)
    k = min(max_k, 400)
    assert torch.equal(got["k"], torch.arange(1, k + 1))
    assert got["precision"].dtype == torch.float64 and got["precision"].device.type == "cpu"
    torch.testing.assert_close(got["precision"], want_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(got["recall"], want_r, rtol=0, atol=1e-12)
    assert abs(metrics.precision_at_k(qc, dc, ql, dl, k) - float(want_p[-1])) <= 1e-12
    if k == 400:  # the whole database: every relevant item found
        assert abs(float(got["recall"][-1]) - 1.0) <= 1e-12


def test_precision_recall_at_k_chunks_and_bad_input(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    qc, ql = labelled_codes(30, 16, 4, gen, flip=0.2)
    dc, dl = labelled_codes(200, 16, 4, gen, flip=0.2)
    whole = metrics.precision_recall_at_k(qc, dc, ql, dl, max_k=50)
    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 1)  # one query per chunk, in the ranking and the relevant counts
    chunked = metrics.precision_recall_at_k(qc, dc, ql, dl, max_k=50)
    for key in ("precision", "recall"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=1e-12)
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_k"):
            metrics.precision_recall_at_k(qc, dc, ql, dl, max_k=bad)
    with pytest.raises(ValueError, match="k must be"):
        metrics.precision_at_k(qc, dc, ql, dl, 201)


def test_ndcg_of_a_ranking_worked_by_hand():
    # Query code 000; database codes at distances 0, 1, 1, 3 (the two at distance 1 ranked by index).
    q = torch.tensor([[-1.0, -1.0, -1.0]])
    db = torch.tensor([[-1.0, -1, -1], [1, -1, -1], [-1, 1, -1], [1, 1, 1]])
    ql = torch.tensor([[1, 1, 0]])
    dl = torch.tensor([[0, 0, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])  # shared labels 0, 1, 2, 2
    gains = [0, 1, 3, 3]
    log2 = np.log2
    dcg = lambda g: sum(x / log2(i + 2) for i, x in enumerate(g))
    for k in (1, 2, 3, 4):
        want = dcg(gains[:k]) / dcg(sorted(gains, reverse=True)[:k])
        assert abs(metrics.ndcg_at_k(q, db, ql, dl, k) - want) <= 1e-15
    assert metrics.ndcg_at_k(q, db, torch.tensor([[0, 0, 0]]), dl, 2) == 0.0  # nothing relevant: 0
    assert metrics.ndcg_at_k(db, db, dl, dl, 1) == 1.0  # each item finds itself first


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("labels", ["ids", "multi-hot", "ids-against-multi-hot"])
@pytest.mark.parametrize("nbits,k", [(7, 1), (16, 37), (65, 400)])
def test_ndcg_against_the_reference(device, labels, nbits, k):
    gen = torch.Generator().manual_seed(nbits)
    qc, ql = labelled_codes(23, nbits, 5, gen, flip=0.2)
    dc, dl = labelled_codes(400, nbits, 5, gen, flip=0.2)
    dc[200:300] = dc[:100]  # ties, ranked by index
    if labels != "ids":
        dl = torch.nn.functional.one_hot(dl, 8) | (torch.rand(400, 8, generator=gen) < 0.3).long()
    if labels == "multi-hot":
        ql = torch.nn.functional.one_hot(ql, 8) | (torch.rand(23, 8, generator=gen) < 0.3).long()
        ql[0] = 0  # a query that shares nothing with the database scores 0
    want = ref.ndcg_at_k(qc, dc, ql, dl, k)
    got = metrics.ndcg_at_k(qc.to(device), dc.to(device), ql.to(device), dl.to(device), k)
    assert abs(got - want) <= 1e-12 and 0 < got < 1
    packed = metrics.ndcg_at_k(brcd.pack_codes(qc), brcd.pack_codes(dc), ql, dl, k)
    assert abs(packed - want) <= 1e-12


def test_ndcg_with_class_ids_of_any_value():
    """Class ids need not be small or positive; a query whose class the database lacks scores 0."""
    gen = torch.Generator().manual_seed(6)
    qc, ql = labelled_codes(20, 24, 3, gen, flip=0.25)
    dc, dl = labelled_codes(250, 24, 3, gen, flip=0.25)
    values = torch.tensor([-5, 300, 7])
    ql, dl = values[ql], values[dl]
    ql[:4] = 999  # in no database item's class
    for k in (1, 30, 250):
        want = ref.ndcg_at_k(qc, dc, ql, dl, k)
        assert abs(metrics.ndcg_at_k(qc, dc, ql, dl, k) - want) <= 1e-12 and want > 0
    assert metrics.ndcg_at_k(qc[:4], dc, ql[:4], dl, 30) == 0.0


def test_ndcg_chunks_and_bad_input(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    qc, ql = labelled_codes(30, 16, 4, gen, flip=0.2)
    dc, dl = labelled_codes(200, 16, 4, gen, flip=0.2)
    whole = metrics.ndcg_at_k(qc, dc, ql, dl, 50)
    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 1)  # one query per chunk
    assert abs(metrics.ndcg_at_k(qc, dc, ql, dl, 50) - whole) <= 1e-12
    for bad in (0, 201):
        with pytest.raises(ValueError, match="k must be an integer between 1 and the database size 200"):
            metrics.ndcg_at_k(qc, dc, ql, dl, bad)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="k must be an int"):
            metrics.ndcg_at_k(qc, dc, ql, dl, bad)
    with pytest.raises(ValueError, match="db_labels"):
        metrics.ndcg_at_k(qc, dc, ql, dl[:5], 5)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("labels", ["ids", "multi-hot"])
@pytest.mark.parametrize("topk", [None, 1, 37, 5000])
def test_retrieval_scores_equal_each_metric_alone(device, labels, topk):
    gen = torch.Generator().manual_seed(11)
    qc, ql = labelled_codes(31, 20, 5, gen, flip=0.2)
    dc, dl = labelled_codes(300, 20, 5, gen, flip=0.2)
    dc[150:200] = dc[:50]  # ties
    if labels == "multi-hot":
        ql = torch.nn.functional.one_hot(ql, 7) | (torch.rand(31, 7, generator=gen) < 0.3).long()
        dl = torch.nn.functional.one_hot(dl, 7) | (torch.rand(300, 7, generator=gen) < 0.3).long()
    on = [t.to(device) for t in (qc, dc, ql, dl)]
    got = metrics.retrieval_scores(*on, topk=topk, radius=3)
    k = 300 if topk is None else min(topk, 300)
    # The same numbers, to the last digit, as each function alone: one ranking serves them all.
    assert got == {"map": metrics.mean_average_precision(*on, topk),
                   f"precision_at_{k}": metrics.precision_at_k(*on, k),
                   f"ndcg_at_{k}": metrics.ndcg_at_k(*on, k),
                   "precision_within_radius_3": metrics.precision_within_radius(*on, radius=3)}
    # And the brute-force reference's, whatever the chunks.
    exact = (ql, dl) if labels == "ids" else (ql.double(), dl.double())
    assert abs(got["map"] - brute_force_map(qc, dc, *exact, k)) <= 1e-12
    assert abs(got[f"ndcg_at_{k}"] - ref.ndcg_at_k(qc, dc, ql, dl, k)) <= 1e-12
    _, idx = ref.hamming_topk(ref.pack_codes(qc), ref.pack_codes(dc), k)
    rel = ql[:, None] == dl[idx] if labels == "ids" else (ql[:, None, :] & dl[idx]).any(-1)
    assert got[f"precision_at_{k}"] == int(rel.sum()) / (k * 31)


def test_retrieval_scores_chunks_and_bad_input(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    qc, ql = labelled_codes(30, 16, 4, gen, flip=0.2)
    dc, dl = labelled_codes(200, 16, 4, gen, flip=0.2)
    whole = metrics.retrieval_scores(qc, dc, ql, dl, topk=50)
    monkeypatch.setattr(metrics, "_CHUNK_BYTES", 1)  # one query per chunk
    chunked = metrics.retrieval_scores(qc, dc, ql, dl, topk=50)
    assert chunked.keys() == whole.keys() and all(abs(chunked[key] - whole[key]) <= 1e-12 for key in whole)
    assert chunked["precision_at_50"] == whole["precision_at_50"]  # an exact count either way
    for bad in (0, -3):
        with pytest.raises(ValueError, match="topk must be a positive integer or None"):
            metrics.retrieval_scores(qc, dc, ql, dl, topk=bad)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="topk must be an int or None"):
            metrics.retrieval_scores(qc, dc, ql, dl, topk=bad)
    with pytest.raises(ValueError, match="radius must be a non-negative Hamming distance"):
        metrics.retrieval_scores(qc, dc, ql, dl, radius=-1)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="radius must be an int"):
            metrics.precision_within_radius(qc, dc, ql, dl, radius=bad)
    with pytest.raises(ValueError, match="query_codes is empty"):
        metrics.retrieval_scores(qc[:0], dc, ql[:0], dl)
    with pytest.raises(ValueError, match="query_codes is empty"):
        metrics.precision_at_k(qc[:0], dc, ql[:0], dl, 5)


@pytest.mark.parametrize("labels", ["ids", "multi-hot"])
def test_database_label_counts_against_a_broadcast(labels):
    """The relevance, shared-label counts, relevant-item counts and ideal DCGs behind every ranking metric, against a
    broadcast of every query's labels against every item's and a sort."""
    gen = torch.Generator().manual_seed(8)
    if labels == "ids":
        dl = torch.tensor([-3, 7, 400])[torch.randint(0, 3, (500,), generator=gen)].to(torch.int32)
        ql = torch.tensor([-3, 7, 400, 9], dtype=torch.int32)[torch.randint(0, 4, (60,), generator=gen)]  # 9: none
        shared = (dl[None, :] == ql[:, None]).long()
    else:
        dl = torch.rand(500, 6, generator=gen) < 0.3
        dl[:100] = dl[100:200]  # repeated label rows, as a multi-label set has
        ql = torch.rand(60, 6, generator=gen) < 0.3
        ql[0] = False  # shares nothing
        shared = (dl[None, :, :] & ql[:, None, :]).sum(-1)
    discounts = 1.0 / torch.log2(torch.arange(2, 40 + 2, dtype=torch.float64))
    ideal = ((2.0 ** shared.sort(dim=1, descending=True).values[:, :40]) - 1).mul(discounts).sum(1)
    database = metrics._DatabaseLabels(dl)
    chunk = database.of(ql)
    ranked = torch.randint(0, 500, (60, 25), generator=gen)
    assert torch.equal(chunk.relevant(), shared > 0)
    assert torch.equal(chunk.relevant_counts(), (shared > 0).sum(1))
    assert torch.equal(chunk.ranked_shared(ranked).long(), shared.gather(1, ranked))
    torch.testing.assert_close(chunk.ideal_dcgs(discounts), ideal, rtol=1e-14, atol=0)
    # One query per chunk: the same answers (and none for no queries).
    singles = [database.of(ql[i : i + 1]) for i in range(60)]
    assert torch.equal(torch.cat([c.relevant_counts() for c in singles]), (shared > 0).sum(1))
    torch.testing.assert_close(torch.cat([c.ideal_dcgs(discounts) for c in singles]), ideal, rtol=1e-14, atol=0)
    nothing = database.of(ql[:0])
    assert nothing.relevant_counts().shape == (0,) and nothing.ideal_dcgs(discounts).shape == (0,)
    assert database.of(ql[:1]).ideal_dcgs(discounts).item() == (0.0 if labels == "multi-hot" else ideal[0].item())
