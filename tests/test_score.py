"""`brcd score`: any method's codes and labels from files, scored as brcd.metrics scores the tensors; bad files in
one line naming the flag."""
import json
import pickle

import numpy as np
import pytest
import torch

import brcd
from brcd import cli, metrics
from brcd.code_files import load_codes, load_labels, save_codes, save_labels, save_scores
from brcd.data import DataFileError
from conftest import device_params

BITS = 20


@pytest.fixture(scope="module")
def codes():
    gen = torch.Generator().manual_seed(4)
    centers = torch.randn(5, BITS, generator=gen).sign()
    draw = lambda n: torch.randint(0, 5, (n,), generator=gen)
    ql, dl = draw(40), draw(300)
    noisy = lambda labels: centers[labels] * torch.where(torch.rand(len(labels), BITS, generator=gen) < 0.2, -1.0, 1.0)
    qc, dc = noisy(ql), noisy(dl)
    dc[200:250] = dc[:50]  # ties, ranked by index
    return qc, dc, ql, dl


def save(path, array):
    """Write `array` (a tensor) in the format the suffix names."""
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, array.numpy())
    elif suffix in (".pt", ".pth"):
        torch.save(array, path)
    else:
        delimiter = {".txt": " ", ".tsv": "\t", ".csv": ","}[suffix]
        np.savetxt(path, array.numpy(), delimiter=delimiter, fmt="%g")
    return path


def score(capsys, query_codes, db_codes, query_labels, db_labels, *extra):
    capsys.readouterr()
    status = cli.main(["score", "--query-codes", str(query_codes), "--db-codes", str(db_codes), "--query-labels",
                       str(query_labels), "--db-labels", str(db_labels), *extra])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if status == 0 else err.strip())


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".txt", ".csv", ".tsv"])
@pytest.mark.parametrize("form", ["signs", "zero-one", "real"])
def test_scores_equal_the_metrics_of_the_tensors(codes, tmp_path, capsys, suffix, form):
    qc, dc, ql, dl = codes
    written = {"signs": lambda c: c, "zero-one": lambda c: (c > 0).to(torch.uint8),  # uint8 0/1: bits, not bytes
               "real": lambda c: c * torch.rand(c.shape, generator=torch.Generator().manual_seed(1)).add(0.1)}[form]
    files = [save(tmp_path / f"{name}{suffix}", t)
             for name, t in (("q", written(qc)), ("db", written(dc)), ("ql", ql), ("dl", dl))]
    status, got = score(capsys, *files, "--topk", "50", "--radius", "1")
    assert status == 0
    want = metrics.retrieval_scores(qc, dc, ql, dl, topk=50, radius=1)
    assert got == {"queries": 40, "database": 300, "bits": BITS, "topk": 50, **want}
    assert set(want) == {"map", "precision_at_50", "ndcg_at_50", "precision_within_radius_1"}


def test_packed_codes_in_either_bit_order_and_from_an_index_file(codes, tmp_path, capsys):
    qc, dc, ql, dl = codes
    labels = [save(tmp_path / "ql.npy", ql), save(tmp_path / "dl.npy", dl)]
    want = metrics.retrieval_scores(qc, dc, ql, dl, topk=100)
    for order in ("little", "big"):
        pack = lambda c: torch.from_numpy(np.packbits(c.numpy() > 0, axis=1, bitorder=order))
        files = [save(tmp_path / f"q_{order}.npy", pack(qc)), save(tmp_path / f"db_{order}.txt", pack(dc))]
        status, got = score(capsys, *files, *labels, "--packed", "--topk", "100")
        assert status == 0 and got == {"queries": 40, "database": 300, "code_bytes": 3, "topk": 100, **want}
    index = brcd.HammingIndex(BITS)
    index.add(dc)
    index.save(tmp_path / "db.bhi")
    status, got = score(capsys, save(tmp_path / "q.npy", qc), tmp_path / "db.bhi", *labels, "--topk", "100")
    assert status == 0 and got == {"queries": 40, "database": 300, "bits": BITS, "topk": 100, **want}


def test_multi_hot_labels_whole_database_and_curves(codes, tmp_path, capsys):
    qc, dc, ql, dl = codes
    gen = torch.Generator().manual_seed(5)
    multi = lambda ids: torch.nn.functional.one_hot(ids, 6) | (torch.rand(len(ids), 6, generator=gen) < 0.3).long()
    qm, dm = multi(ql), multi(dl)
    files = [save(tmp_path / "q.npy", qc), save(tmp_path / "db.npy", dc), save(tmp_path / "ql.csv", qm),
             save(tmp_path / "dl.npy", dm.bool())]
    curves_file = tmp_path / "curves.json"
    status, got = score(capsys, *files, "--topk", "all", "--curves", str(curves_file))
    assert status == 0 and got["topk"] == 300
    assert got == {"queries": 40, "database": 300, "bits": BITS, "topk": 300,
                   **metrics.retrieval_scores(qc, dc, qm, dm, topk=None)}
    status, beyond = score(capsys, *files, "--topk", "5000")  # a cutoff past the database: the whole database
    assert beyond == got
    curves = json.loads(curves_file.read_text())
    ball, top_n = metrics.precision_recall_curve(qc, dc, qm, dm), metrics.precision_recall_at_k(qc, dc, qm, dm, 300)
    assert curves["hamming_ball"] == {key: ball[key].tolist() for key in ("radius", "precision", "recall")}
    assert curves["top_n"] == {"n": list(range(1, 301)), "precision": top_n["precision"].tolist(),
                               "recall": top_n["recall"].tolist()}


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_per_query_average_precisions(codes, tmp_path, capsys, suffix):
    """Each query's AP@K, for paired tests between methods: the values behind the printed mAP."""
    qc, dc, ql, dl = codes
    files = [save(tmp_path / f"{name}.npy", t) for name, t in (("q", qc), ("db", dc), ("ql", ql), ("dl", dl))]
    per_query = tmp_path / f"ap{suffix}"
    status, got = score(capsys, *files, "--topk", "50", "--per-query", str(per_query))
    assert status == 0
    aps = torch.from_numpy(np.load(per_query) if suffix == ".npy" else np.loadtxt(per_query, delimiter=","))
    assert torch.equal(aps, metrics.average_precisions(qc, dc, ql, dl, topk=50))  # every digit, text included
    assert aps.shape == (40,) and aps.mean().item() == got["map"]
    status, err = score(capsys, *files, "--per-query", str(tmp_path / "ap.mat"))
    assert status == 2 and "--per-query" in err and "unknown file type '.mat'" in err


@pytest.mark.parametrize("device", device_params())
def test_scores_on_each_device(codes, tmp_path, capsys, device):
    qc, dc, ql, dl = codes
    files = [save(tmp_path / f"{name}.npy", t) for name, t in (("q", qc), ("db", dc), ("ql", ql), ("dl", dl))]
    status, got = score(capsys, *files, "--topk", "50", "--device", device)
    want = metrics.retrieval_scores(qc, dc, ql, dl, topk=50)  # on the CPU
    assert status == 0 and got.keys() == {"queries", "database", "bits", "topk", *want}
    assert all(abs(got[key] - want[key]) <= 1e-12 for key in want)


def test_a_config_file(codes, tmp_path, capsys):
    qc, dc, ql, dl = codes
    files = [save(tmp_path / f"{name}.npy", t) for name, t in (("q", qc), ("db", dc), ("ql", ql), ("dl", dl))]
    config = tmp_path / "score.yaml"
    config.write_text("".join(f"{flag}: {path}\n" for flag, path in
                              zip(("query-codes", "db-codes", "query_labels", "db_labels"), files)) + "topk: all\n")
    capsys.readouterr()
    assert cli.main(["score", "--config", str(config), "--radius", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"queries": 40, "database": 300, "bits": BITS, "topk": 300,
                   **metrics.retrieval_scores(qc, dc, ql, dl, topk=None, radius=0)}


def bad_files(tmp_path, codes):
    """(what to pass instead of a good file, which flag, the message expected) for each kind of bad file."""
    qc, dc, ql, dl = codes
    nan = qc.clone()
    nan[3, 4] = float("nan")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    a_dict = tmp_path / "dict.pt"
    torch.save({"codes": qc}, a_dict)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps("not a tensor")[:5])
    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["a", "b"]]))
    return [
        (tmp_path / "missing.npy", "--query-codes", "no such file"),
        (tmp_path / "codes.mat", "--query-codes", "unknown file type '.mat'; known: .npy, .pt, .pth, .txt, .tsv, "
                                                  ".csv, .bhi"),
        (save(tmp_path / "flat.npy", qc[:, 0]), "--query-codes", "expected a [n, columns] array, found shape (40,)"),
        (save(tmp_path / "nan.npy", nan), "--query-codes", "NaN or infinite"),
        (pickled, "--query-codes", "cannot be read as a .npy array"),
        (a_dict, "--db-codes", "expected one tensor saved with torch.save, found dict"),
        (garbage, "--db-codes", "cannot be read as a .pt array"),
        (strings, "--db-codes", "expected numbers, found an array of <U1"),
        (save(tmp_path / "none.npy", qc[:0]), "--query-codes", "holds no codes"),
        (save(tmp_path / "wide.npy", torch.cat([dc, dc[:, :4]], 1)), "--db-codes",
         "--query-codes holds codes of 20 bits but --db-codes of 24 bits (files of packed bytes need --packed)"),
        (empty, "--query-labels", "0 rows of labels for 40 codes"),
        (save(tmp_path / "few.npy", dl[:299]), "--db-labels", "299 rows of labels for 300 codes"),
        (save(tmp_path / "half.npy", ql.double() + 0.5), "--query-labels", "found fractional values"),
        (save(tmp_path / "cube.npy", torch.zeros(40, 2, 2)), "--query-labels", "found shape (40, 2, 2)"),
    ]


def test_bad_files_fail_in_one_line_naming_the_flag(codes, tmp_path, capsys):
    qc, dc, ql, dl = codes
    good = {"--query-codes": save(tmp_path / "q.npy", qc), "--db-codes": save(tmp_path / "db.npy", dc),
            "--query-labels": save(tmp_path / "ql.npy", ql), "--db-labels": save(tmp_path / "dl.npy", dl)}
    for path, flag, message in bad_files(tmp_path, codes):
        files = {**good, flag: path}
        status, err = score(capsys, *files.values())
        assert status == 2, (flag, path)
        assert len(err.splitlines()) == 1 and err.startswith("brcd: error: ") and message in err, err
        if "holds codes of" not in message:
            assert err.startswith(f"brcd: error: {flag} {path}"), err


def test_packed_files_must_hold_bytes(codes, tmp_path, capsys):
    qc, dc, ql, dl = codes
    labels = [save(tmp_path / "ql.npy", ql), save(tmp_path / "dl.npy", dl)]
    packed_db = save(tmp_path / "db.npy", brcd.pack_codes(dc))
    for bad in (qc, qc.abs() * 300, torch.full((40, 3), 2.5), torch.ones(40, 3, dtype=torch.bool)):
        status, err = score(capsys, save(tmp_path / "q.pt", bad), packed_db, *labels, "--packed")
        assert status == 2 and "packed codes must be bytes (integers 0 to 255)" in err, err
    status, err = score(capsys, save(tmp_path / "q4.npy", torch.zeros(40, 4, dtype=torch.uint8)), packed_db, *labels,
                        "--packed")
    assert status == 2 and "4 bytes of packed bits but --db-codes of 3 bytes of packed bits" in err, err


@pytest.mark.parametrize("flags,message", [
    (["--topk", "0"], "expected a positive integer or 'all', got 0"),
    (["--topk", "some"], "expected a positive integer or 'all', got 'some'"),
    (["--radius", "-1"], "expected an integer >= 0"),
    (["--device", "meta"], "expected cpu or cuda[:N], got 'meta'"),
    (["--device", "tpu:0"], "expected a torch device such as cpu, cuda or cuda:1, got 'tpu:0'"),
])
def test_bad_options(codes, tmp_path, capsys, flags, message):
    files = [save(tmp_path / f"{name}.npy", t) for name, t in zip(("q", "db", "ql", "dl"), codes)]
    with pytest.raises(SystemExit):  # argparse's one-line refusal
        score(capsys, *files, *flags)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_on_a_machine_without_one(codes, tmp_path, capsys):
    files = [save(tmp_path / f"{name}.npy", t) for name, t in zip(("q", "db", "ql", "dl"), codes)]
    with pytest.raises(SystemExit):
        score(capsys, *files, "--device", "cuda")
    assert "cuda: this machine has no CUDA device torch can use" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # every command's --device is checked alike
        cli.main(["evaluate", "--checkpoint", "x.pt", "--synthetic", "--device", "cuda:1"])
    assert "no CUDA device" in capsys.readouterr().err


def test_the_readers_alone(codes, tmp_path):
    qc, _, ql, _ = codes
    read = load_codes(save(tmp_path / "q.pth", qc), "codes")
    assert read.nbits == BITS and torch.equal(read.packed, brcd.pack_codes(qc)) and len(read) == 40
    assert torch.equal(load_labels(save(tmp_path / "l.txt", ql[:, None]), rows=40), ql)  # one column: class ids
    multi = load_labels(save(tmp_path / "m.txt", torch.eye(3)[ql % 3]))
    assert multi.dtype == torch.bool and multi.shape == (40, 3)
    # Arrays of the other byte order, and wide unsigned integers, as NumPy writes them anywhere.
    np.save(tmp_path / "big.npy", (qc.numpy() > 0).astype(">f4"))
    assert torch.equal(load_codes(tmp_path / "big.npy").packed, brcd.pack_codes(qc))
    np.save(tmp_path / "wide.npy", ql.numpy().astype(np.uint32))
    assert torch.equal(load_labels(tmp_path / "wide.npy"), ql)
    with pytest.raises(DataFileError, match="^labels .*: 40 rows of labels for 41 codes"):
        load_labels(tmp_path / "l.txt", rows=41)


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".pth", ".txt", ".tsv", ".csv", ".bhi"])
def test_written_files_read_back(codes, tmp_path, suffix):
    qc, _, ql, _ = codes
    save_codes(tmp_path / f"q{suffix}", qc * 3.5)  # real values: written as their signs
    read = load_codes(tmp_path / f"q{suffix}")
    assert read.nbits == BITS and torch.equal(read.packed, brcd.pack_codes(qc))
    if suffix != ".bhi":
        multi = torch.nn.functional.one_hot(ql, 5) * 7  # any positive value is a label
        for labels, want in ((ql, ql), (multi, multi > 0)):
            save_labels(tmp_path / f"l{suffix}", labels)
            assert torch.equal(load_labels(tmp_path / f"l{suffix}", rows=40), want)
    with pytest.raises(ValueError, match="unknown file type '.mat'"):
        save_codes(tmp_path / "q.mat", qc)
    with pytest.raises(ValueError, match="expected integer class ids"):
        save_labels(tmp_path / "l.npy", ql.double())
    if suffix != ".bhi":
        values = torch.rand(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 3
        save_scores(tmp_path / f"s{suffix}", values)
        delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix)
        read = {".npy": lambda p: np.load(p), ".pt": torch.load, ".pth": torch.load}.get(
            suffix, lambda p: np.loadtxt(p, delimiter=delimiter))(tmp_path / f"s{suffix}")
        assert torch.equal(torch.as_tensor(read), values)  # every digit
    with pytest.raises(ValueError, match="per-query scores"):
        save_scores(tmp_path / "s.npy", ql)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
