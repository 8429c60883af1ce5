import pytest
import torch
from torch import nn

from moco.errors import CheckpointError, MocoError
from moco.models import create
from moco.train import evaluate, fit, load_checkpoint, predict, save_checkpoint


def blobs(n=400, seed=0):
    """Four well separated classes of 1x8x8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[torch.arange(n), 0, y, y] += 3.0
    return x, y


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4))


def test_fit_learns_and_evaluate_reports_accuracy():
    x, y = blobs()
    torch.manual_seed(0)
    model = small_net()
    result = fit(model, (x, y), epochs=3, lr=1e-2, progress=False)
    assert len(result.history) == 3 and result.stopped == "epochs"
    assert evaluate(model, blobs(seed=1)).accuracy > 0.95
    assert predict(model, x[:5]).shape == (5, 4)


def test_fit_is_seeded_and_leaves_the_global_rng_alone():
    x, y = blobs()
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        model = small_net()
        state = torch.random.get_rng_state()
        fit(model, (x, y), epochs=1, seed=7, progress=False)
        assert torch.equal(state, torch.random.get_rng_state())
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_fit_stops_at_the_target_train_accuracy():
    x, y = blobs()
    torch.manual_seed(0)
    result = fit(small_net(), (x, y), epochs=50, lr=1e-2, target_train_accuracy=0.9, progress=False)
    assert result.stopped == "target"
    assert result.history[-1].train_accuracy >= 0.9
    assert len(result.history) < 50


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    x, y = blobs()
    torch.manual_seed(0)
    straight = small_net()
    resumed = small_net()
    resumed.load_state_dict(straight.state_dict())
    fit(straight, (x, y), epochs=2, seed=3, progress=False)
    ckpt = tmp_path / "run.pt"
    fit(resumed, (x, y), epochs=1, seed=3, checkpoint=ckpt, progress=False)  # "interrupted" after epoch 1
    again = small_net()
    result = fit(again, (x, y), epochs=2, seed=3, checkpoint=ckpt, progress=False)
    assert [h.epoch for h in result.history] == [1, 2]
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_cosine_schedule_resumes_on_the_same_curve(tmp_path, monkeypatch):
    import moco.train as train_mod

    x, y = blobs()
    torch.manual_seed(0)
    straight, again = small_net(), small_net()
    again.load_state_dict(straight.state_dict())
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    fit(straight, (x, y), epochs=3, seed=3, lr=1e-2, schedule="cosine", progress=False)
    real_save = train_mod.save_checkpoint

    def save_then_crash(*args, **kwargs):  # the run dies right after epoch 1's checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        fit(again, (x, y), epochs=3, seed=3, lr=1e-2, schedule="cosine", checkpoint=ckpt, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = small_net()
    result = fit(resumed, (x, y), epochs=3, seed=3, lr=1e-2, schedule="cosine", checkpoint=ckpt, progress=False)
    assert [h.epoch for h in result.history] == [1, 2, 3]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # and the schedule matters: a constant rate ends elsewhere
    constant = small_net()
    constant.load_state_dict(start)
    fit(constant, (x, y), epochs=3, seed=3, lr=1e-2, progress=False)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(straight.parameters(), constant.parameters()))
    with pytest.raises(MocoError, match="schedule"):
        fit(small_net(), (x, y), schedule="linear", progress=False)


def test_checkpoint_round_trip_rebuilds_a_zoo_model(tmp_path):
    model = create("fashion_cnn", c1_channels=4, c2_channels=4, hidden=8)
    arch = {"name": "fashion_cnn", "kwargs": {"c1_channels": 4, "c2_channels": 4, "hidden": 8}}
    path = save_checkpoint(model, tmp_path / "m.pt", arch=arch, meta={"accuracy_test": 0.5})
    loaded, meta = load_checkpoint(path)
    assert meta["accuracy_test"] == 0.5 and meta["arch"] == arch
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    plain = tmp_path / "plain.pt"
    torch.save(small_net().state_dict(), plain)
    with pytest.raises(CheckpointError, match="pass model="):
        load_checkpoint(plain)
    model, _ = load_checkpoint(plain, model=small_net())
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(plain, model=create("seed_cnn"))


class Payload:
    """Something a pickle-based loader would execute or rebuild."""


def test_checkpoint_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "moco.checkpoint", "version": 1, "state_dict": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_training_input_errors():
    x, y = blobs(40)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(MocoError, match="NaN"):
        fit(small_net(), (bad, y), progress=False)
    with pytest.raises(MocoError, match="need labels"):
        fit(small_net(), x, progress=False)
    with pytest.raises(MocoError, match="differ in length"):
        fit(small_net(), (x, y[:10]), progress=False)
    with pytest.raises(TypeError, match="pass a tensor, \(x, y\), Dataset or DataLoader"):
        fit(small_net(), [1, 2, 3], progress=False)
    with pytest.raises(MocoError, match="optimizer"):
        fit(small_net(), (x, y), optimizer="lbfgs", progress=False)


def test_checkpoint_meta_with_torch_objects_still_loads_safely(tmp_path):
    # torch.__version__ is a TorchVersion (a str subclass) that weights_only=True refuses to unpickle
    path = save_checkpoint(small_net(), tmp_path / "m.pt", meta={"torch": torch.__version__, "shape": (1, 2)})
    _, meta = load_checkpoint(path, model=small_net())
    assert meta["torch"] == str(torch.__version__) and meta["shape"] == [1, 2]


def test_pretrained_caches_and_retrains_a_stale_recipe(tmp_path, monkeypatch):
    import moco.train as train_mod

    monkeypatch.setenv("MOCO_CACHE", str(tmp_path))
    monkeypatch.setitem(train_mod._RECIPES, ("lenet5", "digits"), dict(epochs=1, batch_size=256, lr=1e-3, optimizer="adam"))
    _, meta = train_mod.pretrained("lenet5", "digits", progress=False)
    _, again = train_mod.pretrained("lenet5", "digits", progress=False)
    assert again["train_seconds"] == meta["train_seconds"]  # loaded, not retrained
    monkeypatch.setitem(train_mod._RECIPES, ("lenet5", "digits"), dict(epochs=1, batch_size=256, lr=2e-3, optimizer="adam"))
    _, changed = train_mod.pretrained("lenet5", "digits", progress=False)
    assert changed["recipe"]["lr"] == 2e-3  # the cache entry of the old recipe was not reused


def test_fit_distils_from_a_teacher_and_leaves_it_untouched():
    x, y = blobs()
    torch.manual_seed(0)
    teacher = small_net()
    fit(teacher, (x, y), epochs=3, lr=1e-2, progress=False)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        answers = teacher.eval()(x).argmax(1)
    teacher.train()
    wrong = (answers + 1) % 4  # labels that never match the teacher: pure distillation must ignore them
    agreement = {}
    for d in (0.0, 1.0):
        torch.manual_seed(1)
        student = small_net()
        fit(student, (x, wrong), epochs=5, lr=1e-2, teacher=teacher, distillation=d, progress=False)
        agreement[d] = float((predict(student, x).argmax(1) == answers).float().mean())
    assert agreement[1.0] > 0.9 and agreement[0.0] < 0.1, agreement
    assert teacher.training and all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    with pytest.raises(MocoError, match="teacher is the model"):
        fit(teacher, (x, y), teacher=teacher, progress=False)
    with pytest.raises(MocoError, match="distillation"):
        fit(small_net(), (x, y), teacher=teacher, distillation=2.0, progress=False)
