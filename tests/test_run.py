"""``moco run``: every example config runs at reduced size on a user's model (examples/mynet.py:Net, not in
the zoo), the report and the JSON line hold what they promise, and bad configs fail clearly."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from moco.errors import MocoError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N_TRAIN, N_TEST = 1500, 400

# per-method settings that keep each example to seconds (the example files hold the real defaults)
SMALL = {
    "prune": {"max_steps": 2, "retrain_samples": 500, "finetune_epochs": 1, "drop_threshold": 0.1, "lr": 1e-3},
    "pfa": {"fractions": [0.5, 1.0], "finetune_samples": 500, "introspect_samples": 300, "round_to": 8},
    "exits": {"epochs": 1, "target": 0.05},
    "rules": {"samples": N_TRAIN, "max_error": 0.3},
    "export": {"calibration_samples": 64},
    "profile": {"latency": False},
    "approx": {"gradient_epochs": 1, "approx_epochs": 1, "calibration_samples": 256, "selection_samples": 128},
    "quantize": {"calibration_samples": 256},
}


def _fashion_available() -> bool:
    from moco.data import available_datasets

    return "fashion_mnist" in available_datasets()


pytestmark = pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST files not under the data root")


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """examples/mynet.py:Net trained briefly on Fashion-MNIST: its folder with mynet.py and mynet.pt."""
    from moco.specs import resolve_data
    from moco.train import fit

    folder = tmp_path_factory.mktemp("user")
    shutil.copy(EXAMPLES / "mynet.py", folder / "mynet.py")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_for_test", folder / "mynet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Net(width=16)
    train = resolve_data("fashion_mnist:train").subset(4000, 0)
    fit(model, train.tensors(), epochs=2, lr=3e-3, progress=False)
    torch.save(model.state_dict(), folder / "mynet.pt")
    return folder


def _small_config(name: str, folder: Path, timing: bool = False) -> Path:
    doc = tomllib.loads((EXAMPLES / name).read_text())
    doc["data"].update(train_size=N_TRAIN, test_size=N_TEST)
    doc["measure"] = {"timing": timing, "batch_size": 128, "batches": 1, "repeats": 1, "warmup": 0}
    for step in doc["steps"]:
        step.update(SMALL.get(step["method"], {}))
    path = folder / name
    path.write_text(_toml(doc))
    return path


def _toml(doc: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, (dict, list))]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += [f"[{k}]", *(f"{a} = {value(b)}" for a, b in v.items())]
    for step in doc.get("steps", []):
        lines += ["[[steps]]", *(f"{a} = {value(b)}" for a, b in step.items())]
    return "\n".join(lines) + "\n"


def _run_cli(capsys, *argv):
    from moco.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.toml"))


def test_every_method_has_an_example():
    methods = {s["method"] for p in EXAMPLES.glob("*.toml") for s in tomllib.loads(p.read_text())["steps"]}
    assert {"profile", "prune", "pfa", "exits", "rules", "export"} <= methods
    chained = [p for p in EXAMPLES.glob("*.toml") if len(tomllib.loads(p.read_text())["steps"]) > 1]
    assert chained, "one example chains several steps"


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_config_runs_on_a_user_model(name, user_model, tmp_path, capsys):
    cfg = _small_config(name, user_model, timing=name == "chain.toml")
    out = tmp_path / "out"
    code, stdout, err = _run_cli(capsys, "run", str(cfg), "--out", str(out))
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    for key in ("accuracy_base", "accuracy_final", "agreement", "macs_reduction", "ratio_vs_eager", "steps", "out"):
        assert key in summary
    doc = tomllib.loads(cfg.read_text())
    assert summary["steps"] == [s["method"] for s in doc["steps"]]
    assert Path(summary["out"]) == out.resolve()
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "mynet.py:Net" in md and "| step |" in md
    config = json.loads((out / "config.json").read_text())
    assert config["environment"]["torch"] == str(torch.__version__) and config["config"]["seed"] == 0
    for i, step in enumerate(report["steps"], 1):
        folder = out / f"{i:02d}-{step['method']}"
        assert folder.is_dir() and (folder / "step.json").is_file()
        assert all(Path(a).exists() for a in step["artifacts"]), step["artifacts"]
        assert 0.0 <= step["agreement"] <= 1.0 and 0.0 <= step["accuracy"] <= 1.0
    last = report["steps"][-1]
    if last["method"] in ("profile",) or (last["method"] == "exits" and not any(last["summary"]["thresholds"])):
        assert summary["agreement"] == 1.0
    if name == "chain.toml":
        assert summary["ratio_vs_eager"] is not None and summary["ratio_vs_onnxruntime"] is not None
        assert [s["method"] for s in report["steps"]] == ["prune", "exits", "export"]
        assert report["steps"][0]["params"] < report["base"]["params"]  # pruning made it smaller
        assert (out / "03-export" / "deployed").is_dir()
    if "exits" in summary["steps"]:
        step = next(s for s in report["steps"] if s["method"] == "exits")
        if any(t is not None for t in step["summary"]["thresholds"]):
            assert summary["certified"] and summary["certified"][0]["bound"] <= 0.05
        else:  # every exit off: the unchanged model certifies nothing, and the step says so
            assert not summary["certified"] and step["changed"].startswith("nothing: calibration turned every exit")


def test_measured_accuracy_and_agreement_are_real(user_model, tmp_path):
    """The report's numbers equal an independent evaluation of the saved model."""
    from moco.compress.surgery import load
    from moco.run import load_config, run_config
    from moco.specs import resolve_data, resolve_model

    cfg = load_config(_small_config("prune.toml", user_model))
    res = run_config(cfg, tmp_path / "out")
    base = resolve_model("mynet.py:Net", weights="mynet.pt", args={"width": 16}, base_dir=user_model).model
    small = load(tmp_path / "out" / "01-prune" / "model", base=base).eval()
    test = resolve_data("fashion_mnist:test").subset(N_TEST, 1)
    with torch.no_grad():
        pred_small, pred_base = small(test.x).argmax(1), base(test.x).argmax(1)
    rec = res.steps[0]
    assert rec.accuracy == pytest.approx(float((pred_small == test.y).float().mean()))
    assert rec.agreement == pytest.approx(float((pred_small == pred_base).float().mean()))
    assert res.base["accuracy"] == pytest.approx(float((pred_base == test.y).float().mean()))
    assert rec.macs < res.base["macs"]
    assert str(res) == res.to_text() and "01-prune" in res.to_text()
    assert len(res.to_frame()) == 2
    # the saved model rebuilds without base=: model.json records the user's spec with its file made absolute
    doc = json.loads((tmp_path / "out" / "01-prune" / "model.json").read_text())
    assert doc["spec"] == {"model": f"{(user_model / 'mynet.py').resolve()}:Net", "args": {"width": 16}}
    alone = load(tmp_path / "out" / "01-prune" / "model").eval()
    with torch.no_grad():
        assert torch.equal(alone(test.x), small(test.x))


def test_method_command_without_a_config(user_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(user_model)
    code, out, err = _run_cli(capsys, "exits", "mynet.py:Net", "--weights", "mynet.pt", "--arg", "width=16",
                              "--data", "fashion_mnist", "--train-size", str(N_TRAIN), "--test-size", str(N_TEST),
                              "--set", "epochs=1", "--set", "target=0.05", "--no-timing", "--out", str(tmp_path / "o"))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == ["exits"] and (tmp_path / "o" / "01-exits" / "exits.json").is_file()


def test_profile_takes_any_model_spec(user_model, capsys, monkeypatch):
    monkeypatch.chdir(user_model)
    code, out, err = _run_cli(capsys, "profile", "mynet.py:Net", "--input-shape", "1,28,28", "--no-latency")
    assert code == 0, err
    assert "stem" in out and "bottleneck" in out


def test_rules_that_certify_nothing_fail_the_step_with_advice(user_model, tmp_path):
    from moco.run import config_from_dict, run_config

    doc = {"model": {"spec": "mynet.py:Net", "weights": "mynet.pt", "args": {"width": 16}},
           "data": {"train": "fashion_mnist:train", "test": "fashion_mnist:test", "train_size": 600, "test_size": 100},
           "measure": {"timing": False},
           "steps": [{"method": "rules", "layer": "stem", "max_error": 0.03, "samples": 600}]}
    with pytest.raises(MocoError, match=r"step 1 \(rules\).*'stem'.*coverage.*later layer.*max_error, or more "
                                        r"training data \(all \d+ were used\)"):
        run_config(config_from_dict(doc, base_dir=user_model), tmp_path / "o")


@pytest.mark.parametrize("doc, needle", [
    ({"data": {"train": "mnist"}, "steps": [{"method": "profile"}]}, r"\[model\] table is missing"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": []}, "no \\[\\[steps\\]\\]"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": [{"method": "squash"}]}, "method must be one of"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": [{"method": "prune", "epochz": 1}]},
     "unknown parameter.*epochz.*prune takes"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": [{"method": "prune", "step": "big"}]},
     "step must be a float"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": [{"method": "profile"}], "sead": 1},
     "unknown key.*sead"),
    ({"model": {"spec": "seed_cnn", "input_shape": [1, -28]}, "data": {"train": "mnist"},
      "steps": [{"method": "profile"}]}, "input_shape must be positive"),
    ({"model": {"spec": "seed_cnn"}, "data": {}, "steps": [{"method": "profile"}]}, "train is required"),
    # ranges of every step are checked when the config is read, not when step N starts
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "profile"}, {"method": "export", "threads": -1}]}, r"step 2 \(export\): threads must be >= 0"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "prune"}, {"method": "exits", "train_samples": 0}]}, "train_samples must be >= 1, got 0"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "prune", "drop_threshold": 1.5}]}, r"drop_threshold must be >= 0 and < 1, got 1.5"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "rules", "max_error": 0.0}]}, r"max_error must be > 0 and < 1"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},          # was refused only when the step ran
      "steps": [{"method": "prune"}, {"method": "exits", "mode": "foo"}]}, r"mode must be one of 'retrofit', 'joint'"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "rules", "pooling": "mean"}]}, r"pooling must be one of 'max', 'avg', got 'mean'"),
    # the step order is checked before anything runs (prune after quantize failed in an fx trace of the model)
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": [{"method": "quantize"}, {"method": "prune"}]},
     r"step 2 \(prune\) cannot follow step 1 \(quantize\): .*fake-quant.*put 'prune' before 'quantize'"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "approx"}, {"method": "profile"}, {"method": "export"}]},
     r"step 3 \(export\) cannot follow step 1 \(approx\).*make 'approx' the last step"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
      "steps": [{"method": "prune"}, {"method": "export"}, {"method": "exits"}]},
     r"step 3 \(exits\) cannot follow step 2 \(export\).*put 'exits' before 'export'"),
    ({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"}, "steps": [{"method": "rules"}, {"method": "pfa"}]},
     r"step 2 \(pfa\) cannot follow step 1 \(rules\)"),
])
def test_bad_configs_are_refused_with_the_key(doc, needle):
    from moco.run import config_from_dict

    with pytest.raises(MocoError, match=needle):
        config_from_dict(doc)


def test_step_orders_that_work_are_accepted():
    from moco.run import config_from_dict

    for methods in (["prune", "pfa", "quantize", "profile", "export"], ["pfa", "exits", "profile", "export"],
                    ["rules", "export", "profile"], ["approx", "profile"]):
        cfg = config_from_dict({"model": {"spec": "seed_cnn"}, "data": {"train": "mnist"},
                                "steps": [{"method": m} for m in methods]})
        assert [s.method for s in cfg.steps] == methods


def test_cli_run_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = [\n")
    code, _, err = _run_cli(capsys, "run", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not valid TOML" in err
    code, _, err = _run_cli(capsys, "run", str(tmp_path / "missing.toml"))
    assert code == 2 and "does not exist" in err
    good = tmp_path / "good.toml"
    good.write_text('[model]\nspec = "seed_cnn"\n[data]\ntrain = "digits"\n[[steps]]\nmethod = "profile"\n')
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _run_cli(capsys, "run", str(good), "--out", str(afile))
    assert code == 2 and "is a file" in err
    code, _, err = _run_cli(capsys, "run", str(good), "--set", "9.epochs=1")
    assert code == 2 and "no step 9" in err


def _user_net(folder):
    from moco.specs import resolve_model

    return resolve_model("mynet.py:Net", args={"width": 16}, base_dir=str(folder), require_weights=False).model


def test_rules_step_without_a_layer_takes_the_suggested_one(user_model, tmp_path):
    from moco.run import config_from_dict, run_config
    from moco.split import split_points

    doc = {"model": {"spec": "mynet.py:Net", "weights": "mynet.pt", "args": {"width": 16}},
           "data": {"train": "fashion_mnist:train", "test": "fashion_mnist:test", "train_size": 800, "test_size": 200},
           "measure": {"timing": False},
           "steps": [{"method": "rules", "max_error": 0.3, "samples": 600}]}
    run_config(config_from_dict(doc, base_dir=user_model), tmp_path / "o")
    step = json.loads((tmp_path / "o" / "report.json").read_text())["steps"][0]
    # the layer came from suggest_layer (the step had crashed on the suggestion's attribute); rules there exit samples
    assert step["summary"]["layer"] in split_points(_user_net(user_model))
    assert step["summary"]["coverage_val"] > 0 and step["exit_fractions"][0] > 0


def test_pfa_step_whose_rounding_keeps_every_layer_whole_says_so(user_model, tmp_path):
    from moco.run import config_from_dict, run_config

    doc = {"model": {"spec": "mynet.py:Net", "weights": "mynet.pt", "args": {"width": 16}},
           "data": {"train": "fashion_mnist:train", "test": "fashion_mnist:test", "train_size": 600, "test_size": 100},
           "measure": {"timing": False},
           "steps": [{"method": "pfa", "fractions": [0.5, 1.0], "round_to": 64, "introspect_samples": 200}]}
    run_config(config_from_dict(doc, base_dir=user_model), tmp_path / "o")
    step = json.loads((tmp_path / "o" / "report.json").read_text())["steps"][0]
    assert step["changed"].startswith("nothing: rounding the kept counts to multiples of 64") and "round_to = 1" in (
        step["changed"])
    assert step["agreement"] == 1.0  # the model handed on is the original, not a fine-tuned copy of it


def test_exits_step_whose_exits_are_all_off_says_so(user_model, tmp_path):
    from moco.run import config_from_dict, run_config

    doc = {"model": {"spec": "mynet.py:Net", "weights": "mynet.pt", "args": {"width": 16}},
           "data": {"train": "fashion_mnist:train", "test": "fashion_mnist:test", "train_size": 1500, "test_size": 100},
           "measure": {"timing": False},
           "steps": [{"method": "exits", "points": ["stem"], "epochs": 1, "target": 0.03, "train_samples": 100}]}
    run_config(config_from_dict(doc, base_dir=user_model), tmp_path / "o")
    step = json.loads((tmp_path / "o" / "report.json").read_text())["steps"][0]
    assert step["summary"]["thresholds"] and all(t is None for t in step["summary"]["thresholds"])
    assert step["changed"].startswith("nothing: calibration turned every exit off") and "looser target" in step["changed"]
    # the unchanged model certifies nothing: no bound in the step or the run's summary
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert step.get("certified") is None and not report["summary"]["certified"]


def test_no_timing_also_skips_the_profile_steps_latency(user_model, tmp_path):
    from moco.run import config_from_dict, run_config

    doc = {"model": {"spec": "mynet.py:Net", "weights": "mynet.pt", "args": {"width": 16}},
           "data": {"train": "fashion_mnist:train", "test": "fashion_mnist:test", "train_size": 200, "test_size": 50},
           "steps": [{"method": "profile"}]}
    for timing in (False, True):
        run_config(config_from_dict({**doc, "measure": {"timing": timing}}, base_dir=user_model), tmp_path / str(timing))
        step = json.loads((tmp_path / str(timing) / "report.json").read_text())["steps"][0]
        assert (step["summary"]["forward_time_s"] is not None) == timing


def test_the_export_step_records_the_data_standardisation(user_model, tmp_path):
    # [data] normalize is part of the model's input contract: the deployed manifest carries it, and the
    # runtime's preprocess(raw images) reproduces the inputs the run measured on
    from moco.deploy import load
    from moco.run import load_config, run_config
    from moco.specs import resolve_data

    path = _small_config("export.toml", user_model)
    doc = tomllib.loads(path.read_text())
    doc["data"]["normalize"] = [0.286, 0.353]
    doc["steps"] = [{"method": "export", "int8": False}]
    path.write_text(_toml(doc))
    run_config(load_config(path), tmp_path / "out")
    rt = load(tmp_path / "out" / "01-export" / "deployed")
    assert rt.normalize == {"mean": [0.286], "std": [0.353]}
    raw = resolve_data("fashion_mnist:test").subset(8, 0)
    normed = resolve_data("fashion_mnist:test", normalize=[0.286, 0.353]).subset(8, 0)
    np.testing.assert_allclose(rt.preprocess(raw.x), normed.x.numpy(), rtol=1e-5, atol=1e-5)


def test_a_run_into_a_used_folder_leaves_nothing_of_the_previous_run(user_model, tmp_path):
    # a failed re-run kept the earlier run's report.json and 02-export/deployed beside its own config.json:
    # a script reading report.json saw a stale success
    from moco.run import config_from_dict, run_config

    out = tmp_path / "o"
    (out / "02-export" / "deployed").mkdir(parents=True)
    (out / "01-rules").mkdir()
    (out / "report.json").write_text("{}")
    (out / "report.md").write_text("old")
    (out / "my-notes.txt").write_text("mine")        # not moco's: kept
    (out / "07-mine").mkdir()                         # not a step folder name: kept
    doc = {"model": {"spec": "mynet.py:Net", "weights": "mynet.pt", "args": {"width": 16}},
           "data": {"train": "fashion_mnist:train", "test": "fashion_mnist:test", "train_size": 300, "test_size": 50},
           "measure": {"timing": False},
           "steps": [{"method": "rules", "layer": "stem", "max_error": 0.001, "samples": 300}]}
    with pytest.raises(MocoError, match=r"step 1 \(rules\)"):
        run_config(config_from_dict(doc, base_dir=user_model), out)
    names = sorted(p.name for p in out.iterdir())
    assert "report.json" not in names and "report.md" not in names and "02-export" not in names
    assert "my-notes.txt" in names and "07-mine" in names and "config.json" in names
