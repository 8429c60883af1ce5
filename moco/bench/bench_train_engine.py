"""Benchmark ``train-engine``: moco's training engine on Lightning against the hand-written loop it replaced.

For each model (``seed_cnn`` and ``fashion_cnn`` on Fashion-MNIST, and ``resnet18`` at width 0.25 with one
input channel) both loops train a copy of the same seeded initial weights on the same training images,
with the same recipe, seed and threads, without progress bars: :func:`moco.train.fit` (the engine) and
``_reference_fit`` below, a faithful copy of the loop ``fit`` ran before the engine (kept here only as the
reference baseline: it is what the engine must not be slower than). One untimed warm-up run each (one
epoch on 512 images: allocator, kernels, Lightning's import and first ``Trainer``), then ``repeats``
timed rounds, interleaved and alternating which loop goes first. Per run, the seconds per epoch are the
run's whole wall-clock (the engine's ``Trainer`` set-up included) divided by its epochs; the summary is
the median over the rounds and ``ratio_per_epoch = new / old`` of the medians. Also reported: the paired
ratio (median over rounds of new / old within a round: drift of a shared machine between rounds cancels),
the in-epoch ratio (the epochs' own seconds, without set-up), the test accuracies of both trained models
and whether their weights are bit-identical (they should be: same batches, same order, same arithmetic).

Full: 2,000 training images, 3 epochs, 4 rounds, accuracies on 2,000 test images. ``--quick``: 800
images, 2 epochs, 4 rounds, 500 test images (an even number of rounds: each loop goes first as often). Target: ``ratio_per_epoch`` (the largest over the models)
<= 1.10. The machine's load average (``os.getloadavg``) at start and end is recorded: timings on a shared
machine are noisy.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moco.bench.registry import register

__all__ = ["MODELS", "TARGET_RATIO", "bench_train_engine"]

TARGET_RATIO = 1.10

#: name -> (zoo name, constructor kwargs, recipe); the recipes of moco.train.pretrained where it has one
MODELS: dict[str, tuple[str, dict, dict]] = {
    "seed_cnn": ("seed_cnn", {}, dict(batch_size=128, lr=1e-3, optimizer="adam")),
    "fashion_cnn": ("fashion_cnn", {}, dict(batch_size=64, lr=1e-2, optimizer="sgd")),
    "resnet18-w0.25": ("resnet18", {"in_channels": 1, "width_multiplier": 0.25},
                       dict(batch_size=128, lr=1e-3, optimizer="adam", schedule="cosine")),
}


def _reference_fit(model: nn.Module, train_data: Any, *, epochs: int = 1, batch_size: int = 128, lr: float = 1e-3,
                   optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
                   schedule: str = "constant", teacher: nn.Module | None = None, distillation: float = 0.5,
                   temperature: float = 4.0, seed: int = 0, target_train_accuracy: float | None = None,
                   val_data: Any = None, progress: bool = False) -> list[dict]:
    """The hand-written loop of ``moco.train.fit`` before the Lightning engine (checkpointing left out: it is
    not timed), kept as this benchmark's baseline. Returns the per-epoch history as dicts."""
    from moco.batches import iter_batches, num_samples
    from moco.errors import MocoError
    from moco.train import distillation_loss, evaluate
    from moco.train.evaluation import _check_batch
    from moco.train.fitting import _make_optimizer

    opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay)
    history: list[dict] = []
    was_training = model.training
    if teacher is not None:
        teacher.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            gen.manual_seed(seed * 100_003 + epoch)  # the same shuffle per epoch on resume
            model.train()
            te = time.perf_counter()
            total_loss, correct, seen = 0.0, 0, 0
            n_total = num_samples(train_data)
            steps_per_epoch = -(-n_total // batch_size)
            step = epoch * steps_per_epoch
            bar = tqdm(total=n_total, desc=f"epoch {epoch + 1}/{epochs}", unit="img", disable=not progress, leave=False)
            for x, y in iter_batches(train_data, batch_size, shuffle=True, generator=gen):
                logits = model(x)
                y = _check_batch(x, y, int(logits.shape[-1]), "training labels")
                loss = F.cross_entropy(logits, y)
                if teacher is not None and distillation > 0:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = (1 - distillation) * loss + distillation * distillation_loss(logits, target, temperature)
                if not torch.isfinite(loss):
                    raise MocoError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}; lower lr={lr}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
                opt.step()
                step += 1
                total_loss += loss.item() * len(x)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(x)
                bar.update(len(x))
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
            bar.close()
            val_acc = evaluate(model, val_data, batch_size=max(batch_size, 512)).accuracy if val_data is not None else None
            history.append({"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                            "val_accuracy": val_acc, "seconds": time.perf_counter() - te})
            if target_train_accuracy is not None and history[-1]["train_accuracy"] >= target_train_accuracy:
                break
    model.train(was_training)
    return history


def _settings(quick: bool) -> dict:
    if quick:
        return dict(n_train=800, n_test=500, epochs=2, repeats=4, warmup_samples=512)
    return dict(n_train=2_000, n_test=2_000, epochs=3, repeats=4, warmup_samples=512)


def _run(kind: str, init: nn.Module, data, recipe: dict, epochs: int, seed: int) -> tuple[nn.Module, float, float]:
    """Train a copy of ``init``; returns (model, wall seconds per epoch, in-epoch seconds per epoch)."""
    from moco.train import fit

    model = copy.deepcopy(init)
    t0 = time.perf_counter()
    if kind == "old":
        history = _reference_fit(model, data, epochs=epochs, seed=seed, **recipe)
        inner = sum(h["seconds"] for h in history)
    else:
        result = fit(model, data, epochs=epochs, seed=seed, progress=False, **recipe)
        inner = sum(h.seconds for h in result.history)
    wall = time.perf_counter() - t0
    return model, wall / epochs, inner / epochs


@register("train-engine", "moco's Lightning training engine against the hand-written loop it replaced: seconds per "
                          "epoch on the CPU (seed_cnn, fashion_cnn, resnet18 w0.25 on Fashion-MNIST), ratio new/old")
def bench_train_engine(quick: bool, seed: int, out=print) -> dict:
    """Time the old loop and the engine side by side on three models; ratio of seconds per epoch, accuracies."""
    from moco.data import load_dataset
    from moco.models import create
    from moco.train import evaluate

    s = _settings(quick)
    load_start = os.getloadavg()
    train = load_dataset("fashion_mnist", train=True)
    test = load_dataset("fashion_mnist", train=False)
    g = torch.Generator().manual_seed(seed)
    x, y = train.subset(torch.randperm(len(train), generator=g)[: s["n_train"]].tolist()).tensors()
    x_test, y_test = test.subset(range(s["n_test"])).tensors()
    out(f"Fashion-MNIST ({train.source}): {len(x):,} training images, {s['epochs']} epochs per run, "
        f"{s['repeats']} interleaved rounds after a warm-up; {torch.get_num_threads()} "
        f"thread(s); load average {load_start[0]:.2f}")
    rows = []
    for label, (name, kwargs, recipe) in MODELS.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            init = create(name, **kwargs)
        warm = (x[: s["warmup_samples"]], y[: s["warmup_samples"]])
        for kind in ("old", "new"):  # warm-up: allocator, kernels, Lightning's import and first Trainer
            _run(kind, init, warm, recipe, 1, seed)
        times: dict[str, list[float]] = {"old": [], "new": []}
        inner: dict[str, list[float]] = {"old": [], "new": []}
        models: dict[str, nn.Module] = {}
        for r in range(s["repeats"]):
            for kind in (("old", "new") if r % 2 == 0 else ("new", "old")):
                models[kind], per_epoch, in_epoch = _run(kind, init, (x, y), recipe, s["epochs"], seed)
                times[kind].append(per_epoch)
                inner[kind].append(in_epoch)
        old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
        identical = all(torch.equal(a, b) for a, b in zip(models["old"].state_dict().values(),
                                                          models["new"].state_dict().values()))
        acc_old = evaluate(models["old"], (x_test, y_test)).accuracy
        acc_new = evaluate(models["new"], (x_test, y_test)).accuracy
        rows.append({
            "model": label, "recipe": dict(recipe), "old_s_per_epoch": old_s, "new_s_per_epoch": new_s,
            "ratio_per_epoch": new_s / old_s,
            "ratio_paired": statistics.median(n / o for n, o in zip(times["new"], times["old"])),
            "ratio_in_epoch": statistics.median(inner["new"]) / statistics.median(inner["old"]),
            "old_times": times["old"], "new_times": times["new"],
            "accuracy_old": acc_old, "accuracy_new": acc_new, "bit_identical": identical,
        })
        out(f"{label}: old {old_s:.3f} s/epoch, new {new_s:.3f} s/epoch, ratio {new_s / old_s:.3f}; "
            f"test accuracy old {acc_old:.4f} new {acc_new:.4f}; weights bit-identical: {identical}")
    load_end = os.getloadavg()
    header = ("model", "old s/epoch", "new s/epoch", "ratio", "paired", "in-epoch", "acc old", "acc new", "identical")
    body = [(r["model"], f"{r['old_s_per_epoch']:.3f}", f"{r['new_s_per_epoch']:.3f}", f"{r['ratio_per_epoch']:.3f}",
             f"{r['ratio_paired']:.3f}", f"{r['ratio_in_epoch']:.3f}", f"{r['accuracy_old']:.4f}", f"{r['accuracy_new']:.4f}",
             str(r["bit_identical"])) for r in rows]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    out("")
    for row in (header, tuple("-" * w for w in widths), *body):
        out("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]))
    worst = max(r["ratio_per_epoch"] for r in rows)
    out(f"ratio = median seconds per epoch (whole run / epochs), engine / old loop; paired = median of the rounds' "
        f"ratios; in-epoch = the epochs' own seconds; worst ratio {worst:.3f} "
        f"(target <= {TARGET_RATIO}); load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    return {
        "ratio_per_epoch": worst,
        "target_ratio": TARGET_RATIO,
        "meets_target": worst <= TARGET_RATIO,
        "bit_identical": all(r["bit_identical"] for r in rows),
        "rows": rows,
        "settings": {**s, "dataset": "fashion_mnist", "data_source": train.source, "seed": seed,
                     "threads": torch.get_num_threads(), "progress": False,
                     "load_average_start": list(load_start), "load_average_end": list(load_end)},
    }
