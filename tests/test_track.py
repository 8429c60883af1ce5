"""MLflow tracking (``moco.track``): a Tracker's params, per-epoch metrics, tags and artifacts read back with
MLflow's own client, from the embedded SQLite store and from a real ``mlflow server`` process; ``moco run
--track`` and ``moco bench --track`` end to end; bad tracking URIs fail with one line.

Every test runs in its own working directory (nothing is written into the repository) with
``MLFLOW_TRACKING_URI`` unset unless the test sets it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from moco.errors import MocoError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True, scope="module")
def _repository_stays_clean():
    """No MLflow store or artifact folder appears in the repository (each test works in its own folder)."""
    before = {p: p.exists() for p in (REPO / "mlflow.db", REPO / "mlruns", REPO / "mlartifacts")}
    yield
    assert {p: p.exists() for p in before} == before


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """A SQLite store shared by the module's tests (MLflow migrates a new database once: seconds)."""
    from moco.track.tracking import _client

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old = Path.cwd()
    os.chdir(folder)  # MLflow fixes the artifact root (./mlruns) when the store opens
    try:
        _client(uri)
    finally:
        os.chdir(old)
    return folder, uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free local port (SQLite backend, artifacts served by the server);
    yields its URI, killed with its workers at teardown."""
    folder = tmp_path_factory.mktemp("server")
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
           f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(folder / "server.log", "wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 180 s: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out.add(f.path)
        if f.is_dir:
            out |= _artifacts(client, run_id, f.path)
    return out


# ---------------------------------------------------------------------------------------- the package

def test_import_moco_track_imports_no_mlflow_optuna_or_lightning():
    code = ("import sys, moco.track, moco.track.tracking; from moco.track import resolve_tracking_uri; "
            "resolve_tracking_uri('x.db'); print(sorted(m for m in ('mlflow', 'optuna', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------- the URI

def test_resolve_tracking_uri_precedence_and_paths(tmp_path, monkeypatch):
    from moco.track import DEFAULT_TRACKING_URI, resolve_tracking_uri

    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # the working directory
    with pytest.raises(MocoError, match="MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///"):
        resolve_tracking_uri("folder")  # MLflow 3 refuses folder stores unless asked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "envstore"))
    assert resolve_tracking_uri() == (tmp_path / "envstore").resolve().as_uri()  # a folder -> file: URI
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"  # explicit wins
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{tmp_path.resolve() / 'runs.db'}"
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path.resolve()}/a.db"
    assert resolve_tracking_uri(f"file://{tmp_path}/f") == (tmp_path / "f").resolve().as_uri()
    assert resolve_tracking_uri("my runs") == (tmp_path / "my runs").resolve().as_uri()  # spaces in a path are fine
    assert resolve_tracking_uri("databricks") == "databricks"


@pytest.mark.parametrize("uri, words", [
    ("foo://x", ["unknown scheme 'foo'", "sqlite:///"]),
    ("http://127.0.0.1:1", ["no MLflow server answers", "mlflow server"]),
    ("http://", ["names no host"]),
    ("sqlite://", ["malformed"]),
    ("sqlite:///no/such/folder/mlflow.db", ["does not exist"]),
    ("postgresql://127.0.0.1:1/db", ["cannot connect to 127.0.0.1:1"]),
    ("postgresql:///db", ["names no database host"]),
])
def test_bad_tracking_uris_name_the_fix(uri, words):
    from moco.track import resolve_tracking_uri

    t0 = time.monotonic()
    with pytest.raises(MocoError) as err:
        resolve_tracking_uri(uri)
    assert time.monotonic() - t0 < 10, "an unreachable store must fail fast, not after MLflow's retries"
    for w in words:
        assert w in str(err.value)


def test_a_file_is_not_a_folder_store(tmp_path, monkeypatch):
    from moco.track import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MocoError, match="is a file, not a folder"):
        resolve_tracking_uri(str(tmp_path / "afile"))
    with pytest.raises(MocoError, match="is a folder"):
        resolve_tracking_uri(f"sqlite:///{tmp_path}")


def test_env_uri_errors_name_the_variable(monkeypatch):
    from moco.track import resolve_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://x")
    with pytest.raises(MocoError, match="MLFLOW_TRACKING_URI 'foo://x': unknown scheme"):
        resolve_tracking_uri()


# ------------------------------------------------------------------------------------------ Tracker

def test_flatten_and_metric_filtering():
    from moco.track import flatten

    nested = {"a": {"b": 1, "c": [1, 2]}, "steps": [{"method": "prune"}], "big": list(range(500))}
    assert flatten(nested, lists="keep") == {"a.b": 1, "a.c": [1, 2], "steps.0.method": "prune",
                                             "big": list(range(500))}
    flat = flatten(nested)
    assert flat["a.c.1"] == 2 and flat["steps.0.method"] == "prune" and "big.0" not in flat  # long lists are data


def _log_everything(uri: str, experiment: str) -> str:
    """The same logging against any store; returns the run id."""
    import matplotlib.pyplot as plt

    from moco.track import Tracker, log_environment
    from moco.train import EpochLog

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 26 * 26, 10))
    with Tracker(experiment, tracking_uri=uri, run_name="cnn", tags={"purpose": "test"}) as t:
        log_environment(t)
        t.log_params({"model": {"spec": "mynet.py:Net", "args": {"width": 16}}, "lr": 1e-3, "fractions": [0.5, 1.0],
                      "long": "x" * 7000})
        t.log_params({"lr": 1e-3})  # the same value again: fine
        with pytest.raises(MocoError, match="cannot change"):
            t.log_params({"lr": 2e-3})
        callback = t.epoch_callback()
        for epoch in (1, 2, 3):
            callback(EpochLog(epoch, loss=1.0 / epoch, train_accuracy=0.5 + epoch / 10, val_accuracy=0.4 + epoch / 10,
                              seconds=0.25))
        t.log_metrics({"test_accuracy": 0.9, "macs": 2.5e6, "latency_ms": torch.tensor(0.41), "nan": float("nan"),
                       "text": "n/a", "exits": {"fraction": [0.7, 0.3]}, "ok": True})
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        t.log_figure(fig, "curves")
        plt.close(fig)
        t.log_dict({"best": {"lr": 1e-3}}, "best")
        t.log_text("hello\n", "notes/readme.txt")
        (Path.cwd() / "folder").mkdir()
        (Path.cwd() / "folder" / "a.csv").write_text("x\n1\n")
        t.log_artifact(Path.cwd() / "folder")
        t.log_model(model, arch={"spec": "torch.nn:Sequential"})
        with t.child("child") as c:
            c.log_metrics({"z": 1.0})
        child_id = c.run_id
    assert t.experiment_id and t.tracking_uri == uri
    client = _client(uri)
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == t.run_id and child.data.metrics == {"z": 1.0}
    return t.run_id


def _check_everything(uri: str, run_id: str, tmp_path: Path) -> None:
    from moco.track import load_state_dict

    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "cnn"
    p = run.data.params
    assert p["model.spec"] == "mynet.py:Net" and p["model.args.width"] == "16" and p["lr"] == "0.001"
    assert p["fractions"] == "[0.5, 1.0]" and len(p["long"]) == 6000 and p["long"].endswith("...")
    m = run.data.metrics
    assert m["test_accuracy"] == 0.9 and m["macs"] == 2.5e6 and m["latency_ms"] == pytest.approx(0.41)
    assert m["exits.fraction.0"] == pytest.approx(0.7) and m["ok"] == 1.0
    assert "nan" not in m and "text" not in m
    history = client.get_metric_history(run_id, "train_accuracy")
    assert [(h.step, round(h.value, 6)) for h in sorted(history, key=lambda h: h.step)] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert [h.step for h in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert {h.value for h in client.get_metric_history(run_id, "epoch_seconds")} == {0.25}
    tags = run.data.tags
    assert tags["purpose"] == "test" and tags["torch.version"] == torch.__version__
    assert int(tags["threads"]) == torch.get_num_threads() and "moco.version" in tags and "platform" in tags
    files = _artifacts(client, run_id)
    assert {"curves.png", "best.json", "notes/readme.txt", "folder/a.csv", "model/arch.json",
            "model/state_dict.pt"} <= files
    got = Path(client.download_artifacts(run_id, "model", str(tmp_path)))
    arch = json.loads((got / "arch.json").read_text())
    assert arch["arch"] == {"spec": "torch.nn:Sequential"} and arch["parameters"] == 30 + 3 * 26 * 26 * 10 + 10
    state = load_state_dict(got)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.load(got / "state_dict.pt", weights_only=True)  # plain tensors: loads without unpickling code
    best = Path(client.download_artifacts(run_id, "best.json", str(tmp_path)))
    assert json.loads(best.read_text()) == {"best": {"lr": 0.001}}


def test_tracker_on_the_embedded_sqlite_store(sqlite_store, tmp_path):
    _, uri = sqlite_store
    run_id = _log_everything(uri, "embedded")
    _check_everything(uri, run_id, tmp_path)


def test_tracker_against_a_real_mlflow_server(mlflow_server, tmp_path, capsys):
    run_id = _log_everything(mlflow_server, "served")
    out = capsys.readouterr().out
    assert "View run" not in out and "http" not in out  # MLflow's banner goes to stderr, not stdout
    _check_everything(mlflow_server, run_id, tmp_path)


def test_default_store_is_mlflow_db_in_the_working_directory(sqlite_store, monkeypatch):
    from moco.track import Tracker

    folder, uri = sqlite_store
    monkeypatch.chdir(folder)  # its mlflow.db is the default store there
    with Tracker("default-store") as t:
        t.log_metrics({"x": 1.0})
    assert t.tracking_uri == uri
    assert _client(uri).get_run(t.run_id).data.metrics == {"x": 1.0}


def test_a_failing_block_marks_the_run_failed_with_the_error(sqlite_store):
    from moco.track import Tracker

    _, uri = sqlite_store
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker("failures", tracking_uri=uri, run_name="bad") as t:
            raise RuntimeError("boom")
    run = _client(uri).get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"


def test_epochs_reported_inside_observe_epochs_reach_the_tracker(sqlite_store):
    from moco.track import Tracker, notify_epoch, observe_epochs

    _, uri = sqlite_store
    notify_epoch({"epoch": 1, "loss": 9.0})  # nobody listens: nothing happens
    with Tracker("observe", tracking_uri=uri) as t:
        with observe_epochs(t.epoch_callback()):
            for retrain in range(2):  # two trainings of two epochs each (a retrain per pruning step)
                for epoch in (1, 2):
                    notify_epoch({"epoch": epoch, "loss": 1.0 / (epoch + retrain), "train_accuracy": (1, 0.5)})
        notify_epoch({"epoch": 3, "loss": 7.0})  # outside the block: not logged
    client = _client(uri)
    assert [h.step for h in client.get_metric_history(t.run_id, "loss")] == [1, 2, 3, 4]  # no step twice
    assert [h.value for h in client.get_metric_history(t.run_id, "epoch")] == [1, 2, 1, 2]
    assert {h.value for h in client.get_metric_history(t.run_id, "train_accuracy.1")} == {0.5}


# ------------------------------------------------------------------------------------ moco bench --track

@pytest.fixture(scope="module")
def tiny_benchmarks():
    """Two benchmarks registered for these tests: one that trains a linear model 2 epochs, one that fails."""
    from moco.bench import register

    @register("track-test-tiny", "tracking test: fits a linear model for 2 epochs on 64 random samples")
    def tiny(quick: bool, seed: int, out=print) -> dict:
        from moco.train import fit

        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(64, 1, 2, 2, generator=g), torch.randint(0, 3, (64,), generator=g)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        res = fit(model, (x, y), epochs=2, batch_size=16, lr=1e-2, seed=seed, progress=False)
        out("epoch  train_accuracy")
        for h in res.history:
            out(f"{h.epoch:5d}  {h.train_accuracy:.4f}")
        return {"train_accuracy": res.history[-1].train_accuracy, "epochs": len(res.history),
                "config": {"samples": 64, "lr": 1e-2}, "per_class": {"0": 0.5, "1": [0.25, 0.75]}, "note": "tiny"}

    @register("track-test-fails", "tracking test: raises")
    def fails(quick: bool, seed: int, out=print) -> dict:
        out("about to fail")
        raise MocoError("the benchmark broke")

    return "track-test-tiny", "track-test-fails"


def _cli(capsys, *argv):
    from moco.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_bench_track_logs_one_run_per_benchmark(store, tiny_benchmarks, sqlite_store, request, capsys, tmp_path):
    uri = sqlite_store[1] if store == "sqlite" else request.getfixturevalue("mlflow_server")
    code, out, err = _cli(capsys, "bench", tiny_benchmarks[0], "--track", "--tracking-uri", uri, "--experiment",
                          f"bench-{store}", "--seed", "3")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])  # the last stdout line is still the JSON
    assert "tracked: MLflow run" in err and "View run" not in out
    client = _client(uri)
    run = client.get_run(result["meta"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == tiny_benchmarks[0]
    m, p = run.data.metrics, run.data.params
    assert m["train_accuracy"] == pytest.approx(result["train_accuracy"]) and m["epochs"] == 2
    assert m["per_class.1.1"] == 0.75 and m["meta.seed"] == 3 and m["meta.wall_s"] == result["meta"]["wall_s"]
    assert p["benchmark"] == tiny_benchmarks[0] and p["seed"] == "3" and p["quick"] == "false"
    assert p["config.samples"] == "64"
    epochs = client.get_metric_history(run.info.run_id, "epoch/train_accuracy")  # the fit's epochs
    assert [h.step for h in epochs] == [1, 2] and epochs[-1].value == pytest.approx(result["train_accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "train_accuracy")) == 1  # the JSON's own value
    assert run.data.tags["moco.kind"] == "bench" and run.data.tags["benchmark"] == tiny_benchmarks[0]
    assert {"result.json", "table.txt"} <= _artifacts(client, run.info.run_id)
    table = Path(client.download_artifacts(run.info.run_id, "table.txt", str(tmp_path))).read_text()
    assert table.startswith("epoch  train_accuracy") and result["meta"]["mlflow_run_id"] not in table
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))).read_text())
    assert logged == result


def test_bench_track_marks_a_failing_benchmark_failed(tiny_benchmarks, sqlite_store, capsys):
    _, uri = sqlite_store
    code, _, err = _cli(capsys, "bench", tiny_benchmarks[1], "--tracking-uri", uri, "--experiment", "bench-fail")
    assert code == 2 and "the benchmark broke" in err
    client = _client(uri)
    exp = client.get_experiment_by_name("bench-fail")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and "the benchmark broke" in run.data.tags["error"]


# -------------------------------------------------------------------------------------- moco run --track

@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """examples/mynet.py:Net at width 4 with seeded random weights on scikit-learn's digits: profile, exits."""
    folder = tmp_path_factory.mktemp("tiny")
    shutil.copy(EXAMPLES / "mynet.py", folder / "mynet.py")
    sys.path.insert(0, str(folder))
    try:
        import importlib

        mynet = importlib.import_module("mynet")
        torch.manual_seed(0)
        torch.save(mynet.Net(width=4).state_dict(), folder / "mynet.pt")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynet", None)
    cfg = folder / "tiny.toml"
    cfg.write_text('seed = 0\n[model]\nspec = "mynet.py:Net"\nweights = "mynet.pt"\nargs = { width = 4 }\n'
                   '[data]\ntrain = "digits:train"\ntest = "digits:test"\ntrain_size = 600\n[measure]\ntiming = false\n'
                   '[[steps]]\nmethod = "profile"\nlatency = false\n'
                   '[[steps]]\nmethod = "exits"\nepochs = 2\ntarget = 0.5\n')
    return cfg


@pytest.mark.parametrize("store", ["default", "server"])
def test_run_track_logs_a_parent_run_and_one_nested_run_per_step(store, tiny_config, sqlite_store, request, capsys,
                                                                  monkeypatch, tmp_path):
    if store == "default":
        folder, uri = sqlite_store
        monkeypatch.chdir(folder)  # the default store: mlflow.db in the working directory
        extra = []
    else:
        uri = request.getfixturevalue("mlflow_server")
        extra = ["--tracking-uri", uri]
    code, out, err = _cli(capsys, "run", str(tiny_config), "--track", "--out", str(tmp_path / "run"), *extra)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert "tracked: MLflow run" in out and "View run" not in out
    client = _client(uri)
    exp = client.get_experiment_by_name("moco")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.run_name)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    p, m, tags = parent.data.params, parent.data.metrics, parent.data.tags
    assert p["model.spec"] == "mynet.py:Net" and p["model.args.width"] == "4" and p["steps.1.method"] == "exits"
    assert p["seed"] == "0" and tags["seed"] == "0" and tags["config"] == "tiny" and tags["moco.kind"] == "run"
    assert tags["torch.version"] == torch.__version__ and "threads" in tags
    assert m["accuracy_base"] == pytest.approx(summary["accuracy_base"])
    assert m["accuracy_final"] == pytest.approx(summary["accuracy_final"])
    assert m["macs_reduction"] == pytest.approx(summary["macs_reduction"])
    series = client.get_metric_history(parent.info.run_id, "test_accuracy")
    assert [h.step for h in series] == [0, 1, 2]  # the original, then each step
    assert series[0].value == pytest.approx(summary["accuracy_base"]) and series[2].value == pytest.approx(
        summary["accuracy_final"])
    assert m["param_count"] > 0 and m["macs"] == pytest.approx(summary["macs_final"])
    assert {"report.md", "report.json", "config.json", "model/arch.json", "model/state_dict.pt"} <= _artifacts(
        client, parent.info.run_id)
    arch = json.loads(Path(client.download_artifacts(parent.info.run_id, "model/arch.json", str(tmp_path))).read_text())
    assert arch["arch"]["spec"] == "mynet.py:Net" and arch["arch"]["stage"] == "exits"
    assert [c.info.run_name for c in children] == ["01-profile", "02-exits"]
    assert all(c.info.status == "FINISHED" for c in children)
    exits = children[1]
    assert exits.data.params["epochs"] == "2" and exits.data.params["target"] == "0.5"
    assert exits.data.params["mode"] == "retrofit"  # the step's defaults are logged too
    assert "certified.bound" in exits.data.metrics and "exit_fraction.0" in exits.data.metrics
    assert any(f.startswith("02-exits/") for f in _artifacts(client, exits.info.run_id))
    loss = client.get_metric_history(exits.info.run_id, "loss")
    assert [h.step for h in loss] == [1, 2], "the exits step trains 2 epochs: one loss per epoch"
    assert len(client.get_metric_history(exits.info.run_id, "train_accuracy.0")) == 2  # per exit
    assert client.get_metric_history(children[0].info.run_id, "loss") == []  # profile trains nothing


def test_run_track_with_a_bad_uri_fails_before_any_work(tiny_config, capsys, tmp_path, monkeypatch):
    out = tmp_path / "never"
    for uri in ("foo://x", "http://127.0.0.1:1"):
        code, stdout, err = _cli(capsys, "run", str(tiny_config), "--track", "--tracking-uri", uri, "--out", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("moco: error: tracking URI")
        assert not out.exists() and stdout == ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://x")
    code, _, err = _cli(capsys, "prune", "mynet.py:Net", "--data", "digits", "--track", "--out", str(out))
    assert code == 2 and "MLFLOW_TRACKING_URI 'foo://x'" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, "bench", "baselines", "--track")
    assert code == 2 and "unknown scheme" in err
    assert not (Path.cwd() / "mlflow.db").exists()


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Not MLflow's ./mlruns of whichever directory the process runs in: beside the .db file."""
    from moco.track import Tracker

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with Tracker("beside", tracking_uri=uri) as t:
        t.log_text("hello", "note.txt")
        run_id = t.run_id
    assert list((store / "mlruns").rglob("note.txt")), "the artifact is not beside the database"
    assert not (elsewhere / "mlruns").exists()
    from mlflow import MlflowClient

    assert MlflowClient(uri).get_run(run_id).info.artifact_uri.startswith((store / "mlruns").as_uri())
