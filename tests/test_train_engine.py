"""moco's one training engine on Lightning: fit, finetune, train_exits and the noise search run through
``lightning.pytorch.Trainer`` with moco's seeding, resume, target stop, checkpoints and quiet defaults."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from moco.errors import MocoError
from moco.train import EpochLog, fit, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def blobs(n=200, seed=0, classes=4):
    """Well separated classes of 1x8x8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[torch.arange(n), 0, y, y] += 3.0
    return x, y


def small_net(seed=0, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten()] + ([nn.Dropout(0.3)] if dropout else []) + [nn.Linear(4 * 36, 4)]
    return nn.Sequential(*layers)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


class Count(pl.Callback):
    """Counts the epochs and batches Lightning ran, and what moco's epoch log said at each epoch end."""

    def __init__(self):
        self.epochs, self.batches, self.logs, self.metrics = 0, 0, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1
        self.logs.append(pl_module.history[-1])
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_import_moco_train_does_not_import_lightning():
    code = ("import sys, moco, moco.train, moco.exits, moco.compress, moco.approx; "
            "print(any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_fit_runs_through_lightning_and_reports_every_epoch():
    x, y = blobs()
    count, seen = Count(), []
    result = fit(small_net(), (x, y), epochs=3, batch_size=64, lr=1e-2, progress=False, callbacks=[count],
                 on_epoch=seen.append)
    assert count.epochs == 3 and count.batches == 3 * 4  # 200 samples in batches of 64
    assert list(result.history) == seen == count.logs
    assert all(isinstance(h, EpochLog) for h in seen) and [h.epoch for h in seen] == [1, 2, 3]
    assert count.metrics[-1]["train_accuracy"] == pytest.approx(result.history[-1].train_accuracy)
    assert count.metrics[-1]["loss"] == pytest.approx(result.history[-1].loss)


def test_engine_gives_the_weights_of_the_hand_written_loop():
    """Same batches, same order, same arithmetic: bit-identical to the loop fit ran before the engine."""
    from moco.bench.bench_train_engine import _reference_fit

    x, y = blobs(150)
    val = blobs(60, seed=2)
    for kw in (dict(lr=1e-2), dict(lr=5e-2, optimizer="sgd", schedule="cosine", weight_decay=1e-3, val_data=val)):
        old, new = small_net(dropout=True), small_net(dropout=True)
        history = _reference_fit(old, (x, y), epochs=2, batch_size=32, seed=4, **kw)
        result = fit(new, (x, y), epochs=2, batch_size=32, seed=4, progress=False, **kw)
        assert same_weights(old, new), kw
        assert [(h["loss"], h["train_accuracy"], h["val_accuracy"]) for h in history] == \
               [(h.loss, h.train_accuracy, h.val_accuracy) for h in result.history]


def test_seeded_runs_repeat_exactly_and_leave_the_global_rng_alone():
    x, y = blobs()
    runs = []
    for _ in range(2):
        model = small_net(dropout=True)
        state = torch.random.get_rng_state()
        result = fit(model, (x, y), epochs=2, batch_size=32, seed=11, progress=False)
        assert torch.equal(state, torch.random.get_rng_state())
        runs.append((model, result))
    assert same_weights(runs[0][0], runs[1][0])
    assert [h.loss for h in runs[0][1].history] == [h.loss for h in runs[1][1].history]
    other = small_net(dropout=True)
    fit(other, (x, y), epochs=2, batch_size=32, seed=12, progress=False)
    assert not same_weights(runs[0][0], other)


def test_target_accuracy_stops_early():
    x, y = blobs()
    count = Count()
    result = fit(small_net(), (x, y), epochs=40, lr=1e-2, batch_size=32, target_train_accuracy=0.9, progress=False,
                 callbacks=count)
    assert result.stopped == "target" and result.history[-1].train_accuracy >= 0.9
    assert len(result.history) == count.epochs < 40
    assert all(h.train_accuracy < 0.9 for h in result.history[:-1])


class Interrupt(pl.Callback):
    """Ctrl+C at the end of epoch ``at`` (after moco's checkpoint of that epoch is written)."""

    def __init__(self, at):
        self.at = at

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.epoch + 1 == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    x, y = blobs()
    kw = dict(epochs=3, batch_size=32, lr=1e-2, seed=5, schedule="cosine", progress=False)
    straight = small_net()
    fit(straight, (x, y), **kw)
    ckpt = tmp_path / "run.pt"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # the caller gets the interrupt, not Lightning's sys.exit(1)
        fit(small_net(), (x, y), checkpoint=ckpt, callbacks=[Interrupt(2)], **kw)
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN is undone
    state = torch.load(ckpt, weights_only=True)  # moco's checkpoint: tensors and plain values only
    assert [h["epoch"] for h in state["meta"]["history"]] == [1, 2]
    assert all(t.device.type == "cpu" for s in state["optimizer"]["state"].values() for t in s.values())
    seen = []
    resumed = small_net(seed=9)  # other initial weights: the checkpoint's replace them
    result = fit(resumed, (x, y), checkpoint=ckpt, on_epoch=seen.append, **kw)
    assert [h.epoch for h in result.history] == [1, 2, 3] and [h.epoch for h in seen] == [3]
    assert same_weights(straight, resumed)
    model, meta = load_checkpoint(ckpt, model=small_net())
    assert same_weights(model, straight) and len(meta["history"]) == 3
    again = fit(small_net(), (x, y), checkpoint=ckpt, **kw)  # finished: nothing left to train
    assert len(again.history) == 3 and again.stopped == "epochs"


def test_progress_off_is_silent_and_leaves_no_lightning_files(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    import warnings

    x, y = blobs(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(small_net(), (x, y), epochs=1, batch_size=16, progress=False)
        fit(small_net(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
            epochs=1, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert not [w for w in caught if "lightning" in (w.filename or "")], [str(w.message) for w in caught]
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/, no checkpoints


def test_progress_shows_moco_lines_only(capfd):
    x, y = blobs(64)
    fit(small_net(), (x, y), epochs=2, batch_size=16, progress=True)
    out, err = capfd.readouterr()
    text = out + err
    assert "epoch 1: loss" in text and "epoch 2: loss" in text
    assert "GPU available" not in text and "LitLogger" not in text and "Trainer.fit" not in text


def test_a_lightning_logger_and_earlystopping_work(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    x, y = blobs()
    logger = CSVLogger(tmp_path, name="run", version=0)
    stop = EarlyStopping(monitor="train_accuracy", mode="max", stopping_threshold=0.9, patience=1000)
    result = fit(small_net(), (x, y), epochs=40, lr=1e-2, batch_size=32, progress=False, logger=logger,
                 callbacks=[stop])
    assert result.history[-1].train_accuracy >= 0.9 and len(result.history) < 40  # Lightning's own stop
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "train_accuracy" in metrics and "loss" in metrics
    assert len(metrics.strip().splitlines()) == len(result.history) + 1
    assert "lr: 0.01" in (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()


def test_bf16_mixed_precision_on_the_cpu_trains_a_float32_model():
    x, y = blobs()
    model = small_net()
    result = fit(model, (x, y), epochs=2, lr=1e-2, batch_size=32, progress=False, precision="bf16-mixed")
    assert result.history[-1].train_accuracy > 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_engine_option_errors_are_clear():
    x, y = blobs(32)
    with pytest.raises(TypeError, match="lightning.pytorch.Callback"):
        fit(small_net(), (x, y), callbacks=[print], progress=False)
    with pytest.raises(TypeError, match="Lightning logger"):
        fit(small_net(), (x, y), logger="mlflow", progress=False)
    with pytest.raises(TypeError, match="on_epoch must be a callable"):
        fit(small_net(), (x, y), on_epoch=3, progress=False)
    with pytest.raises(MocoError, match="trainer_kwargs may not set max_epochs"):
        fit(small_net(), (x, y), trainer_kwargs={"max_epochs": 3}, progress=False)
    with pytest.raises(MocoError, match="cannot set up training .*accelerator='tpu-ish'"):
        fit(small_net(), (x, y), accelerator="tpu-ish", progress=False)
    with pytest.raises(MocoError, match="strategy='ddp'"):
        fit(small_net(), (x, y), devices=2, trainer_kwargs={"strategy": "ddp_spawn"}, progress=False)


def test_finetune_runs_on_the_engine_and_keeps_masked_units_at_zero():
    from moco.compress.finetune import finetune

    x, y = blobs()
    model = small_net()
    count, seen = Count(), []
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1].zero_()
    result = finetune(model, (x, y), epochs=2, lr=1e-2, batch_size=64, progress=False, keep={"0": [0, 2, 3]},
                      callbacks=[count], on_epoch=seen.append)
    assert count.epochs == 2 and list(result.history) == seen
    assert torch.count_nonzero(model[0].weight[1]) == 0 and float(model[0].bias[1].detach()) == 0.0


def test_train_exits_runs_on_the_engine_and_retrofit_keeps_the_backbone():
    from moco.exits import attach_exits, train_exits

    x, y = blobs(96)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    before = copy.deepcopy(model.state_dict())
    net = attach_exits(model, [2], example_input=x[:1]).eval()
    count, seen = Count(), []
    result = train_exits(net, (x, y), mode="retrofit", epochs=2, batch_size=32, progress=False, callbacks=[count],
                         on_epoch=seen.append, schedule="cosine")
    assert count.epochs == 2 and count.batches == 6 and list(result.history) == seen
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen, BatchNorm-free or not
    assert all(p.requires_grad for p in net.parameters()) and not net.training  # flags restored
    assert "train_accuracy_0" in count.metrics[-1]
    joint = train_exits(net, (x, y), mode="joint", epochs=1, batch_size=32, progress=False)
    assert len(joint.history) == 1 and not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_noise_search_runs_on_the_engine():
    from moco.approx import quantize
    from moco.approx.agn import train_gradient

    x, y = blobs(128)
    torch.manual_seed(0)
    q = quantize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4)), x)
    count, seen, lines = Count(), [], []
    res = train_gradient(q, (x, y), epochs=2, lr=1e-2, batch_size=64, progress=False, log=lines.append,
                         callbacks=[count], on_epoch=seen.append)
    assert count.epochs == 2 and list(res.history) == seen and [h["epoch"] for h in seen] == [0, 1]
    assert lines[0] == "Epoch: 0" and any(line.startswith("Layer: 0 | sigma_l:") for line in lines)
    assert any(k.startswith("sigma/") for k in count.metrics[-1])


_DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    from moco.train import fit
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(101) % 4
    x = torch.randn(101, 1, 8, 8, generator=g) * 0.3
    x[torch.arange(101), 0, y, y] += 3.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4))
    seen = []
    res = fit(model, (x, y), epochs=2, batch_size=16, lr=1e-2, progress=False, devices=2, on_epoch=seen.append,
              checkpoint=os.path.join(sys.argv[1], "ckpt.pt"), trainer_kwargs={"strategy": "ddp"})
    rank = int(os.environ.get("LOCAL_RANK", 0))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump({"acc": [h.train_accuracy for h in res.history], "on_epoch": len(seen),
                   "w": [float(p.detach().sum()) for p in model.parameters()]}, fh)
""")


def test_ddp_on_two_cpu_processes_shards_the_data_and_agrees(tmp_path):
    """Two processes (Lightning's DDP on the CPU, gloo): the same weights and the same reduced history on
    both, each epoch's 101 samples split 51 + 51 (padded), on_epoch and the checkpoint on rank 0 only."""
    import json

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, cwd=tmp_path, env=env,
                   capture_output=True, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["w"] == r1["w"] and r0["acc"] == r1["acc"] and len(r0["acc"]) == 2
    assert all(abs(a * 102 - round(a * 102)) < 1e-9 for a in r0["acc"])  # counted over 2 x 51 samples
    assert r0["on_epoch"] == 2 and r1["on_epoch"] == 0
    _, meta = load_checkpoint(tmp_path / "ckpt.pt", model=small_net())
    assert [h["train_accuracy"] for h in meta["history"]] == r0["acc"]


def test_checkpoint_written_by_the_engine_is_a_plain_moco_checkpoint(tmp_path):
    x, y = blobs(64)
    model = small_net()
    fit(model, (x, y), epochs=1, batch_size=16, checkpoint=tmp_path / "c.pt", arch={"name": "x"}, progress=False)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["format"] == "moco.checkpoint" and state["arch"] == {"name": "x"} and "optimizer" in state
    path = save_checkpoint(model, tmp_path / "again.pt")
    assert set(torch.load(path, weights_only=True)) == {"format", "version", "arch", "meta", "state_dict"}


class _Plain(torch.utils.data.Dataset):
    """A Dataset without ``tensors()``: batched by a DataLoader and checked batch by batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_bad_samples_are_refused_in_memory_before_training_and_per_batch_otherwise():
    x, y = blobs(96)
    bad = x.clone()
    bad[-1, 0, 0, 0] = float("inf")  # in the last batch of every epoch
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MocoError, match="NaN or inf"):
        fit(model, (bad, y), epochs=1, batch_size=16, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one step was taken
    with pytest.raises(MocoError, match="the model has 4 outputs"):
        fit(small_net(), (x, torch.where(torch.arange(96) == 95, 7, y)), batch_size=16, progress=False)
    with pytest.raises(MocoError, match="NaN or inf"):
        fit(small_net(), _Plain(bad, y), epochs=1, batch_size=16, progress=False)
    result = fit(small_net(), _Plain(x, y), epochs=1, batch_size=16, progress=False)
    assert len(result.history) == 1 and result.history[0].train_accuracy > 0


def test_progress_bars_only_on_a_terminal_or_in_a_notebook(monkeypatch, capsys):
    # a bar's \r redraws written into a log interleave with printed lines: progress=True draws on a terminal only
    from moco.compress.finetune import finetune
    from moco.progress import show_progress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = (torch.randn(256, 1, 4, 4), torch.randint(0, 3, (256,)))
    finetune(model, data, epochs=1, progress=True)
    assert "img/s" not in capsys.readouterr().err          # stderr is pytest's capture: no terminal
    assert show_progress(False) is False and show_progress(True) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(True) is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", sys)      # a notebook kernel: its output is no tty either
    assert show_progress(True) is True
