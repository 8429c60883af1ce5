"""``moco sweep``: grid/NSGA-II/TPE sweeps on Optuna, two worker processes on one study, a SIGKILL midway and a
resume with nothing lost or duplicated, a failing point, PostgreSQL storage (a real server started here),
a compression (pipeline) sweep, MLflow tracking, and one-line errors for bad sweep files.

Everything is tiny: scikit-learn's bundled digits (1,438 train / 359 test images, always present), a few hundred
images, one or two epochs, grids of 2-6 points, one torch thread per worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moco.errors import MocoError

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _toml(doc: dict) -> str:
    from moco.track.sweep import dumps_toml

    return dumps_toml(doc)


def _doc(name: str = "tiny", params=None, **over) -> dict:
    doc = {
        "name": name, "seed": 0,
        "model": {"spec": "fashion_cnn", "args": {"init": "xavier", "c2_channels": 4}},
        "data": {"train": "digits:train", "test": "digits:test", "train_size": 300, "test_size": 120},
        "train": {"epochs": 1, "batch_size": 50, "lr": 0.02, "optimizer": "sgd"},
        "search": {"sampler": "grid", "label": "Params1",
                   "params": params or {"model.c1_channels": [2, 4], "model.hidden": [8, 16]}},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def _write(folder: Path, doc: dict, name: str = "sweep.toml") -> Path:
    path = folder / name
    path.write_text(_toml(doc))
    return path


def _study(out: Path, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))


def _param_key(t) -> tuple:
    return tuple(sorted(t.params.items()))


def _cli(*argv: str) -> int:
    from moco.cli import main

    return main(list(argv))


# ------------------------------------------------------------------------------------------------- grid

def test_grid_sweep_runs_every_point_once_and_writes_the_contract(tmp_path, capsys):
    from moco.track.sweep import run_sweep

    path = _write(tmp_path, _doc())
    out = tmp_path / "out"
    assert _cli("sweep", str(path), "--out", str(out), "--threads", "1", "--no-progress") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["trials"] == summary["complete"] == 4 and summary["failed"] == 0
    assert any(line.startswith("best: Params1(") for line in lines)
    study = _study(out, "tiny")
    trials = study.get_trials()
    assert sorted(_param_key(t) for t in trials) == sorted(
        ((("model.c1_channels", c), ("model.hidden", h)) for c in (2, 4) for h in (8, 16)))
    best = max(trials, key=lambda t: t.values[0])
    assert summary["best"]["number"] == best.number and summary["best"]["label"] == (
        f"Params1({best.params['model.c1_channels']}, {best.params['model.hidden']})")

    record = json.loads((out / "sweep.json").read_text())
    for key in ("format", "version", "name", "study_name", "storage", "directions", "objectives", "sampler", "seed",
                "quick", "data", "model", "versions", "threads"):
        assert key in record, key
    assert record["format"] == "moco.sweep" and record["storage"] == f"journal:{out / 'study.journal'}"
    import tomllib

    assert tomllib.loads((out / "sweep.toml").read_text())["search"]["params"]["model.hidden"] == [8, 16]
    for t in trials:
        a = t.user_attrs
        for key in ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "train_seconds", "epochs", "stopped",
                    "macs", "params", "artifacts", "history", "worker_pid"):
            assert key in a, key
        assert a["test_accuracy"] == t.values[0] and a["epochs"] == 1 and a["stopped"] == "epochs"
        folder = out / a["artifacts"]
        assert folder == out / "trials" / f"{t.number:04d}"
        assert {"config.toml", "arch.json", "history.json", "predictions.npz"} <= {p.name for p in folder.iterdir()}
        assert (folder / "state_dict.pt").is_file() or (folder / "state_dict.safetensors").is_file()
        hist = json.loads((folder / "history.json").read_text())
        assert hist == a["history"] and {"epoch", "loss", "train_accuracy", "test_accuracy", "seconds"} <= set(hist[0])
        with np.load(folder / "predictions.npz", allow_pickle=False) as npz:
            y_true, y_pred, idx, img = npz["y_true"], npz["y_pred"], npz["sample_index"], npz["sample_images"]
            assert y_true.dtype == np.int64 and len(y_true) == len(y_pred) == 120
            assert abs((y_true == y_pred).mean() - a["test_accuracy"]) < 1e-9
            assert img.dtype == np.float32 and img.shape[1:] == (1, 28, 28) and 0 <= img.min() and img.max() <= 1
            assert len(npz["class_names"]) == 10
            cells = {(int(y_true[i]), int(y_pred[i])) for i in idx}
            assert cells == set(zip(y_true.tolist(), y_pred.tolist()))  # every confusion cell has an image
        # the per-trial config reproduces the point alone
        point = tomllib.loads((folder / "config.toml").read_text())
        assert point["search"]["params"] == {k: [v] for k, v in t.params.items()}
        assert point["data"]["seed"] == 0 and point["seed"] == t.user_attrs["seed"]
    assert not any(p.name.startswith(".") for p in (out / "trials").iterdir())  # no half-written trial left
    # run alone, the last point's file gives the trial's numbers: its seed, and the sweep's images (the subsets
    # are drawn with the data seed; they had been drawn with the point's seed)
    last = max(trials, key=lambda t: t.user_attrs["seed"])
    assert last.user_attrs["seed"] == 3
    alone = run_sweep(out / last.user_attrs["artifacts"] / "config.toml", out=tmp_path / "alone", threads=1)
    assert alone.trials[0]["values"] == list(last.values)

    # the same command again: nothing to do, nothing added
    again = run_sweep(path, out=out, threads=1)
    assert again.counts["trials"] == 4 and len(_study(out, "tiny").get_trials()) == 4


_SLOW_NET = """
import time
from torch import nn


class Net(nn.Module):
    # a tiny CNN whose training steps also wait (without using a core), so that each trial lasts
    # about 2 s on any machine: long enough for the second worker to start and claim trials of its own
    def __init__(self, c1_channels=2, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, c1_channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(c1_channels * 784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        if self.training:
            time.sleep(0.3)
        return self.body(x)
"""


def test_two_worker_processes_share_one_study(tmp_path):
    from moco.track.sweep import run_sweep

    (tmp_path / "slow.py").write_text(_SLOW_NET)
    doc = _doc("pair", params={"model.c1_channels": [2, 3, 4], "model.hidden": [8, 16]})
    doc["model"] = {"spec": "slow.py:Net"}
    path = _write(tmp_path, doc)
    res = run_sweep(path, out=tmp_path / "out2", workers=2, threads=1)
    assert res.workers == 2 and res.threads == 1
    trials = _study(tmp_path / "out2", "pair").get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({_param_key(t) for t in trials}) == 6  # no point twice
    pids = {t.user_attrs["worker_pid"] for t in trials}
    # two processes ran trials: this one (worker 0) and the subprocess it started
    assert len(pids) == 2 and os.getpid() in pids
    # the result does not depend on who ran it: one worker in this process gives the same numbers
    one = run_sweep(path, out=tmp_path / "out1", workers=1, threads=1)
    by_point = {_param_key(t): t.values[0] for t in trials}
    for t in _study(tmp_path / "out1", "pair").get_trials():  # same seed, same threads: the same numbers
        assert t.values[0] == by_point[_param_key(t)]
    assert one.counts["complete"] == 6


def test_thread_policy_fills_the_cores_without_oversubscribing():
    from moco.track.sweep.runner import worker_threads

    assert [worker_threads(n, cores=2) for n in (1, 2, 3)] == [2, 1, 1]
    assert [worker_threads(n, cores=16) for n in (1, 2, 3, 4)] == [16, 8, 5, 4]


def test_the_example_quick_sweep_is_what_the_benchmark_runs():
    from moco.bench.bench_sweep_fashion import ARCH_SWEEP
    from moco.track.sweep import load_sweep, sweep_from_dict

    example = load_sweep(ROOT / "examples" / "sweeps" / "fashion_arch.toml", quick=True)
    bench = sweep_from_dict(ARCH_SWEEP)
    assert example.param_names == bench.param_names and example.grid() == bench.grid()
    assert example.data == bench.data and example.train == bench.train and example.model == bench.model
    full = load_sweep(ROOT / "examples" / "sweeps" / "fashion_arch.toml")
    assert full.grid_size == 72 and load_sweep(ROOT / "examples" / "sweeps" / "fashion_train.toml").grid_size == 48


# ------------------------------------------------------------------------------------------ kill + resume

def test_sigkill_midway_then_the_same_command_resumes(tmp_path):
    import optuna

    params = {"model.c1_channels": [2, 3, 4], "model.hidden": [8, 16]}
    path = _write(tmp_path, _doc("killed", params, data={"train_size": 900}, train={"epochs": 2}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moco.cli", "sweep", str(path), "--out", str(out), "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    victim = None
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            if not (out / "study.journal").is_file():
                continue
            try:
                trials = _study(out, "killed").get_trials(deepcopy=False)
            except Exception:  # noqa: BLE001 - the study is not created yet
                continue
            done = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING" and "moco.worker" in t.system_attrs]
            if len(done) >= 2 and running:
                os.kill(proc.pid, signal.SIGKILL)
                victim = running[0].number
                break
    finally:
        if proc.poll() is None and victim is None:
            proc.kill()
        proc.wait()
    assert victim is not None, f"the sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    before = _study(out, "killed").get_trials()
    assert [t.state.name for t in before if t.number == victim] == ["RUNNING"]  # left behind by the kill
    n_done = sum(t.state.name == "COMPLETE" for t in before)

    from moco.track.sweep import run_sweep

    res = run_sweep(path, out=out, threads=1)  # the same sweep again
    trials = _study(out, "killed").get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and len({_param_key(t) for t in complete}) == 6  # none lost, none twice
    killed = next(t for t in trials if t.number == victim)
    assert killed.state.name == "FAIL" and killed.user_attrs["error"].startswith("interrupted:")
    reruns = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(reruns) == 1 and reruns[0].state.name == "COMPLETE" and _param_key(reruns[0]) == _param_key(killed)
    assert len(trials) == 7 and res.counts["interrupted"] == 1
    # finished trials were not redone: the ones complete before the kill kept their numbers and pid
    assert sum(t.user_attrs["worker_pid"] == proc.pid for t in complete) == n_done
    assert {t.user_attrs["worker_pid"] for t in complete} == {proc.pid, os.getpid()}


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    from moco.track.sweep import run_sweep

    # kernel 27 then 3 leaves no pixel of a 28x28 image: that point cannot be built
    path = _write(tmp_path, _doc("bad-point", {"model.c1_kernel": [3, 27], "model.hidden": [8]}))
    res = run_sweep(path, out=tmp_path / "out", threads=1)
    assert res.counts["complete"] == 1 and res.counts["failed"] == 1
    failed = next(t for t in _study(tmp_path / "out", "bad-point").get_trials() if t.state.name == "FAIL")
    assert failed.params["model.c1_kernel"] == 27
    assert "leave no pixels" in failed.user_attrs["error"] and "\n" not in failed.user_attrs["error"]
    assert "Traceback" in (tmp_path / "out" / failed.user_attrs["artifacts"] / "error.txt").read_text()
    assert "failed" in res.to_text()
    # a re-run does not redo a point that failed by itself
    assert run_sweep(path, out=tmp_path / "out", threads=1).counts["trials"] == 2


# --------------------------------------------------------------------------------------- samplers

def test_nsga2_two_objectives_gives_a_pareto_front(tmp_path):
    from moco.track.sweep import run_sweep

    doc = _doc("front", {"model.c1_channels": [1, 2, 4, 8], "model.hidden": {"low": 4, "high": 32}},
               search={"sampler": "nsga2", "n_trials": 5, "population_size": 2,
                       "objectives": ["test_accuracy", "macs"]})
    res = run_sweep(_write(tmp_path, doc), out=tmp_path / "out", threads=1)
    s = res.summary()
    assert s["trials"] == 5 and s["complete"] == 5 and s["pareto_size"] == len(s["pareto"]) >= 1
    trials = {t.number: t for t in _study(tmp_path / "out", "front").get_trials()}
    front = [trials[n].values for n in s["pareto"]]
    for n, t in trials.items():  # nothing on the front is dominated; everything off it is
        dominated = any(a >= t.values[0] and m <= t.values[1] and (a, m) != tuple(t.values) for a, m in
                        (x.values for x in trials.values()))
        assert dominated == (n not in s["pareto"])
    assert s["best"]["number"] in s["pareto"] and "Pareto front" in res.to_text() and len(front) == s["pareto_size"]


def test_tpe_budget_pruning_reports_and_more_trials_later(tmp_path):
    from moco.track.sweep import run_sweep

    doc = _doc("tpe", {"train.lr": {"low": 1e-3, "high": 0.1, "log": True}, "model.hidden": [8, 16]},
               train={"epochs": 2}, search={"sampler": "tpe", "n_trials": 3, "pruner": "median",
                                            "pruner_startup_trials": 1})
    del doc["train"]["lr"]
    path = _write(tmp_path, doc)
    run_sweep(path, out=tmp_path / "out", threads=1)
    trials = _study(tmp_path / "out", "tpe").get_trials()
    assert len(trials) == 3
    for t in trials:  # every epoch reported to the pruner, as the test accuracy of that epoch
        assert sorted(t.intermediate_values) == list(range(1, len(t.user_attrs["history"]) + 1))
        assert t.intermediate_values[1] == pytest.approx(t.user_attrs["history"][0]["test_accuracy"])
        assert t.state.name in ("COMPLETE", "PRUNED")
    res = run_sweep(path, out=tmp_path / "out", threads=1, n_trials=4)  # one more, the three kept
    assert res.counts["trials"] == 4 and [t.number for t in _study(tmp_path / "out", "tpe").get_trials()] == [0, 1, 2, 3]


def test_median_pruner_stops_a_hopeless_trial_early(tmp_path):
    from moco.track.sweep import run_sweep

    # two sensible learning rates first, then one that cannot learn in an epoch: below the median -> pruned
    doc = _doc("pruned", {"train.lr": [0.05, 0.03, 1e-6]}, train={"epochs": 3},
               search={"pruner": "median", "pruner_startup_trials": 2})
    del doc["train"]["lr"]
    res = run_sweep(_write(tmp_path, doc), out=tmp_path / "out", threads=1)
    assert res.counts["complete"] == 2 and res.counts["pruned"] == 1
    t = next(t for t in _study(tmp_path / "out", "pruned").get_trials() if t.state.name == "PRUNED")
    assert t.params["train.lr"] == 1e-6 and t.user_attrs["epochs"] == 1 and t.user_attrs["stopped"] == "pruned"
    assert len(json.loads((tmp_path / "out" / t.user_attrs["artifacts"] / "history.json").read_text())) == 1


# -------------------------------------------------------------------------------------------- PostgreSQL

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL 15 server (Debian's package) in a temporary data folder on a free local port, run as
    user ``postgres`` when the suite runs as root. Missing PostgreSQL fails under CI and skips elsewhere."""
    if not (PG_BIN / "postgres").is_file():
        msg = f"PostgreSQL 15 is not installed ({PG_BIN}); apt-get install postgresql-15"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    import psycopg2

    base = Path(tempfile.mkdtemp(prefix="moco-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                    "-E", "UTF8"], check=True, capture_output=True)
    server = subprocess.Popen([*as_user, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base),
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {server.stderr.read().decode()[-1000:]}")
                time.sleep(0.2)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE moco_sweeps")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/moco_sweeps"
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.is_file():  # the server itself (runuser is only its parent)
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # fast shutdown: drops open clients
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_storage(tmp_path, postgres_url):
    import optuna

    from moco.track.sweep import run_sweep

    path = _write(tmp_path, _doc("pg"))
    res = run_sweep(path, out=tmp_path / "out", storage=postgres_url, study="pg-study", threads=1)
    assert res.counts["complete"] == 4 and res.storage.replace("+psycopg2", "") == postgres_url
    study = optuna.load_study(study_name="pg-study", storage=res.storage)  # the URL with its driver
    assert len({_param_key(t) for t in study.get_trials()}) == 4
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert record["storage"] == res.storage and not (tmp_path / "out" / "study.journal").exists()
    # resume from the database: nothing redone
    assert run_sweep(path, out=tmp_path / "out", storage=postgres_url, study="pg-study", threads=1).counts["trials"] == 4
    # a server that is not there: one clear error
    with pytest.raises(MocoError, match="cannot open the study database"):
        run_sweep(path, out=tmp_path / "out3", storage=f"postgresql://postgres@127.0.0.1:{_free_port()}/x", threads=1)


# ---------------------------------------------------------------------------------------- compression

@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """A small user CNN (file + state_dict) trained briefly on digits: what a compression sweep starts from."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "tinynet.py").write_text(
        "import torch.nn as nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=8):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                                      nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.MaxPool2d(2))\n"
        "        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 25, 32), nn.ReLU(), nn.Linear(32, 10))\n"
        "    def forward(self, x):\n"
        "        return self.head(self.features(x))\n")
    import importlib.util

    from moco.specs import resolve_data
    from moco.train import fit

    spec = importlib.util.spec_from_file_location("tinynet_for_sweep", folder / "tinynet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Net()
    fit(model, resolve_data("digits:train").tensors(), epochs=3, lr=3e-3, progress=False)
    torch.save(model.state_dict(), folder / "tinynet.pt")
    return folder


def test_compression_pipeline_sweep_gives_a_front_of_compressed_models(tmp_path, tiny_trained):
    from moco.track.sweep import run_sweep

    pipeline = {"seed": 0, "model": {"spec": "tinynet.py:Net", "weights": "tinynet.pt"},
                "data": {"train": "digits:train", "test": "digits:test"},
                "measure": {"timing": False},
                "steps": [{"method": "prune", "max_steps": 2, "retrain_samples": 300, "finetune_epochs": 1, "lr": 1e-3}]}
    (tiny_trained / "chain.toml").write_text(_toml(pipeline))
    doc = {"name": "compress", "pipeline": {"config": str(tiny_trained / "chain.toml"),
                                            "set": {"steps.1.retrain_epochs": 1}},
           "search": {"sampler": "grid", "objectives": ["test_accuracy", "macs"],
                      "params": {"steps.1.drop_threshold": [0.0, 0.5], "steps.1.step": [0.5]}}}
    res = run_sweep(_write(tmp_path, doc), out=tmp_path / "out", threads=1)
    s = res.summary()
    assert s["complete"] == 2 and s["pareto_size"] >= 1
    trials = {t.params["steps.1.drop_threshold"]: t for t in _study(tmp_path / "out", "compress").get_trials()}
    loose, strict = trials[0.5].user_attrs, trials[0.0].user_attrs
    assert loose["macs"] < loose["macs_base"]  # a 50-point budget prunes
    assert loose["macs"] <= strict["macs"] and loose["macs_reduction"] > 1
    for a in (loose, strict):
        folder = tmp_path / "out" / a["artifacts"]
        assert (folder / "01-prune" / "model.json").is_file() and (folder / "predictions.npz").is_file()
        import tomllib

        cfg = tomllib.loads((folder / "config.toml").read_text())  # the moco run config of that point
        assert cfg["steps"][0]["retrain_epochs"] == 1 and Path(cfg["model"]["weights"]).is_absolute()


# ---------------------------------------------------------------------------------------------- tracking

def test_track_logs_a_parent_run_and_one_nested_run_per_trial(tmp_path):
    from mlflow import MlflowClient

    from moco.track.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = _write(tmp_path, _doc("tracked", {"model.hidden": [8, 16]}))
    run_sweep(path, out=tmp_path / "out", threads=1, track=True, tracking_uri=uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    by_id = {t.user_attrs["mlflow_run_id"]: t for t in _study(tmp_path / "out", "tracked").get_trials()}
    for r in children:
        t = by_id[r.info.run_id]
        assert r.info.status == "FINISHED" and r.data.metrics["test_accuracy"] == pytest.approx(t.values[0])
        assert r.data.params["swept.model.hidden"] == str(t.params["model.hidden"])
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"history.json", "predictions.npz", "model"} <= names
        assert [m.step for m in client.get_metric_history(r.info.run_id, "test_accuracy")][:1] == [1]


# --------------------------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("change, message", [
    ({"model": {"spec": "no_such_model"}}, "neither a zoo model"),
    ({"search": {"params": {"model.hidden": []}}}, "empty list"),
    ({"search": {"params": {}}}, "[search.params] is empty"),
    ({"search": {"params": {"model.width": [1, 2]}}}, "'model.width' addresses nothing"),
    ({"search": {"params": {"train.lrr": [0.1]}}}, "addresses nothing"),
    ({"search": {"sampler": "tpe", "n_trials": 2, "params": {"train.lr": {"low": 0.1, "high": 0.01}}}}, "below high"),
    ({"search": {"sampler": "tpe", "n_trials": 2, "params": {"train.lr": {"low": 0, "high": 1, "log": True}}}},
     "log range needs low > 0"),
    ({"search": {"params": {"train.lr": {"low": 0.001, "high": 0.1}}}}, "needs a list of values"),
    ({"train": {"epochs": 1, "optimiser": "sgd"}}, "unknown key(s) optimiser"),
    ({"search": {"sampler": "bayes"}}, "sampler must be one of"),
    ({"search": {"objectives": ["accuracy"]}}, "unknown objective 'accuracy'"),
])
def test_bad_sweep_file_is_one_line_exit_2(tmp_path, capsys, change, message):
    doc = _doc()
    for key, value in change.items():
        doc[key] = {**doc[key], **value} if key != "model" else value
    path = _write(tmp_path, doc)
    assert _cli("sweep", str(path), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moco: error:") and message in err[0], err
    assert not (tmp_path / "o" / "study.journal").exists()  # refused before any work


@pytest.mark.parametrize("flags, message", [
    (["--storage", "redis://localhost/0"], "unsupported scheme 'redis'"),
    (["--storage", "postgresql://localhost"], "no database name"),
    (["--storage", "notaurl"], "is not a URL"),
    (["--track", "--tracking-uri", "htp://x"], "unknown scheme"),
    (["--tracking-uri", "http://127.0.0.1:9"], "tracking URI"),
    (["--workers", "0"], "--workers must be"),
])
def test_bad_storage_or_tracking_uri_is_one_line_exit_2(tmp_path, capsys, flags, message):
    path = _write(tmp_path, _doc())
    assert _cli("sweep", str(path), "--out", str(tmp_path / "o"), *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o" / "study.journal").exists()


def test_a_study_of_another_sweep_file_is_refused(tmp_path):
    from moco.track.sweep import run_sweep

    out = tmp_path / "out"
    run_sweep(_write(tmp_path, _doc("same", {"model.hidden": [8]})), out=out, threads=1)
    other = _write(tmp_path, _doc("same", {"model.hidden": [16]}), "other.toml")
    with pytest.raises(MocoError, match="made by another sweep file"):
        run_sweep(other, out=out, threads=1)


def test_toml_writer_round_trips_and_quick_overrides_apply(tmp_path):
    import tomllib

    from moco.track.sweep import dumps_toml, load_sweep

    doc = _doc(quick={"data": {"train_size": 100}, "search": {"params": {"model.hidden": [8]}}})
    assert tomllib.loads(dumps_toml(doc)) == doc
    path = _write(tmp_path, doc)
    full, quick = load_sweep(path), load_sweep(path, quick=True)
    assert full.grid_size == 4 and quick.grid_size == 2 and quick.data["train_size"] == 100
    assert full.digest() != quick.digest()
