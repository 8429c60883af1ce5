import json
import subprocess
import sys

import pytest

from moco.cli import main
from moco.train import load_checkpoint


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "moco.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("demo", "profile", "bench", "data"):
        assert command in proc.stdout


@pytest.mark.parametrize("argv,needle", [
    (["profile", "vgg99"], "is neither a zoo model"),
    (["profile", "seed_cnn", "--input-shape", "3,32,32", "--no-latency"], "input shape"),
    (["profile", "seed_cnn", "--arg", "width"], "KEY=VALUE"),
    (["bench", "no-such-bench"], "no-such-bench"),
    (["demo", "--train-size", "0"], "train_size"),
    (["profile", "--batch"], "expected one argument"),
    (["profile", "seed_cnn", "--input-shape", "-1,28,28"], "positive integers C,H,W"),   # not argparse's riddle
    (["profile", "seed_cnn", "--input-shape", "1,0,28"], "positive integers C,H,W"),
])
def test_errors_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moco") and needle in lines[0], err


def test_usage_errors_from_argparse_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "moco.cli", "bench", "--bogus"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_profile_a_zoo_model_prints_the_table_and_writes_json(capsys, tmp_path):
    code, out, _ = run(capsys, "profile", "seed_cnn", "--no-latency", "--json", str(tmp_path / "p.json"))
    assert code == 0
    assert "10.6M" in out or "10,616,832" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["bottleneck"] == "2"


def test_demo_on_digits_trains_profiles_and_saves(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--dataset", "digits", "--epochs", "2", "--out", str(tmp_path), "--no-progress")
    assert code == 0
    assert "digits" in out and "bottleneck" in out and "rules" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"] == "digits" and report["bottleneck"] == "2"
    assert report["accuracy_test"] > 0.5
    rules = report["rules"]  # seed 000's step: certified rules at layer 2, BranchedNetwork on the test images
    assert rules["layer"] == 2 and 0.0 <= rules["coverage_test"] <= 1.0
    assert rules["agreement_test"] >= 0.9 and rules["ratio_vs_eager"] > 0
    assert (tmp_path / "profile.png").stat().st_size > 1000
    model, meta = load_checkpoint(tmp_path / "seed_cnn.pt")
    assert meta["dataset"] == "digits"
    code, out, _ = run(capsys, "profile", str(tmp_path / "seed_cnn.pt"), "--no-latency")
    assert code == 0 and "seed_cnn" in out


def test_data_check_on_an_empty_root_reports_missing(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "check", "--root", str(tmp_path))
    assert code == 1
    assert "mnist" in out.lower() and "missing" in out.lower()


def test_bench_list(capsys):
    code, out, _ = run(capsys, "bench", "--list")
    assert code == 0 and "baselines" in out


def test_sigterm_during_a_run_unwinds_and_exits_143(monkeypatch, capsys):
    # a CI timeout's SIGTERM ended `moco run` on the spot: the export's temporary folder stayed in /tmp
    import os
    import signal

    import moco.cli as cli

    cleaned = []

    def fake_run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return 0
        finally:
            cleaned.append(True)   # what a TemporaryDirectory's cleanup does

    monkeypatch.setattr(cli, "_cmd_run", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(["run", "whatever.toml"])
    err = capsys.readouterr().err
    assert code == 143 and cleaned == [True]
    assert err.strip().splitlines() == ["moco: terminated (SIGTERM); the step's temporary files were removed"]
    assert signal.getsignal(signal.SIGTERM) == before
