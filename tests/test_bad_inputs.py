"""Bad inputs that used to crash deep inside or pass silently: each now gets a MocoError (a ValueError) that
names the file or argument and the fix, and the CLI answers exit 2 with one line."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

from moco.errors import CheckpointError, MocoError


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ rules artifacts

@pytest.fixture()
def saved_rules(tmp_path):
    from moco import AnalyticsEngine

    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (300, 5)), rng.normal(6, 1, (300, 5))]).astype(np.float32)
    labels = np.repeat([0, 1], 300)
    ae = AnalyticsEngine(feats, {"predictions": labels}, epochs=2, progress=False)
    rules, out = ae.compute_linear_sufficient_rules("predictions", max_error=0.05)
    assert out.certified
    path = rules.save(tmp_path / "r")
    return tmp_path, path


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["thresholds"].update({"0": float("nan")}), "checksum"),
    (lambda d: d["thresholds"].update({"0": -5.0}), "checksum"),
    (lambda d: d.update(classes=[0, 7]), "checksum"),
    (lambda d: d.pop("weights"), "checksum|lacks the field"),
    (lambda d: d.update(format="other"), "not a moco rule file"),
])
def test_tampered_rule_json_is_refused(saved_rules, edit, needle):
    from moco.rules import load_rules

    _, path = saved_rules
    _edit(path, edit)
    with pytest.raises(MocoError, match=needle) as info:
        load_rules(path)
    assert "r.json" in str(info.value)


def test_rule_json_edited_consistently_still_validates_thresholds(saved_rules):
    """Even with a recomputed checksum, a NaN or negative margin threshold is refused."""
    from moco.rules import load_rules
    from moco.rules.rule import _decision_digest

    _, path = saved_rules
    for value, needle in ((float("nan"), "finite numbers"), (-1.0, ">= 0")):
        doc = json.loads(path.read_text())
        doc["thresholds"]["0"] = value
        doc["decision_sha256"] = _decision_digest(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(MocoError, match=needle):
            load_rules(path)


def test_truncated_rule_weights_are_refused(saved_rules):
    from moco.rules import load_rules

    folder, path = saved_rules
    npz = folder / "r.npz"
    npz.write_bytes(npz.read_bytes()[:40])
    with pytest.raises(MocoError, match="checksum"):
        load_rules(path)


def test_analytics_engine_refuses_nan_predictions():
    from moco import AnalyticsEngine

    preds = np.zeros((10, 3), np.float32)
    preds[4, 1] = np.nan
    with pytest.raises(MocoError, match="NaN or inf scores"):
        AnalyticsEngine(np.zeros((10, 2), np.float32), {"predictions": preds})
    with pytest.raises(MocoError, match="class indices"):
        AnalyticsEngine(np.zeros((3, 2), np.float32), {"predictions": np.array([0.0, np.nan, 1.0])})


def test_rules_that_certify_nothing_warn_with_advice():
    from moco import AnalyticsEngine
    from moco.rules.report import UncertifiedRuleWarning

    rng = np.random.default_rng(0)
    ae = AnalyticsEngine(rng.normal(size=(800, 4)).astype(np.float32), {"p": rng.integers(0, 2, 800)}, epochs=1,
                         layer="conv1", progress=False)
    with pytest.warns(UncertifiedRuleWarning, match=r"layer 'conv1'.*coverage.*later layer.*max_error.*samples"):
        rules, out = ae.compute_linear_sufficient_rules("p", max_error=0.02)
    assert not out.certified and out["coverage_val"] == 0
    assert "NOT certified" in str(out) and out.to_dict()["certified"] is False
    assert len(out.to_frame()) == 2  # one row per class


# -------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("arch, needle", [
    ("seed_cnn", "arch that is not"),
    ({"kwargs": {}}, "arch that is not"),
    ({"name": "seed_cnn", "kwargs": [1]}, "kwargs must be a dict"),
    ({"name": "vgg99"}, "cannot build"),
])
def test_checkpoint_with_a_bad_arch(tmp_path, arch, needle):
    from moco.train import load_checkpoint, save_checkpoint

    save_checkpoint(_tiny(), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["arch"] = arch
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(tmp_path / "c.pt")


def test_truncated_or_random_checkpoint(tmp_path):
    from moco.train import load_checkpoint, save_checkpoint

    save_checkpoint(_tiny(), tmp_path / "c.pt", arch={"name": "seed_cnn", "kwargs": {}})
    (tmp_path / "t.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:200])
    (tmp_path / "r.pt").write_bytes(os.urandom(300))
    for name in ("t.pt", "r.pt"):
        with pytest.raises(CheckpointError, match="truncated or was not written by torch.save") as info:
            load_checkpoint(tmp_path / name)
        assert "does not exist" not in str(info.value) and "file an issue" not in str(info.value)


# ------------------------------------------------------------------------------------- output paths

def test_capture_out_that_is_a_folder_fails_before_the_capture(tmp_path):
    from moco import build_embeddings_and_predictions

    calls = []
    model = _tiny()
    model[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(MocoError, match="is a folder"):
        build_embeddings_and_predictions(model, X, 2, out=tmp_path, progress=False)
    assert not calls  # nothing ran


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_cli_output_file_that_is_a_folder(tmp_path, capsys, flag):
    from moco.cli import main

    code = main(["profile", "seed_cnn", "--no-latency", flag, str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a folder" in err


def test_bench_json_that_is_a_folder(tmp_path, capsys):
    from moco.cli import main

    code = main(["bench", "baselines", "--quick", "--json", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err


def test_artifacts_get_the_usual_permissions(tmp_path):
    from moco.io import write_json_atomic

    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------- labels

def test_exits_refuse_labels_outside_the_model_classes():
    from moco.exits import attach_exits, calibrate, train_exits

    net = attach_exits(_tiny(), [2], example_input=X[:1])
    bad = torch.full((64,), 5)
    with pytest.raises(MocoError, match=r"5\.\.5.*0\.\.2 \(the model has 3 outputs\)"):
        train_exits(net, (X, bad), progress=False)
    with pytest.raises(MocoError, match="0..2"):
        calibrate(net, (X, bad), target=0.1, progress=False)
    with pytest.raises(MocoError, match="integer class indices"):
        calibrate(net, (X, torch.rand(64)), target=0.1, progress=False)


def test_fit_refuses_labels_outside_the_model_classes():
    from moco.train import fit

    with pytest.raises(MocoError, match="the model has 3 outputs"):
        fit(_tiny(), (X, torch.full((64,), 3)), progress=False)
    with pytest.raises(MocoError, match="integer class indices"):
        fit(_tiny(), (X, torch.full((64,), 0.5)), progress=False)


def test_evaluate_refuses_labels_outside_the_model_classes():
    from moco.train import evaluate

    with pytest.raises(MocoError, match=r"3\.\.3.*the model has 3 outputs"):
        evaluate(_tiny(), (X, torch.full((64,), 3)))


# ------------------------------------------------------------------------------- wrong input shapes

def _wrong_shape_calls():
    from moco.approx import select_multipliers, train_quant
    from moco.approx.multipliers import library
    from moco.compress.finetune import finetune
    from moco.compress.prune import IterativePruner
    from moco.compress.report import compare_models
    from moco.exits import attach_exits, train_exits
    from moco.train import evaluate, fit, predict

    bad = (torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,)))
    good = (X[:32], torch.randint(0, 3, (32,)))
    quantised = lambda: train_quant(_tiny(), good, epochs=0)  # noqa: E731
    return {
        "fit": lambda: fit(_tiny(), bad, epochs=1, progress=False),
        "finetune": lambda: finetune(_tiny(), bad, epochs=1, progress=False),
        "IterativePruner": lambda: IterativePruner(["0"], progress=False).fit(_tiny(), bad, bad),
        "evaluate": lambda: evaluate(_tiny(), bad),
        "predict": lambda: predict(_tiny(), bad),
        "compare_models": lambda: compare_models(_tiny(), _tiny(), bad, example_input=X[:1]),
        "train_quant": lambda: train_quant(_tiny(), bad, epochs=1, progress=False),
        "select_multipliers": lambda: select_multipliers(quantised(), bad[0], library()[:2],
                                                         sigma={"0": 0.1, "3": 0.1}),
        "train_exits": lambda: train_exits(attach_exits(_tiny(), ["1"], example_input=X[:1]), bad, epochs=1, progress=False),
    }


@pytest.mark.parametrize("name", sorted(_wrong_shape_calls()))
def test_inputs_of_the_wrong_shape_are_one_clear_error(name):
    # 3-channel images for a 1-channel model: the training and evaluation entry points said PyTorch's
    # RuntimeError (through fit, with ~40 frames of Lightning); now one line names the shape and the fix
    needle = (r"per-sample shape \(3, 8, 8\), the network expects \(1, 8, 8\)" if name == "train_exits" else
              r"the model could not (train|run) on inputs of shape \(32, 3, 8, 8\): RuntimeError: .*channels.*"
              r"pass inputs of the shape")
    with pytest.raises(MocoError, match=needle):
        _wrong_shape_calls()[name]()


def test_select_multipliers_refuses_nan_inputs():
    from moco.approx import select_multipliers, train_quant
    from moco.approx.multipliers import library

    q = train_quant(_tiny(), (X[:32], torch.randint(0, 3, (32,))), epochs=0)
    with pytest.raises(MocoError, match="NaN or inf"):   # it failed in torch.bincount
        select_multipliers(q, torch.full((16, 1, 8, 8), float("nan")), library()[:2], sigma={"0": 0.1, "3": 0.1})


def test_analytics_engine_refuses_string_labels_empty_features_and_names_the_confidence_given():
    from moco import AnalyticsEngine, load_rule

    with pytest.raises(MocoError, match="must hold class indices.*map class names to indices"):
        AnalyticsEngine(np.zeros((10, 5)), {"p": np.array(list("abcdefghij"))}, progress=False)  # numpy's isfinite
    with pytest.raises(MocoError, match="features are empty"):
        AnalyticsEngine(np.zeros((0, 5)), {"p": np.zeros(0, int)}, progress=False)   # accepted, failed at fit time
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (100, 3)), rng.normal(6, 1, (100, 3))]).astype(np.float32)
    ae = AnalyticsEngine(feats, {"predictions": np.repeat([0, 1], 100)}, epochs=1, progress=False)
    with pytest.raises(MocoError, match=r"confidence must be in \(0, 1\), got 1.5$"):   # it said "got 1.125"
        ae.compute_linear_sufficient_rule("predictions", 1, confidence=1.5)
    with pytest.raises(TypeError, match="takes the path a rule was saved to.*not int 0"):
        load_rule(0)   # seed 000's load_rule(pred) is its own helper
