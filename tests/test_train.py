"""The training loop: deferred reads of the loss (a GPU's default) train exactly as reads every step do, a non-finite
loss stops the run naming its own step however late it is read, bfloat16 forward passes feed float32 objectives, and
bad loop settings are refused before anything runs."""
import json
import math

import pytest
import torch

from brcd.data import synthetic_data
from brcd.models import STUDENT_DEFAULT, build_model
from brcd.objectives import CIBHashObjective
from brcd.train import TrainConfig, TrainingError, fit_clusters, train_student, train_teacher
from conftest import device_params


def train(out, read_every, epochs=2, **settings):
    data = synthetic_data(num_train=96, num_test=40)
    torch.manual_seed(0)
    model = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16)
    cfg = TrainConfig(bits=16, epochs=epochs, batch_size=16, topk=20, progress=False, read_loss_every=read_every,
                      **settings)
    out.mkdir()
    train_teacher(model, data.train_images, data.test_images[:10], data.test_labels[:10], data.train_images[:60],
                  data.train_labels[:60], cfg, out, "t")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.load(out / "t.last.pt", weights_only=True)["state_dict"], log


def test_deferred_loss_reads_train_the_same(tmp_path):
    # 6 steps an epoch: reads every 4 steps leave 2 for the epoch's end.
    every_step, deferred = train(tmp_path / "a", 1), train(tmp_path / "b", 4)
    untimed = lambda log: [{k: v for k, v in r.items() if k != "train_seconds"} for r in log]
    assert untimed(every_step[1]) == untimed(deferred[1])  # the per-epoch log, the mean loss to the last bit
    assert all(r["train_seconds"] > 0 and r["train_images"] == 6 * 16 for r in every_step[1])  # 6 steps of 16
    for key, value in every_step[0].items():
        assert torch.equal(value, deferred[0][key]), key


@pytest.mark.parametrize("read_every", [1, 5])
def test_a_non_finite_loss_names_its_step(tmp_path, monkeypatch, read_every):
    calls = {"n": 0}
    real = CIBHashObjective.forward

    def third_is_nan(self, *args):
        calls["n"] += 1
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(CIBHashObjective, "forward", third_is_nan)
    with pytest.raises(TrainingError, match="at epoch 1, step 3;"):
        train(tmp_path / "run", read_every)


def test_bf16_forward_passes_feed_float32_objectives(tmp_path, monkeypatch):
    seen = []
    real = CIBHashObjective.forward

    def record(self, probs1, codes1, probs2, codes2):
        seen.append((probs1.dtype, codes1.dtype, torch.is_autocast_enabled("cpu")))
        return real(self, probs1, codes1, probs2, codes2)

    monkeypatch.setattr(CIBHashObjective, "forward", record)
    fp32 = train(tmp_path / "fp32", 1, epochs=1)
    assert seen and all(s == (torch.float32, torch.float32, False) for s in seen)
    seen.clear()
    bf16 = train(tmp_path / "bf16", 1, epochs=1, precision="bf16")
    assert seen and all(s == (torch.float32, torch.float32, False) for s in seen)  # outside the autocast region
    # The forward passes did run in bfloat16: the same seed trains other weights.
    assert any(not torch.equal(fp32[0][k], bf16[0][k]) for k in fp32[0])
    assert torch.load(tmp_path / "bf16" / "t.last.pt", weights_only=True)["config"]["precision"] == "bf16"


@pytest.mark.parametrize("read_every, settings, named", [(0, {}, "read_loss_every"), (1, {"workers": -1}, "workers"),
                                                          (1, {"precision": "fp16"}, "precision"),
                                                          (1, {"augment": "gpu"}, "augment"),
                                                          (1, {"augment": "batch", "workers": 2}, "workers")])
def test_bad_loop_settings_are_refused_first(tmp_path, read_every, settings, named):
    with pytest.raises(ValueError, match=named):
        train(tmp_path / "run", read_every, **settings)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained, nothing logged


def test_batch_augmentation_trains_reproducibly_with_its_own_views(tmp_path, monkeypatch):
    """The views come from BatchAugment (from the loader's generator): the same seed trains the same weights, and
    other weights than the loader's augmentation."""
    from brcd import augment
    calls = []
    real = augment.BatchAugment.__call__

    def count(self, images, gen, *shard):
        calls.append(images.shape)
        return real(self, images, gen, *shard)

    monkeypatch.setattr(augment.BatchAugment, "__call__", count)
    first, log = train(tmp_path / "a", 1, epochs=1, augment="batch")
    assert calls == [(16, 1, 16, 16)] * 12  # two views of each of the 6 full batches of 96 images
    again, _ = train(tmp_path / "b", 1, epochs=1, augment="batch")
    loader, _ = train(tmp_path / "c", 1, epochs=1, augment="loader")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], loader[k]) for k in first)
    assert math.isfinite(log[0]["loss"])


@pytest.mark.parametrize("device", device_params()[1:])  # a GPU: what a step could wait for
@pytest.mark.parametrize("augment", ["batch", "loader"])
def test_distillation_steps_never_wait_for_the_gpu(tmp_path, monkeypatch, device, augment):
    """Under torch.cuda's sync debug mode "error", a wait for the device raises: none in a BRCD step (the models'
    passes, the batch's clusters, groups and masks, the loss) nor in the batch augmentation, so the host queues steps
    ahead of the GPU."""
    from brcd import augment as augment_module
    from brcd import train as train_module

    def without_waits(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    steps = []
    real_fit = train_module._fit

    def fit(model, objective, step, *args, **kwargs):
        def checked(*step_args):
            steps.append(step_args[2].shape)
            return without_waits(step)(*step_args)
        return real_fit(model, objective, checked, *args, **kwargs)

    monkeypatch.setattr(train_module, "_fit", fit)
    monkeypatch.setattr(augment_module.BatchAugment, "__call__", without_waits(augment_module.BatchAugment.__call__))
    data = synthetic_data(num_train=96, num_test=40)
    torch.manual_seed(0)
    teacher = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16).to(device)
    student = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16)
    cfg = TrainConfig(bits=16, epochs=1, batch_size=16, topk=20, progress=False, num_clusters=4, device=device,
                      augment=augment)
    clusters = fit_clusters(teacher, data.train_images, cfg)
    train_student(student, teacher, clusters, data.train_images, data.test_images[:10], data.test_labels[:10],
                  data.train_images[:60], data.train_labels[:60], cfg, tmp_path)
    assert len(steps) == 6  # every step of the epoch ran under the check


def _student_run(tmp_path, **settings):
    data = synthetic_data(num_train=96, num_test=40)
    torch.manual_seed(0)
    teacher = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16)
    student = build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16)
    cfg = TrainConfig(**{**dict(bits=16, epochs=1, batch_size=16, topk=20, progress=False), **settings})
    tmp_path.mkdir(exist_ok=True)
    return lambda clusters: train_student(student, teacher, clusters, data.train_images, data.test_images[:10],
                                          data.test_labels[:10], data.train_images[:60], data.train_labels[:60], cfg,
                                          tmp_path)


def test_a_kd_baseline_trains_without_clusters_under_its_own_name(tmp_path):
    scores = _student_run(tmp_path, kd="pkt")(None)
    assert set(scores) == {"val_map_symmetric", "val_map_asymmetric"}
    assert (tmp_path / "student_pkt.pt").exists() and not (tmp_path / "student_brcd.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["model"] for r in log} == {"student_pkt"} and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.parametrize("kd, clusters, message", [("fitnet", None, "kd must be one of"),
                                                   ("brcd", None, "needs the clusters")])
def test_student_settings_are_refused_first(tmp_path, kd, clusters, message):
    with pytest.raises(ValueError, match=message):
        _student_run(tmp_path, kd=kd)(clusters)
    assert not (tmp_path / "metrics.jsonl").exists()


# The parameters each memory-bank objective adds to the optimizer: CRD's two heads; CRCD's heads, two relation modules
# of three layers and two critics; PACKD's student head (the teacher's 16-bit codes are only normalised).
_OBJECTIVE_PARAMETERS = {"crd": 4, "crcd": 4 + 2 * 6 + 2 * 2, "packd": 2}


@pytest.mark.parametrize("kd", sorted(_OBJECTIVE_PARAMETERS))
def test_memory_objectives_train_their_layers_and_resume_exactly(tmp_path, kd):
    """The heads of a memory-bank baseline train with the student and its memory is part of the resume state: an
    interrupted run continues as the straight one ran."""
    _student_run(tmp_path / "straight", kd=kd, epochs=2)(None)
    _student_run(tmp_path / "resumed", kd=kd, epochs=1)(None)
    _student_run(tmp_path / "resumed", kd=kd, epochs=2, resume=True)(None)
    a = torch.load(tmp_path / "straight" / f"student_{kd}.last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / f"student_{kd}.last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("state_dict", "objective"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    first = torch.load(tmp_path / "resumed" / f"student_{kd}.pt", weights_only=True)
    assert any(key.startswith("kd_loss.memory_") for key in a["objective"])
    assert "kd_loss.embed_student.weight" in a["objective"]
    student_parameters = len(list(build_model(STUDENT_DEFAULT, 16, in_chans=1, img_size=16).parameters()))
    assert len(a["optimizer"]["state"]) == student_parameters + _OBJECTIVE_PARAMETERS[kd]
    assert first["config"]["kd"] == kd


def test_sskd_gets_both_models_codes_of_the_rotated_batch(tmp_path, monkeypatch):
    from brcd.objectives import KDBaselineObjective

    seen = []
    forward = KDBaselineObjective.forward

    def spy(self, *args, **kwargs):
        seen.append({k: tuple(tuple(t.shape) for t in v) for k, v in kwargs.items()})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(KDBaselineObjective, "forward", spy)
    scores = _student_run(tmp_path, kd="sskd")(None)
    assert set(scores) == {"val_map_symmetric", "val_map_asymmetric"} and (tmp_path / "student_sskd.pt").exists()
    assert seen and all(call == {"rotated": ((48, 16), (48, 16))} for call in seen)  # 3 x batch 16, 16 bits
