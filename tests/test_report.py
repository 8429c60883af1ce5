"""moco report: a REAL small Optuna study (tiny fashion_cnn trainings on Fashion-MNIST, or scikit-learn's digits
when the files are absent) written as a sweep folder per the sweep contract, then the report's table, fronts
(against a brute-force check), best configuration, HTML (self-contained; rendered by headless Chromium), the
CLI with its errors, and an MLflow experiment as the source."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from moco.errors import MocoError

optuna = pytest.importorskip("optuna")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GRID = {"model.c1_channels": [4, 8], "model.hidden": [16, 48], "train.lr": [0.003, 0.01]}
FAILING = {"model.c1_channels": 4, "model.hidden": 0, "train.lr": 0.003}     # hidden=0: the model refuses it
HOPELESS = {"model.c1_channels": 4, "model.hidden": 16, "train.lr": 1e-7}    # stays at chance: pruned
SWEEP_TOML = """\
name = "tiny-arch"
seed = 0

[model]
spec = "fashion_cnn"
args = { c2_channels = 8 }

[data]
train = "{data}:train"
test = "{data}:test"
train_size = 500
test_size = 300

[train]
epochs = 2
batch_size = 16
optimizer = "adam"

[search]
sampler = "grid"
objectives = ["test_accuracy", "macs"]
directions = ["maximize", "minimize"]

[search.params]
"model.c1_channels" = [4, 8]
"model.hidden" = [16, 48]
"train.lr" = [0.003, 0.01]
"""


def _data():
    """(name, x_train [500], y_train, x_val [100], y_val, x_test [300], y_test, class names), images in [0, 1]."""
    from moco.data import load_dataset

    name = "fashion_mnist" if (SHARED / "fashion-mnist").is_dir() else "digits"
    root = SHARED if name == "fashion_mnist" else None
    train = load_dataset(name, root, train=True, normalize=False)
    test = load_dataset(name, root, train=False, normalize=False)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(train), generator=g)[:600]
    te = torch.randperm(len(test), generator=g)[:300]
    x, y = train.subset(tr).tensors()
    xt, yt = test.subset(te).tensors()
    return name, x[:500], y[:500], x[500:], y[500:], xt, yt, list(train.classes)


# A plain loop, not moco.train: these trials only feed the report (real figures, fast, and independent of the
# training engine, which has its own tests).
def _train_epoch(model, opt, x, y, gen, batch=16):
    model.train()
    start, total, correct = time.perf_counter(), 0.0, 0
    for idx in torch.randperm(len(x), generator=gen).split(batch):
        logits = model(x[idx])
        loss = torch.nn.functional.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == y[idx]).sum())
    return {"loss": total / len(x), "accuracy": correct / len(x), "seconds": time.perf_counter() - start}


@torch.no_grad()
def _evaluate(model, x, y):
    logits = model.eval()(x)
    return {"loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean())}


def _objective(out: Path, data):
    from moco.models import create
    from moco.profile import profile

    name, x, y, xv, yv, xt, yt, classes = data

    def objective(trial):
        c1 = trial.suggest_int("model.c1_channels", 1, 64)
        hidden = trial.suggest_int("model.hidden", 0, 256)
        lr = trial.suggest_float("train.lr", 1e-8, 1.0, log=True)
        folder = out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("artifacts", f"trials/{trial.number:04d}")
        try:
            torch.manual_seed(trial.number)
            model = create("fashion_cnn", c1_channels=c1, c2_channels=8, hidden=hidden)
        except (ValueError, MocoError) as exc:
            trial.set_user_attr("error", " ".join(str(exc).split()))
            raise
        history = []
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(trial.number)
        for epoch in range(2):
            log = _train_epoch(model, opt, x, y, gen)
            val, ev = _evaluate(model, xv, yv), _evaluate(model, xt, yt)
            history.append({"epoch": epoch, "loss": log["loss"], "train_accuracy": log["accuracy"],
                            "val_accuracy": val["accuracy"], "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
                            "seconds": log["seconds"]})
            if val["accuracy"] < 0.25:   # hopeless (chance is 0.1); Optuna's pruners take one objective only
                trial.set_user_attr("pruned_at_epoch", epoch)
                trial.set_user_attr("history", history)
                raise optuna.TrialPruned()
        test, train_ev = _evaluate(model, xt, yt), _evaluate(model, x, y)
        macs = int(profile(model.eval(), x[:1], latency=False).per_sample("macs"))
        with torch.no_grad():
            y_pred = model.eval()(xt).argmax(1).numpy()
        y_true = yt.numpy()
        keep = []
        for cell in sorted(set(zip(y_true.tolist(), y_pred.tolist()))):   # every (true, predicted) cell, <= 12 each
            keep += np.flatnonzero((y_true == cell[0]) & (y_pred == cell[1]))[:12].tolist()
        keep = np.array(sorted(keep), dtype=np.int64)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "predictions.npz", y_true=y_true.astype(np.int64), y_pred=y_pred.astype(np.int64),
                 sample_index=keep, sample_images=xt.numpy()[keep].astype(np.float32),
                 class_names=np.array(classes, dtype=str))
        (folder / "history.json").write_text(json.dumps(history))
        torch.save(model.state_dict(), folder / "state_dict.pt")
        (folder / "arch.json").write_text(json.dumps({"spec": "fashion_cnn",
                                                      "args": {"c1_channels": c1, "c2_channels": 8, "hidden": hidden}}))
        (folder / "config.toml").write_text(SWEEP_TOML.replace("{data}", name).split("[search]")[0]
                                            .replace("args = { c2_channels = 8 }",
                                                     f"args = {{ c2_channels = 8, c1_channels = {c1}, hidden = {hidden} }}")
                                            + f"lr = {lr}\n")
        seconds = sum(h["seconds"] for h in history)
        attrs = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "train_accuracy": train_ev["accuracy"],
                 "train_loss": train_ev["loss"], "train_seconds": seconds, "epochs": len(history), "stopped": "epochs",
                 "macs": macs, "params": sum(p.numel() for p in model.parameters()), "history": history}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return test["accuracy"], macs

    return objective


def make_sweep(out: Path) -> Path:
    """A real sweep folder per the contract: sweep.toml, sweep.json, study.journal, trials/NNNN/."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    data = _data()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.toml").write_text(SWEEP_TOML.replace("{data}", data[0]))
    (out / "sweep.json").write_text(json.dumps({
        "format": "moco.sweep", "version": 1, "name": "tiny-arch", "study_name": "tiny-arch",
        "storage": f"journal:{out / 'study.journal'}", "directions": ["maximize", "minimize"],
        "objectives": ["test_accuracy", "macs"], "sampler": "grid", "seed": 0, "quick": True,
        "data": {"train": f"{data[0]}:train", "test": f"{data[0]}:test"}, "model": {"spec": "fashion_cnn"},
        "versions": {"optuna": optuna.__version__, "torch": torch.__version__}, "threads": 1}))
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="tiny-arch", storage=storage, directions=["maximize", "minimize"])
    points = [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    for p in points + [FAILING, HOPELESS]:
        study.enqueue_trial(p)
    study.optimize(_objective(out, data), n_trials=len(points) + 2, catch=(ValueError,))
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("sweep") / "tiny-arch")


@pytest.fixture(scope="module")
def report(sweep):
    from moco.track.report import build_report

    return build_report(sweep, top=2)


def _study_trials(sweep):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(sweep / "study.journal")))
    return optuna.load_study(study_name="tiny-arch", storage=storage).trials


def test_table_sorted_by_objective_with_failed_and_pruned_trials(report, sweep):
    truth = {t.number: t for t in _study_trials(sweep)}
    df = report.to_frame()
    assert sorted(df["trial"]) == sorted(truth) and len(truth) == 10
    assert {int(r.trial): r.state for _, r in df.iterrows()} == {n: t.state.name for n, t in truth.items()}
    assert truth[8].state.name == "FAIL" and truth[9].state.name == "PRUNED"   # hidden=0; lr=1e-7 stays at chance
    n_done = sum(t.state.name == "COMPLETE" for t in truth.values())
    assert n_done >= 5
    done = df[df["state"] == "COMPLETE"]
    acc = done["test_accuracy"].tolist()
    assert acc == sorted(acc, reverse=True) and list(done.index) == list(range(n_done))   # best first, complete first
    assert all(row.test_accuracy == truth[int(row.trial)].values[0] and row.macs == truth[int(row.trial)].values[1]
               for _, row in done.iterrows())
    states = df["state"].tolist()
    assert states[n_done:] == sorted(states[n_done:], key=["PRUNED", "FAIL"].index)
    failed = df[df["state"] == "FAIL"].iloc[0]
    assert "hidden" in failed["error"] and failed["model.hidden"] == 0
    assert report.best == int(done["trial"].iloc[0])
    assert {"model.c1_channels", "model.hidden", "train.lr"} == set(report.params)
    text = report.to_text()
    assert "Params1(c1_channels=" in text and "Params2(lr=" in text
    assert text.index("COMPLETE") < text.index("PRUNED") < text.index("FAIL")


def test_pareto_fronts_match_brute_force(report):
    df = report.to_frame()
    done = df[df["state"] == "COMPLETE"]

    def brute(cols, signs):
        pts = {int(r.trial): tuple(s * float(r[c]) for c, s in zip(cols, signs)) for _, r in done.iterrows()}
        front = set()
        for n, p in pts.items():
            if not any(all(a >= b for a, b in zip(q, p)) and q != p for m, q in pts.items() if m != n):
                front.add(n)
        return front

    assert set(report.pareto_macs) == brute(["test_accuracy", "macs"], [1, -1])
    assert set(report.pareto) == brute(["test_accuracy", "macs"], [1, -1])   # the study's two objectives
    assert set(report.pareto_time) == brute(["test_accuracy", "train_seconds"], [1, -1])
    assert report.best in report.pareto and set(df[df["front"]]["trial"]) == set(report.pareto)


def test_pareto_mask_against_brute_force_random():
    from moco.track.report import pareto_mask

    rng = np.random.default_rng(0)
    for d, dirs in ((1, ["maximize"]), (2, ["maximize", "minimize"]), (3, ["minimize", "maximize", "minimize"])):
        v = rng.integers(0, 6, size=(60, d)).astype(float)   # many ties
        v[3, 0] = np.nan
        mask = pareto_mask(v, dirs)
        q = v * np.array([-1 if x == "maximize" else 1 for x in dirs])
        for i in range(len(v)):
            if np.isnan(q[i]).any():
                assert not mask[i]
                continue
            dominated = any(np.all(q[j] <= q[i]) and np.any(q[j] < q[i]) for j in range(len(v))
                            if j != i and not np.isnan(q[j]).any())
            assert mask[i] == (not dominated)
    with pytest.raises(ValueError, match="directions"):
        pareto_mask([[1.0, 2.0]], ["up", "down"])


def test_best_config_is_the_trials_config_and_sweep_fallback(report, sweep):
    best = report.best
    assert report.best_config == (sweep / "trials" / f"{best:04d}" / "config.toml").read_text()
    assert report.config_origin == f"trials/{best:04d}/config.toml"
    from moco.track.report import fixed_sweep_config, toml_dumps

    params = report.best_trial().params
    text = toml_dumps(fixed_sweep_config((sweep / "sweep.toml").read_text(), params, trial=best), header="x")
    doc = tomllib.loads(text)
    assert doc["search"]["params"] == {k: [v] for k, v in params.items()} and doc["search"]["sampler"] == "grid"
    assert doc["model"] == {"spec": "fashion_cnn", "args": {"c2_channels": 8}} and doc["name"].endswith(f"-{best:04d}")


def test_params_text_groups_like_the_seed():
    from moco.track.report import params_text

    text = params_text({"model.c1_kernel": 5, "model.c1_channels": 32, "train.lr": 0.01, "train.optimizer": "sgd",
                        "steps.1.ratio": 0.5, "seed": 3})
    assert text.splitlines() == ["Params1(c1_kernel=5, c1_channels=32)", "Params2(lr=0.01, optimizer='sgd')",
                                 "Steps(1.ratio=0.5)", "Params(seed=3)"]


def test_runs_have_curves_and_error_grid(report, sweep):
    assert [r.number for r in report.runs][:1] == [report.best] and len(report.runs) == 2
    run = report.runs[0]
    assert len(run.history) == 2 and run.predictions is not None and not run.notes
    figs = report.figures()
    for name in ("pareto_macs.png", "pareto_time.png", "effects.png", f"curves_{run.number:04d}.png",
                 f"errors_{run.number:04d}.png"):
        assert figs[name] is not None and figs[name][:8] == b"\x89PNG\r\n\x1a\n", name
    from PIL import Image
    import io

    grid = np.asarray(Image.open(io.BytesIO(figs[f"errors_{run.number:04d}.png"])).convert("RGB"))
    assert grid.shape[0] > 900 and grid.shape[1] > 900            # 10 classes x 3x3 thumbnails of 28x28
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 200    # real images, not an empty frame


def test_error_grid_counts_cells():
    from moco.track.report.plots import confusion_counts

    counts = confusion_counts([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)   # rows predicted, columns true
    assert counts.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    pytest.skip("chromium not installed (CI installs it)")


def test_html_is_self_contained_and_renders_in_chromium(report, tmp_path):
    out = tmp_path / "rep"
    page = report.write_html(out)
    assert page == out / "report.html"
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "pareto_macs.png", "pareto_time.png", "effects.png", "best_config.toml",
            "report.json"} <= names and any(n.startswith("errors_") for n in names)
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert not re.search(r"<(script|link)\b", html, re.I)
    assert html.count("<tr class=\"trial") == 10 and html.count("data:image/png;base64,") >= 7
    json.loads((out / "report.json").read_text())
    single = report.write_html(tmp_path / "one.html")
    assert single.read_text().count("data:image/png;base64,") == html.count("data:image/png;base64,")

    chromium = _chromium()
    # a copy with a probe that records each image's decoded width (the report itself has no script)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.addEventListener('load', () => {"
                                  "document.body.setAttribute('data-decoded', Array.from(document.images)"
                                  ".map(i => i.naturalWidth).join(','));});</script></body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    widths = re.search(r'data-decoded="([^"]*)"', dom)
    assert widths, dom[:500]
    widths = [int(w) for w in widths.group(1).split(",")]
    assert len(widths) == html.count("<img ") and min(widths) > 100
    assert len(re.findall(r'<tr class="trial', dom)) == 10 and 'id="trials"' in dom
    shot = tmp_path / "report_shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                   capture_output=True, timeout=60)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500    # text, table and plots, not a blank page


def test_cli_report_and_errors(sweep, report, tmp_path, capsys):
    from moco.cli import main

    rc = main(["report", str(sweep), "--out", str(tmp_path / "r"), "--trial", "1", "--top", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads(out[-1])
    assert summary["trials"] == 10 and summary["complete"] == len(report.complete()) and summary["failed"] == 1
    assert summary["pareto_size"] >= 1 and summary["best"]["trial"] >= 0 and Path(summary["report"]).is_file()
    assert any(line.startswith("Params1(") for line in out)
    assert (tmp_path / "r" / "curves_0001.png").is_file()

    cases = [
        ([str(tmp_path / "nope")], "does not exist"),
        ([str(tmp_path)], "not a sweep folder"),
        (["--storage", f"journal:{sweep / 'study.journal'}", "--study", "other"], "study 'other' not found"),
        (["--storage", "foo://x", "--study", "a"], "not an Optuna storage URL"),
        ([str(sweep), "--objective", "nonsense"], "objective 'nonsense' is not recorded"),
        ([str(sweep), "--trial", "99"], "trial 99 is not in"),
        (["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--experiment", "x"], "MLflow store"),
    ]
    for argv, message in cases:
        rc = main(["report", *argv, "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_storage_and_study_without_folder(sweep, tmp_path):
    from moco.track.report import build_report

    rep = build_report(storage=f"journal:{sweep / 'study.journal'}", study="tiny-arch")
    assert rep.source.kind == "optuna" and len(rep.frame) == 10
    assert rep.runs[0].history and rep.runs[0].predictions is None   # history from user attributes only
    assert rep.best_config is None and "no config.toml" in rep.config_origin
    rep.write_html(tmp_path / "s.html")


def test_mlflow_experiment_as_source(sweep, report, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from moco.track.report import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    trials = _study_trials(sweep)
    parent = client.create_run(exp, run_name="sweep")
    client.log_artifact(parent.info.run_id, str(sweep / "sweep.toml"))
    logged = {}
    for t in trials:
        run = client.create_run(exp, run_name=f"trial-{t.number:04d}",
                                tags={"mlflow.parentRunId": parent.info.run_id, "trial": str(t.number)})
        rid = run.info.run_id
        for k, v in t.params.items():
            client.log_param(rid, k, v)
        client.log_param(rid, "train.epochs", 2)   # a setting every run shares: not a swept parameter
        if t.state.name != "COMPLETE":
            client.set_tag(rid, "error", t.user_attrs.get("error", "pruned"))
            client.set_terminated(rid, "FAILED")
            continue
        start = int(time.time() * 1000)
        for h in t.user_attrs["history"]:   # per epoch as training goes, then the final figures (step 0)
            for k in ("loss", "train_accuracy", "val_accuracy", "test_accuracy"):
                client.log_metric(rid, k, h[k], step=h["epoch"], timestamp=start + 1000 * h["epoch"])
        for k in ("test_accuracy", "test_loss", "train_seconds", "macs"):
            client.log_metric(rid, k, t.user_attrs[k], timestamp=start + 5000)
        if t.number % 2 == 0:  # half the runs carry the files, the others only metric histories
            folder = sweep / "trials" / f"{t.number:04d}"
            client.log_artifact(rid, str(folder / "history.json"))
            client.log_artifact(rid, str(folder / "predictions.npz"))
        client.set_terminated(rid, "FINISHED")
        logged[t.number] = t.user_attrs["test_accuracy"]
    shown = [min(n for n in logged if n % 2 == 0), min(n for n in logged if n % 2 == 1)]
    rep = build_report(tracking_uri=uri, experiment="tiny", top=0, trials=shown)
    df = rep.to_frame()
    assert len(df) == 10 and "train.epochs" not in df and rep.source.fixed_params == {"train.epochs": 2}
    done = df[df["state"] == "COMPLETE"]
    assert done["test_accuracy"].tolist() == sorted(logged.values(), reverse=True)
    assert rep.best == max(logged, key=logged.get) and (df["state"] == "FAIL").sum() == 10 - len(logged)
    assert set(rep.pareto_macs) == set(report.pareto_macs)
    by_run = {r.number: r for r in rep.runs}
    assert sorted(by_run) == sorted(shown) and all(len(by_run[n].history) == 2 for n in shown)
    truth = {t.number: t for t in trials}
    even, odd = shown
    assert list(by_run[even].history) == truth[even].user_attrs["history"]          # history.json artifact
    for got, want in zip(by_run[odd].history, truth[odd].user_attrs["history"]):    # rebuilt from metric histories
        assert got["epoch"] == want["epoch"] and all(got[k] == pytest.approx(want[k]) for k in
                                                     ("loss", "train_accuracy", "val_accuracy", "test_accuracy"))
    assert [by_run[n].predictions is not None for n in shown] == [True, False]   # artifact / metric histories
    assert rep.best_config is not None and "sweep.toml with the swept parameters fixed" in rep.config_origin
    page = rep.write_html(tmp_path / "mlflow-report")
    assert page.read_text().count('<tr class="trial') == 10
    with pytest.raises(MocoError, match="experiment 'missing' not found"):
        build_report(tracking_uri=uri, experiment="missing")
