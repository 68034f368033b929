"""Data-parallel training (brcd.distributed): the whole batch's loss and gradients on every rank, ranks that stay
in step, a resumed run that continues exactly, the views one process would make, and the command under torchrun.

The multi-process cases run two processes on the CPU (gloo); their CUDA twins run NCCL over two GPUs, or gloo with
both processes on one GPU (NCCL refuses two ranks on one device)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import brcd
from brcd import distributed
from brcd.augment import BatchAugment
from brcd.data import TwoViewDataset, synthetic_data, two_view_transform
from brcd.models import STUDENT_DEFAULT, build_model
from brcd.train import (ShardedBatches, TrainConfig, _loader, check_loop_config, fit_clusters, rotations_by_image,
                        rotations_by_turn, train_student, train_teacher)
from conftest import ROOT

RANKS = 2


def _rank_main(rank: int, init_file: str, device: str, job: str, args: tuple) -> None:
    torch.set_num_threads(1)
    backend = "gloo"
    if device == "cuda":
        one_each = torch.cuda.device_count() >= RANKS
        device = f"cuda:{rank if one_each else 0}"
        torch.cuda.set_device(device)
        backend = "nccl" if one_each else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    try:
        globals()[job](rank, device, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(tmp_path: Path, job: str, *args, device: str = "cpu") -> None:
    """`job(rank, device, *args)` of this module in each of RANKS processes joined in a process group."""
    mp.spawn(_rank_main, args=(str(tmp_path / "process-group"), device, job, args), nprocs=RANKS, join=True)


def device_params():
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                not brcd.cuda_available(), reason="needs a CUDA device and a CUDA build of brcd")])]


# ------------------------------------------------------------------------------------------- the gathered loss
def _loss_problem(device):
    """A linear 'model' over a batch of 8 inputs and the BRCD loss's other inputs, float64."""
    gen = torch.Generator().manual_seed(0)
    b, d, k = 8, 5, 16
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    teacher_anchor, teacher_view = (torch.randn(b, k, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha = torch.rand(b, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, k, generator=gen) < 0.7).double()
    clusters = torch.randint(3, (b,), generator=gen)
    model = torch.nn.Linear(d, k, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    return [t.to(device) for t in (x, teacher_anchor, teacher_view, alpha, mask, clusters)], model.to(device)


def _brcd_loss(student, teacher_anchor, teacher_view, alpha, mask, clusters):
    groups = torch.cat([clusters, clusters])
    return brcd.brcd_loss(student, teacher_anchor, teacher_view, alpha=alpha, bit_mask=mask, row_groups=groups,
                          col_groups=groups)


def _gathered_loss_job(rank, device, out):
    inputs, model = _loss_problem(device)
    share = len(inputs[0]) // RANKS
    mine = [t[rank * share : (rank + 1) * share] for t in inputs]
    student = model(mine[0])
    gathered = distributed.gather_rows(student, *mine[1:])
    loss = _brcd_loss(*gathered)
    ntxent = brcd.ntxent_loss(gathered[0], gathered[2])
    (loss + ntxent).backward()
    distributed.average_gradients(model.parameters())
    # a tensor of more than two dimensions, and an integer one, in the same call: rows in rank order
    cube, ids = distributed.gather_rows(torch.full((share, 3, 2), float(rank), device=device),
                                        torch.arange(share, device=device) + 100 * rank)
    # SSKD's rotated copies: [3n, K] per rank, by rotation; the whole batch's in the same layout
    turned = torch.tensor([[10.0 * t + 100 * rank + i] * 2 for t in range(3) for i in range(share)], device=device)
    whole_turned = rotations_by_turn(distributed.gather_rows(rotations_by_image(turned)))
    torch.save({"loss": loss.detach().cpu(), "ntxent": ntxent.detach().cpu(), "turned": whole_turned.cpu(),
                "grads": [p.grad.cpu() for p in model.parameters()], "cube": cube.cpu(), "ids": ids.cpu(),
                "rank_seed": distributed.rank_seed(7)}, out / f"rank{rank}.pt")


@pytest.mark.parametrize("device", device_params())
def test_the_gathered_loss_and_its_gradients_are_one_process_s(tmp_path, device):
    run_ranks(tmp_path, "_gathered_loss_job", tmp_path, device=device)
    inputs, model = _loss_problem("cpu")
    loss = _brcd_loss(model(inputs[0]), *inputs[1:])
    ntxent = brcd.ntxent_loss(model(inputs[0]), inputs[2])
    (loss + ntxent).backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(RANKS)]
    for got in ranks:
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(got["ntxent"], ntxent.detach(), rtol=1e-12, atol=0)
        for g, want in zip(got["grads"], model.parameters()):
            torch.testing.assert_close(g, want.grad, rtol=1e-10, atol=1e-14)
        assert torch.equal(got["cube"][:, 0, 0], torch.tensor([0.0] * 4 + [1.0] * 4))
        assert got["cube"].shape == (8, 3, 2)
        assert torch.equal(got["ids"], torch.tensor([0, 1, 2, 3, 100, 101, 102, 103]))
    # by rotation first, then every process's images in rank order: 10 * turn + 100 * rank + image
    want = torch.tensor([10.0 * t + 100 * r + i for t in range(3) for r in range(RANKS) for i in range(4)])
    assert all(torch.equal(got["turned"][:, 0], want) for got in ranks)
    assert ranks[0]["rank_seed"] == 7 and ranks[1]["rank_seed"] != 7  # rank 0 is a one-process run's stream


def test_without_a_process_group_everything_is_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_rows(x) is x and distributed.gather_rows(x, None)[1] is None
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_objects(3) == [3]
    assert distributed.rank_seed(5) == 5


# ------------------------------------------------------------------------------------------- training
def _tiny(epochs=2, **settings):
    return TrainConfig(**{"bits": 16, "epochs": epochs, "batch_size": 16, "topk": 20, "progress": False, "seed": 3,
                          **settings})


def _train_job(rank, device, out, augment):
    data = synthetic_data(num_train=96, num_test=40)
    val = (data.test_images[:10], data.test_labels[:10], data.train_images[:60], data.train_labels[:60])

    trained = {}

    def make(name=None):  # each rank builds different weights: the loop starts every rank from rank 0's
        torch.manual_seed(rank)
        model = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16).to(device)
        if name:  # the weights each rank trained, kept before the loop loads the main rank's best checkpoint
            load = model.load_state_dict
            model.load_state_dict = lambda state: (trained.setdefault(name, {k: v.clone() for k, v in
                                                                           model.state_dict().items()}), load(state))
        return model

    try:
        check_loop_config(_tiny(batch_size=15, device=device))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    teacher = make("teacher")
    straight = out / "straight"
    train_teacher(teacher, data.train_images, *val, _tiny(device=device, augment=augment), straight, "t")
    resumed = out / "resumed"
    halted = make()
    train_teacher(halted, data.train_images, *val, _tiny(1, device=device, augment=augment), resumed, "t")
    again = make()
    train_teacher(again, data.train_images, *val, _tiny(device=device, augment=augment, resume=True), resumed, "t")
    clusters = fit_clusters(teacher, data.train_images, _tiny(device=device, num_clusters=3))
    student = make("student")
    train_student(student, teacher, clusters, data.train_images, *val, _tiny(device=device, augment=augment), out,
                  "s")
    # a baseline with a memory of the training set (updated from the whole batch) and its own heads (averaged)
    train_student(make("student_crd"), teacher, None, data.train_images, *val,
                  _tiny(1, device=device, augment=augment, kd="crd"), out, "crd")
    # a baseline over rotated copies of the views (their codes gathered a row of three per image)
    train_student(make("student_sskd"), teacher, None, data.train_images, *val,
                  _tiny(1, device=device, augment=augment, kd="sskd"), out, "sskd")
    last = lambda directory: torch.load(directory / "t.last.pt", weights_only=True)["state_dict"]
    torch.save({**trained, "assignments": clusters.assignments,
                "straight_last": last(straight), "resumed_last": last(resumed), "refused": refused},
               out / f"rank{rank}.pt")


@pytest.fixture(scope="module", params=[
    pytest.param(("cpu", "batch"), id="cpu-batch"), pytest.param(("cpu", "loader"), id="cpu-loader"),
    *[pytest.param(("cuda", augment), id=f"cuda-{augment}", marks=p.marks)
      for p in device_params()[1:] for augment in ("batch", "loader")]])
def two_process_run(request, tmp_path_factory):
    device, augment = request.param
    out = tmp_path_factory.mktemp(f"ranks-{device}-{augment}")
    for d in ("straight", "resumed"):
        (out / d).mkdir()
    run_ranks(out, "_train_job", out, augment, device=device)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(RANKS)]


def test_ranks_stay_in_step(two_process_run):
    _, (first, second) = two_process_run
    for model in ("teacher", "student", "student_crd", "student_sskd"):
        assert {k for k in first[model] if "running_" in k}  # batch-norm statistics too
        for key, value in first[model].items():
            assert torch.equal(value, second[model][key]), (model, key)
    assert torch.equal(first["assignments"], second["assignments"])  # the main rank's clusters, on every rank


def test_a_resumed_run_continues_exactly(two_process_run):
    _, ranks = two_process_run
    for got in ranks:
        for key, value in got["straight_last"].items():
            assert torch.equal(value, got["resumed_last"][key]), key


def test_only_the_main_rank_logs_and_the_state_knows_the_processes(two_process_run):
    out, _ = two_process_run
    log = [json.loads(line) for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(r["train_images"] == 6 * 16 for r in log)  # 96 images in whole batches of 16
    state = torch.load(out / "straight" / "t.last.pt", weights_only=False)
    assert state["ranks"] == RANKS and len(state["rank_rng"]) == RANKS
    assert not torch.equal(state["rank_rng"][0][0], state["rank_rng"][1][0])  # each rank its own stream


def test_a_batch_is_shared_out_evenly(two_process_run):
    _, ranks = two_process_run
    assert all("multiple of the number of processes (2)" in got["refused"] for got in ranks)


def test_a_run_of_two_processes_resumes_only_with_two(two_process_run, tmp_path):
    out, _ = two_process_run
    data = synthetic_data(num_train=96, num_test=40)
    model = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16)
    with pytest.raises(ValueError, match="written by a run of 2 process"):
        train_teacher(model, data.train_images, data.test_images[:10], data.test_labels[:10],
                      data.train_images[:60], data.train_labels[:60], _tiny(3, resume=True), out / "straight", "t")


# ------------------------------------------------------------------------------------------- batches and views
def test_one_process_batches_are_the_data_loader_s():
    images = (torch.rand(50, 1, 28, 28) * 255).to(torch.uint8)
    for workers in (0, 1):
        torch.manual_seed(3)
        old = torch.utils.data.DataLoader(TwoViewDataset(images, two_view_transform(28, 1)), batch_size=8,
                                          shuffle=True, drop_last=True, num_workers=workers,
                                          generator=torch.Generator().manual_seed(5))
        want = [batch for _ in range(2) for batch in old]
        torch.manual_seed(3)
        new = _loader(images, TrainConfig(batch_size=8, workers=workers, augment="loader"),
                      torch.Generator().manual_seed(5))
        got = [batch for _ in range(2) for batch in new]
        assert len(got) == len(want) == 12
        for a, b in zip(want, got):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sharded_batches_cover_each_batch_once():
    batches = ShardedBatches(50, 8, torch.Generator().manual_seed(1))
    assert len(batches) == 6 and len({int(i) for b in batches for i in b}) == 48


@pytest.mark.parametrize("channels", [1, 3])
def test_the_ranks_views_are_one_process_s(channels):
    images = (torch.rand(8, channels, 20, 20) * 255).to(torch.uint8)
    aug = BatchAugment(16, channels)
    whole = aug(images, torch.Generator().manual_seed(4))
    shares = [aug(images[r * 4 : (r + 1) * 4], torch.Generator().manual_seed(4), (r, 2)) for r in range(2)]
    assert torch.equal(torch.cat(shares), whole)
    with pytest.raises(ValueError, match="shard"):
        aug(images, torch.Generator(), (2, 2))


# ------------------------------------------------------------------------------------------- the command
def test_the_command_trains_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}", "-m", "brcd",
           "demo", "--out", str(out), "--synthetic", "--teacher-epochs", "1", "--student-epochs", "1",
           "--train-per-class", "20", "--val-queries", "30", "--test-queries", "40", "--database-size", "200",
           "--val-database", "100", "--clusters", "4", "--topk", "50", "--batch-size", "32", "--augment", "batch",
           "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON document: only the main process prints
    assert set(result) >= {"teacher", "student_no_kd", "student_brcd"}
    assert json.loads((out / "config.json").read_text())["processes"] == RANKS
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["model"] for r in log] == ["teacher", "student_no_kd", "student_brcd"]
    training = (out / "report.md").read_text().split("## Training throughput")[1].split("##")[0]
    assert "| student with BRCD | 1 | 2 | " in training  # one epoch, two processes
    assert all(r["processes"] == RANKS for r in log)


def test_one_process_commands_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    from brcd import cli

    assert cli.main(["score", "--query-codes", str(tmp_path / "q.npy"), "--db-codes", str(tmp_path / "d.npy"),
                     "--query-labels", str(tmp_path / "ql.npy"), "--db-labels", str(tmp_path / "dl.npy")]) == 2
    assert "runs in one process: start it without torchrun" in capsys.readouterr().err


def test_loader_workers_of_other_ranks_draw_their_own_stream():
    from brcd.train import _seed_worker

    torch.manual_seed(11)
    _seed_worker(0, 0)
    assert torch.initial_seed() == 11  # rank 0: the data loader's own seeding, as in one process
    _seed_worker(1, 0)
    assert torch.initial_seed() == distributed.rank_seed(11, 1) != 11
