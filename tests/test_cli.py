"""The brcd command: a tiny synthetic demo end to end, and one clear line for bad input."""
import json

import pytest
import torch

from brcd import cli, metrics, train
from brcd.index import HammingIndex
from brcd.objectives import CIBHashObjective
from conftest import device_params

TINY = ["--synthetic", "--teacher-epochs", "2", "--student-epochs", "2", "--train-per-class", "20",
        "--val-queries", "30", "--test-queries", "40", "--database-size", "200", "--val-database", "100",
        "--clusters", "4", "--topk", "50", "--no-progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", "--out", str(out), *TINY, "--baselines", "sp", "crd"]) == 0
    return out


DATA = ["--synthetic", "--train-per-class", "20", "--val-queries", "30", "--test-queries", "40",
        "--database-size", "200"]


def test_demo_writes_report_metrics_and_checkpoints(demo_run):
    out = demo_run
    results = json.loads((out / "metrics.json").read_text())
    assert set(results["teacher"]) >= {"map_symmetric", "code_statistics"}
    for name in ("teacher", "student_no_kd", "student_brcd", "student_sp", "student_crd"):
        paradigms = ("symmetric",) if name == "teacher" else ("symmetric", "asymmetric")
        scores = {f"{score}_{paradigm}" for paradigm in paradigms
                  for score in ("map", "precision_at_50", "ndcg_at_50", "precision_within_radius_2")}
        assert set(results[name]) == scores | {"code_statistics"}
        assert all(0.0 <= results[name][key] <= 1.0 for key in scores)
        stats = results[name]["code_statistics"]
        assert set(stats) == {"mean_bit_entropy", "mean_imbalance", "mean_abs_correlation", "distinct_share"}
        assert all(0.0 <= v <= 1.0 for v in stats.values()) and stats["distinct_share"] > 0
    assert set(results["throughput_images_per_s"]) == {"teacher", "student"}
    report = (out / "report.md").read_text()
    assert "student with BRCD" in report and (out / "map_over_epochs.png").exists()
    assert "| student with SP |" in report and "| student with CRD |" in report  # baselines asked for
    # In the results, the other scores' table, the database codes' statistics and the training throughput.
    assert report.count("| student with CRD |") == 4
    assert "| model | P@50 symm. | NDCG@50 symm. | P(r <= 2) symm. | P@50 asym. |" in report
    assert (out / "pr_curves.png").exists() and "pr_curves.png" in report
    assert (out / "precision_at_n.png").exists() and "precision_at_n.png" in report
    assert (out / "throughput.png").exists() and "throughput.png" in report and "data: synthetic" in report
    training = report.split("## Training throughput")[1].split("##")[0]
    for role in ("teacher", "student without KD", "student with BRCD", "student with SP", "student with CRD"):
        assert f"| {role} | 2 | 1 | " in training  # two epochs each in one process, their seconds and images/s
    for name in ("teacher", "student_no_kd", "student_brcd", "student_brcd.asymmetric"):
        ckpt = torch.load(out / f"{name}.pt", weights_only=True)
        assert "state_dict" in ckpt and ckpt["config"]["bits"] == 64 and ckpt["model"]["bits"] == 64
    assert torch.load(out / "student_brcd.asymmetric.pt", weights_only=True)["selected_by"] == "val_map_asymmetric"
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in log} == {"teacher", "student_no_kd", "student_brcd", "student_sp", "student_crd"}


@pytest.mark.parametrize("argv,needle", [
    (["--teacher", "no_such_model"], "unknown model name"),
    (["--data-dir", "/nonexistent/folder"], "dataset-fashion-mnist"),
])
def test_bad_input_is_one_line_on_stderr(tmp_path, capsys, argv, needle):
    args = ["demo", "--out", str(tmp_path / "run"), *[a for a in TINY if a != "--synthetic"], *argv]
    if "--teacher" in argv:
        args.append("--synthetic")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("brcd: error:") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_bad_numbers_are_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path), "--bits", "0"])
    assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["distill", "--teacher-checkpoint", "t.pt", "--kd", "rkd", "--no-kd"], "not allowed with argument"),
    (["distill", "--teacher-checkpoint", "t.pt", "--kd", "fitnet"], "invalid choice: 'fitnet'"),
    (["demo", "--baselines", "brcd"], "invalid choice: 'brcd'"),
    (["distill", "--teacher-checkpoint", "t.pt", "--kd-weight", "-1"], "expected a finite number >= 0, got -1.0"),
    (["demo", "--kd-weight", "nan"], "expected a finite number >= 0, got nan"),
    (["demo", "--kd-weight", "x"], "expected a number >= 0, got 'x'"),
])
def test_distillation_objectives_are_checked_by_the_parser(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        cli.main([argv[0], "--out", str(tmp_path), *argv[1:]])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_every_registered_baseline_is_a_choice():
    for kd in ("rkd", "pkt", "sp", "hinton", "sskd", "crd", "crcd", "packd"):
        args = cli.build_parser().parse_args(["distill", "--out", "o", "--teacher-checkpoint", "t.pt", "--kd", kd])
        assert args.kd == kd
    args = cli.build_parser().parse_args(["demo", "--out", "o", "--baselines", "crcd", "packd"])
    assert args.baselines == ["crcd", "packd"]


def test_split_seed_keeps_the_split_while_the_run_seed_varies():
    parse = lambda *extra: cli.build_parser().parse_args(["evaluate", "--checkpoint", "x.pt", *DATA, *extra])
    split = lambda *extra: cli._data_and_split(parse(*extra))[1]
    fixed, default, moved = split("--seed", "1", "--split-seed", "0"), split("--seed", "0"), split("--seed", "1")
    for part in ("train", "database", "val_queries", "test_queries"):
        assert torch.equal(getattr(fixed, part), getattr(default, part)), part
    assert not torch.equal(moved.train, default.train)


def test_a_distillation_objective_from_a_config_file_is_checked_before_training(demo_run, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("kd: nope\n")
    out = tmp_path / "run"
    assert cli.main(["distill", "--out", str(out), "--teacher-checkpoint", str(demo_run / "teacher.pt"),
                     "--config", str(config), *DATA, "--no-progress"]) == 2
    assert "kd must be one of" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("student_*"))


def test_baselines_from_a_config_file_are_checked(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("baselines: [pkt, nope]\n")
    assert cli.main(["demo", "--out", str(tmp_path / "run"), "--config", str(config), *TINY]) == 2
    assert "unknown KD baseline 'nope'" in capsys.readouterr().err


def test_nan_loss_stops_with_epoch_and_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(CIBHashObjective, "forward", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    assert cli.main(["demo", "--out", str(tmp_path / "run"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "epoch 1, step 1" in err and "Traceback" not in err


def test_evaluate_encode_and_index_from_the_demo_checkpoints(demo_run, tmp_path, capsys):
    student, teacher = demo_run / "student_brcd.pt", demo_run / "teacher.pt"
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(student), "--teacher-checkpoint", str(teacher), "--topk", "50",
                     *DATA]) == 0
    scores = json.loads(capsys.readouterr().out)
    # The same split and models as the demo's test: the same numbers (its asymmetric test uses the checkpoint
    # that validated best asymmetrically).
    demo = json.loads((demo_run / "metrics.json").read_text())["student_brcd"]
    assert set(scores) == {f"{m}_{p}" for m in ("map", "precision_at_50", "ndcg_at_50", "precision_within_radius_2")
                           for p in ("symmetric", "asymmetric")}
    assert {key: scores[key] for key in scores if key.endswith("_symmetric")} == {
        key: demo[key] for key in demo if key.endswith("_symmetric")}  # the demo's test scored the same way
    # The precisions are brcd.metrics' on the codes the checkpoints give the split's images.
    from brcd.checkpoint import load_model
    from brcd.train import encode
    data, split = cli._data_and_split(cli.build_parser().parse_args(["evaluate", "--checkpoint", "x", *DATA]))
    q = encode(load_model(student), data.test_images[split.test_queries])
    ql, dl = data.test_labels[split.test_queries], data.train_labels[split.database]
    for paradigm, model in (("symmetric", student), ("asymmetric", teacher)):
        on = (q, encode(load_model(model), data.train_images[split.database]), ql, dl)
        assert scores[f"precision_at_50_{paradigm}"] == metrics.precision_at_k(*on, 50)
        assert scores[f"ndcg_at_50_{paradigm}"] == metrics.ndcg_at_k(*on, 50)
        assert scores[f"precision_within_radius_2_{paradigm}"] == metrics.precision_within_radius(*on, radius=2)
    assert cli.main(["evaluate", "--checkpoint", str(student), "--topk", "5000", "--radius", "0", *DATA]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"map_symmetric", "precision_at_200_symmetric",
                                                         "ndcg_at_200_symmetric",
                                                         "precision_within_radius_0_symmetric"}  # 200 codes
    assert cli.main(["evaluate", "--checkpoint", str(demo_run / "student_brcd.asymmetric.pt"), "--teacher-checkpoint",
                     str(teacher), "--topk", "50", *DATA]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {key: scores[key] for key in scores if key.endswith("_asymmetric")} == {
        key: demo[key] for key in demo if key.endswith("_asymmetric")}
    index_file = tmp_path / "db.bhi"
    assert cli.main(["encode", "--checkpoint", str(teacher), "--out", str(index_file), *DATA]) == 0
    assert json.loads(capsys.readouterr().out)["codes"] == 200
    assert cli.main(["index", "--index", str(index_file), "--checkpoint", str(student), "--queries", "3", "-k", "7",
                     *DATA]) == 0
    found = json.loads(capsys.readouterr().out)["queries"]
    assert len(found) == 3 and all(len(q["ids"]) == 7 and q["distances"] == sorted(q["distances"]) for q in found)
    # Every code within a radius instead: the 7 nearest that lie within it come first, and there are more only where
    # all 7 do; a radius of every bit returns the whole database.
    nbits = HammingIndex.load(index_file).nbits
    for radius in (0, nbits // 4, nbits // 2, nbits):
        assert cli.main(["index", "--index", str(index_file), "--checkpoint", str(student), "--queries", "3",
                         "--radius", str(radius), *DATA]) == 0
        in_ball = json.loads(capsys.readouterr().out)["queries"]
        assert [q["test_image"] for q in in_ball] == [q["test_image"] for q in found]
        for near, ball in zip(found, in_ball):
            inside = [(i, d) for i, d in zip(near["ids"], near["distances"]) if d <= radius]
            assert list(zip(ball["ids"], ball["distances"]))[: len(inside)] == inside
            assert len(ball["ids"]) == len(inside) if len(inside) < 7 else len(ball["ids"]) >= 7
            assert all(d <= radius for d in ball["distances"]) and ball["distances"] == sorted(ball["distances"])
        if radius == nbits:
            assert all(sorted(q["ids"]) == list(range(200)) for q in in_ball)
    with pytest.raises(SystemExit):  # argparse's refusal: one or the other
        cli.main(["index", "--index", str(index_file), "--checkpoint", str(student), "-k", "3", "--radius", "2", *DATA])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".csv"])  # every format's round trip: test_score
def test_encoded_files_score_as_brcd_evaluate_scores_the_checkpoints(demo_run, tmp_path, capsys, suffix):
    """brcd encode writes a split's codes and labels for other tools; brcd score reads them back to the numbers of
    brcd evaluate (same split, same models), in both paradigms."""
    student, teacher = demo_run / "student_brcd.pt", demo_run / "teacher.pt"
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(student), "--teacher-checkpoint", str(teacher), "--topk", "50",
                     "--radius", "3", *DATA]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    files = {name: tmp_path / f"{name}{suffix}" for name in ("q", "ql", "db", "dl", "teacher_db")}
    files["teacher_db"] = tmp_path / "teacher_db.bhi"  # the teacher's database as an index file
    for model, part, codes, labels in ((student, "test-queries", "q", "ql"), (student, "database", "db", "dl"),
                                       (teacher, "database", "teacher_db", None)):
        extra = ["--labels-out", str(files[labels])] if labels else []
        assert cli.main(["encode", "--checkpoint", str(model), "--part", part, "--out", str(files[codes]), *extra,
                         *DATA]) == 0
        written = json.loads(capsys.readouterr().out)
        assert written["part"] == part and written["codes"] == (40 if part == "test-queries" else 200)
    for paradigm, db in (("symmetric", "db"), ("asymmetric", "teacher_db")):
        assert cli.main(["score", "--query-codes", str(files["q"]), "--db-codes", str(files[db]), "--query-labels",
                         str(files["ql"]), "--db-labels", str(files["dl"]), "--topk", "50", "--radius", "3"]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["queries"] == 40 and scored["database"] == 200 and scored["topk"] == 50
        assert {f"{key}_{paradigm}": scored[key] for key in ("map", "precision_at_50", "ndcg_at_50",
                                                             "precision_within_radius_3")} == {
            key: value for key, value in evaluated.items() if key.endswith(f"_{paradigm}")}
    # A file type brcd cannot write fails before any encoding.
    for flag in ("--out", "--labels-out"):
        names = {"--out": str(tmp_path / "q.npy"), "--labels-out": str(tmp_path / "ql.npy"), flag: "codes.mat"}
        assert cli.main(["encode", "--checkpoint", str(student), *[x for kv in names.items() for x in kv], *DATA]) == 2
        err = capsys.readouterr().err
        assert f"{flag} codes.mat: unknown file type '.mat'" in err and "encoding" not in err


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["evaluate", "--checkpoint", str(bad), *DATA]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("brcd: error:") and "not a brcd checkpoint" in err[-1]


def test_config_file_with_flags_overriding(demo_run, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"checkpoint: {demo_run / 'student_brcd.pt'}\nsynthetic: true\ntrain-per-class: 20\n"
                      "val_queries: 30\ntest-queries: 40\ndatabase_size: 200\ntopk: 10\n")
    capsys.readouterr()
    assert cli.main(["evaluate", "--config", str(config), "--topk", "50"]) == 0
    scores = json.loads(capsys.readouterr().out)
    demo = json.loads((demo_run / "metrics.json").read_text())["student_brcd"]
    assert scores["map_symmetric"] == pytest.approx(demo["map_symmetric"], abs=1e-12)  # topk 50 from the flag
    for text, needle in (("topk: [1, 2", "cannot be read"), ("nonsense_option: 3", "unknown option"),
                         ("topk: -4", "positive integer"), ("- a\n- b", "mapping")):
        config.write_text(text)
        assert cli.main(["evaluate", "--config", str(config)]) == 2
        assert needle in capsys.readouterr().err


def test_train_teacher_then_distill_in_steps(tmp_path, capsys):
    common = DATA + ["--val-database", "100", "--topk", "50", "--no-progress", "--bits", "16"]
    assert cli.main(["train-teacher", "--out", str(tmp_path / "t"), "--epochs", "1", *common]) == 0
    teacher = tmp_path / "t" / "teacher.pt"
    assert torch.load(teacher, weights_only=True)["model"]["bits"] == 16
    # Every training run ends with a test and a report of its own.
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["test"]["map_symmetric"] <= 1
    report = (tmp_path / "t" / "report.md").read_text()
    assert report.startswith("# brcd train-teacher") and "16-bit codes" in report and "throughput.png" in report
    assert set(json.loads((tmp_path / "t" / "metrics.json").read_text())["throughput_images_per_s"]) == {"teacher"}
    assert cli.main(["distill", "--out", str(tmp_path / "s"), "--teacher-checkpoint", str(teacher), "--epochs", "1",
                     "--clusters", "3", "--group-mode", "fn", "--no-mask", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"student_brcd"} and set(result["student_brcd"]["best_validation"]) == {
        "val_map_symmetric", "val_map_asymmetric"}
    assert {"map_symmetric", "map_asymmetric", "ndcg_at_50_asymmetric", "code_statistics"} <= set(
        result["student_brcd"]["test"])
    report = (tmp_path / "s" / "report.md").read_text()
    assert report.startswith("# brcd distill") and "student with BRCD" in report and "student without KD" not in report
    tested = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert set(tested) >= {"teacher", "student_brcd", "throughput_images_per_s"}
    assert cli.main(["distill", "--out", str(tmp_path / "p"), "--teacher-checkpoint", str(teacher), "--epochs", "1",
                     "--no-kd", *common]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"student_no_kd"}
    # A KD baseline instead of BRCD: no clusters, its own run name, both paradigms tested.
    assert cli.main(["distill", "--out", str(tmp_path / "r"), "--teacher-checkpoint", str(teacher), "--epochs", "1",
                     "--kd", "rkd", "--kd-weight", "0.5", "--seed", "1", "--split-seed", "0", *common]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) == {"student_rkd"} and {"map_symmetric", "map_asymmetric", "code_statistics"} <= set(
        result["student_rkd"]["test"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| student with RKD |" in report and "seed 1 (split seed 0)" in report
    config = torch.load(tmp_path / "r" / "student_rkd.pt", weights_only=True)["config"]
    assert config["kd"] == "rkd" and config["kd_weight"] == 0.5
    assert "with RKD" in captured.err and "k-means" not in captured.err


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("augment, workers", [("loader", "0"), ("loader", "2"), ("batch", "0")])
def test_resume_continues_exactly(tmp_path, capsys, augment, workers, device):
    """Also with data-loader workers (their augmentation is seeded from the saved loader state), with the batch
    augmentation (its choices drawn from the loader's generator) and on a GPU (whose own generator draws the
    stochastic hash thresholds)."""
    common = DATA + ["--val-database", "100", "--topk", "50", "--no-progress", "--bits", "16", "--workers", workers,
                     "--augment", augment, "--device", device]
    straight = tmp_path / "straight"
    assert cli.main(["train-teacher", "--out", str(straight), "--epochs", "3", *common]) == 0
    interrupted = tmp_path / "interrupted"
    assert cli.main(["train-teacher", "--out", str(interrupted), "--epochs", "1", *common]) == 0
    assert cli.main(["train-teacher", "--out", str(interrupted), "--epochs", "3", "--resume", *common]) == 0
    a = torch.load(straight / "teacher.last.pt", weights_only=True)
    b = torch.load(interrupted / "teacher.last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        if device == "cpu":
            assert torch.equal(value, b["state_dict"][key]), key
        else:  # GPU kernels may sum in another order from run to run; other random streams would differ wholesale
            torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)
    log = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_workers_reach_the_loader_and_change_only_the_augmentation_stream(tmp_path, capsys):
    common = DATA + ["--val-database", "100", "--topk", "50", "--no-progress", "--bits", "16", "--epochs", "1"]
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        assert cli.main(["train-teacher", "--out", str(out), "--workers", workers, *common]) == 0
        state = torch.load(out / "teacher.last.pt", weights_only=True)
        assert state["config"]["workers"] == int(workers)
        runs[workers] = state["state_dict"]
    # The same split, model and shuffling; augmentations drawn in the workers: other weights.
    assert any(not torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])


def test_default_workers_by_device(monkeypatch):
    parse = lambda *argv: cli.build_parser().parse_args(["train-teacher", "--out", "x", *argv])
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device is checked against the machine's GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli._workers(parse()) == 0  # the CPU trains on every core
    assert cli._workers(parse("--device", "cuda")) == 0  # the views are made on the GPU (--augment auto: batch)
    assert cli._workers(parse("--device", "cuda", "--augment", "loader")) == 8
    assert cli._workers(parse("--device", "cuda:1", "--augment", "loader", "--workers", "3")) == 3
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    assert cli._workers(parse("--device", "cuda", "--augment", "loader")) == 1


def test_augmentation_by_device_and_its_checks(tmp_path, capsys):
    assert train.augmentation("auto", "cpu") == "loader" and train.augmentation("auto", "cuda:0") == "batch"
    assert train.augmentation("batch", "cpu") == "batch" and train.augmentation("loader", "cuda") == "loader"
    common = DATA + ["--val-database", "100", "--topk", "50", "--no-progress", "--bits", "16", "--epochs", "1"]
    assert cli.main(["train-teacher", "--out", str(tmp_path / "w"), "--augment", "batch", "--workers", "2",
                     *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "workers" in err[0] and "batch" in err[0]
    with pytest.raises(ValueError, match="augment must be one of"):
        train.check_loop_config(train.TrainConfig(augment="gpu"))
    runs = {}
    for augment in ("loader", "batch"):
        out = tmp_path / augment
        assert cli.main(["train-teacher", "--out", str(out), "--augment", augment, *common]) == 0
        state = torch.load(out / "teacher.last.pt", weights_only=True)
        assert state["config"]["augment"] == augment
        runs[augment] = state["state_dict"]
    # The same split, model and shuffling; other views: other weights.
    assert any(not torch.equal(runs["loader"][k], runs["batch"][k]) for k in runs["loader"])


def test_list_dataset_with_safetensors_checkpoints(tmp_path, capsys):
    """The user's own multi-label images from list files, safetensors checkpoints from training to evaluation."""
    from tests.test_data import write_image_list

    gen = torch.Generator().manual_seed(0)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = lambda n: [[1 - int(v.sum() > 0)] + v.tolist() for v in (torch.rand(n, 2, generator=gen) < 0.4).long()]
    write_image_list(data_dir, "train", rows(48))
    write_image_list(data_dir, "test", rows(20))
    data = ["--dataset", "list", "--data-dir", str(data_dir), "--image-size", "16", "--train-per-class", "8",
            "--val-queries", "8", "--test-queries", "12", "--topk", "20"]
    common = data + ["--val-database", "40", "--no-progress", "--bits", "16", "--checkpoint-format", "safetensors"]
    assert cli.main(["train-teacher", "--out", str(tmp_path / "t"), "--epochs", "1", *common]) == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(teacher) and teacher.exists()
    assert not (tmp_path / "t" / "teacher.pt").exists()
    assert cli.main(["distill", "--out", str(tmp_path / "s"), "--teacher-checkpoint", str(teacher), "--epochs", "1",
                     "--clusters", "3", "--group-mode", "offset", *common]) == 0
    student = tmp_path / "s" / "student_brcd.safetensors"
    assert json.loads(capsys.readouterr().out)["student_brcd"]["checkpoint"] == str(student)
    assert cli.main(["evaluate", "--checkpoint", str(student), "--teacher-checkpoint", str(teacher),
                     *data]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"map_symmetric", "map_asymmetric"} <= set(scores) and all(0 <= v <= 1 for v in scores.values())


def test_validation_every_n_epochs_and_pretrained_weights(tmp_path, capsys):
    common = DATA + ["--val-database", "100", "--topk", "50", "--no-progress", "--bits", "16", "--teacher", "resnet10t"]
    assert cli.main(["train-teacher", "--out", str(tmp_path / "a"), "--epochs", "1", *common]) == 0
    first = tmp_path / "a" / "teacher.pt"
    assert cli.main(["train-teacher", "--out", str(tmp_path / "b"), "--epochs", "3", "--val-every", "2",
                     "--teacher-weights", str(first), *common]) == 0
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert ["val_map_symmetric" in r for r in log] == [False, True, True]  # every 2nd epoch, and the last
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"junk")
    capsys.readouterr()
    assert cli.main(["train-teacher", "--out", str(tmp_path / "c"), "--epochs", "1", "--teacher-weights", str(bad),
                     *common]) == 2
    assert "cannot load backbone weights" in capsys.readouterr().err


def test_compare_tabulates_objectives_over_seeds(demo_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    teacher = demo_run / "teacher.pt"
    args = ["compare", "--out", str(out), "--teacher-checkpoint", str(teacher), *DATA, "--epochs", "1",
            "--val-database", "100", "--topk", "50", "--no-progress", "--clusters", "4"]
    capsys.readouterr()
    assert cli.main([*args, "--kd", "hinton", "brcd", "hinton", "--seeds", "3", "5", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seeds"] == [3, 5] and summary["split_seed"] == 3 and summary["topk"] == 50
    assert list(summary["models"]) == ["teacher", "student_no_kd", "student_hinton", "student_brcd"]
    runs = {seed: json.loads((out / f"seed{seed}" / "metrics.json").read_text()) for seed in (3, 5)}
    for seed in (3, 5):
        config = json.loads((out / f"seed{seed}" / "config.json").read_text())
        assert config["seed"] == seed and config["split_seed"] == 3  # one split, the students' own seeds
    assert runs[3]["teacher"]["map_symmetric"] == runs[5]["teacher"]["map_symmetric"]  # same teacher, same split
    for model, scores in summary["models"].items():
        assert set(scores) == set(runs[3][model]) - {"code_statistics"}  # mAP, P@K, NDCG@K, P(r <= 2): each paradigm
        assert {"map_symmetric", "ndcg_at_50_symmetric"} <= set(scores)
        assert ("map_asymmetric" in scores) == (model != "teacher")
        for score, stats in scores.items():
            values = [runs[3][model][score], runs[5][model][score]]
            assert stats["by_seed"] == values and stats["min"] == min(values) and stats["max"] == max(values)
            assert stats["mean"] == pytest.approx(sum(values) / 2, abs=1e-15)
            assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=1e-15)
    assert json.loads((out / "comparison.json").read_text()) == summary
    table = (out / "comparison.md").read_text()
    brcd_row = next(line for line in table.splitlines() if line.startswith("| student with BRCD |"))
    sym = summary["models"]["student_brcd"]["map_symmetric"]
    assert f"| {sym['mean']:.4f} ± {sym['std']:.4f} | {sym['min']:.4f} to {sym['max']:.4f} |" in brcd_row
    ndcg = summary["models"]["student_brcd"]["ndcg_at_50_asymmetric"]
    assert f"{ndcg['mean']:.4f} ± {ndcg['std']:.4f} |" in table.split("Beside mAP")[1]  # the other scores' table
    assert f"{sym['by_seed'][0]:.4f} / {sym['by_seed'][1]:.4f}" in brcd_row
    assert "seeds 3, 5" in table and "split of seed 3" in table and (out / "seed5" / "report.md").exists()
    # --resume finds every student finished: nothing trains again, the same table comes out.
    log = (out / "seed5" / "metrics.jsonl").read_text()
    assert cli.main([*args, "--kd", "hinton", "brcd", "--seeds", "3", "5", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out) == summary and (out / "seed5" / "metrics.jsonl").read_text() == log
    # Each seed's student is the one `brcd distill` trains with that seed on that split, to the last digit.
    assert cli.main(["distill", "--out", str(tmp_path / "one"), *args[3:], "--kd", "hinton", "--seed", "5",
                     "--split-seed", "3"]) == 0
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())["student_hinton"]
    assert single["map_symmetric"] == runs[5]["student_hinton"]["map_symmetric"]
    assert single["map_asymmetric"] == runs[5]["student_hinton"]["map_asymmetric"]


def test_compare_refuses_bad_settings_before_any_work(tmp_path, capsys):
    base = ["compare", "--out", str(tmp_path / "cmp"), "--teacher-checkpoint", str(tmp_path / "t.pt"), *DATA]
    assert cli.main([*base, "--seed", "1"]) == 2 and "not --seed" in capsys.readouterr().err
    assert cli.main(base) == 2 and "t.pt" in capsys.readouterr().err  # no teacher checkpoint there
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--kd", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    for line, needle in (("kd: [brcd, nope]", "kd: unknown objective 'nope'"),
                         ("ablations: fn-only", "ablations: unknown BRCD ablation 'fn-only'")):
        (tmp_path / "c.yaml").write_text(line + "\n")  # a --config file's lists pass no argparse check
        assert cli.main([*base, "--config", str(tmp_path / "c.yaml")]) == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_trains_brcd_ablations_as_distill_does(demo_run, tmp_path, capsys):
    teacher = demo_run / "teacher.pt"
    common = ["--teacher-checkpoint", str(teacher), *DATA, "--epochs", "1", "--val-database", "100", "--topk", "50",
              "--no-progress", "--clusters", "4"]
    capsys.readouterr()
    assert cli.main(["compare", "--out", str(tmp_path / "cmp"), *common, "--kd", "brcd", "--ablations", "fn",
                     "no-mask", "--seeds", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["models"]) == ["teacher", "student_no_kd", "student_brcd", "student_brcd_fn",
                                       "student_brcd_no_mask"]
    run = json.loads((tmp_path / "cmp" / "seed2" / "metrics.json").read_text())
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| student with BRCD (false negatives only) |" in table and "| student with BRCD (no bit mask) |" in table
    report = (tmp_path / "cmp" / "seed2" / "report.md").read_text()
    assert "| student with BRCD (no bit mask) |" in report
    for name, flags in (("student_brcd_fn", ["--group-mode", "fn"]), ("student_brcd_no_mask", ["--no-mask"])):
        out = tmp_path / name
        assert cli.main(["distill", "--out", str(out), *common, "--kd", "brcd", "--seed", "2", *flags]) == 0
        single = json.loads((out / "metrics.json").read_text())["student_brcd"]
        assert single["map_symmetric"] == run[name]["map_symmetric"]
        assert single["map_asymmetric"] == run[name]["map_asymmetric"]
    # each ablation trains with its own loss (one step here: the codes, and so the mAP, may not move yet)
    log = [json.loads(line) for line in (tmp_path / "cmp" / "seed2" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["model"]: r["loss"] for r in log}
    assert len({losses[m] for m in ("student_brcd", "student_brcd_fn", "student_brcd_no_mask")}) == 3


def test_info_reports_the_build_and_the_devices(capsys):
    import brcd

    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["brcd"] == brcd.build_info() and info["torch"] == torch.__version__
    assert info["cuda_kernels_usable"] == brcd.cuda_available()
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"brcd {brcd.__version__}"
