"""Benchmark ``exits-fashion``: learned early exits (BranchyNet, seed 004) on ResNet-18 / Fashion-MNIST.

ResNet-18 with the small-image stem at width multiplier 0.25 (stage widths 16/32/64/128, so joint
training takes minutes on 2 CPU cores), ``in_channels=1``. Exits after the first three stages
(``layer1``, ``layer2``, ``layer3``; the fourth stage ends in the model's own classifier, the final
exit). Heads: after ``layer1`` three depthwise-separable conv blocks (64, 128, 256 channels, stride 2
each; 1.2 M MACs), 2x2 average pool, linear; after ``layer2`` and ``layer3`` conv-pool-linear (3x3
conv to ``2 x C`` channels, stride 2, BN, ReLU, 2x2 average pool, linear). Trained jointly for 3 epochs
(Adam, lr 2e-3, cosine) with loss weights :data:`WEIGHTS` and self-distillation of the early exits
from the final one (:data:`DISTILLATION`, temperature 3), then the heads alone for
:data:`HEAD_EPOCHS` epochs on the frozen backbone (retrofit mode: the final exit does not change). 10,000 images of
the training set are held out (stratified, seeded) to calibrate the entropy thresholds for an accuracy
drop <= 0.5 points at 95% confidence; the network is trained on the other 50,000 and cached under
``moco.io.cache_dir()/models``. On the 10,000 test images, side by side with the same network with
exits disabled (the model itself): accuracy, MACs per sample from the profiler, exit histogram (every
exit is computed once on the test set and the cascade replayed, which is what the batched forward
does; the timed forward passes are checked to take the same exits), and
wall-clock with :func:`moco.bench.compare` at batch 256 (the first 6 batches, 1,536 test images)
against eager, channels_last and ONNX Runtime, and at batch 1 (the first 200 test images) against
eager (timing subsets keep a full run near 15 minutes on a shared 2-core machine).

``--quick``: one epoch on 8,000 training images, 4,000 calibration images, fewer timing batches; it
checks the pipeline, not the targets.
"""

from __future__ import annotations

import time

import torch

from moco.bench.registry import register

__all__ = [
    "CONFIDENCE", "DISTILLATION", "HEAD0_WIDTHS", "HEAD_EPOCHS", "POINTS", "TARGET", "WEIGHTS", "WIDTH",
    "bench_exits_fashion", "deployed_exits_summary", "trained_network",
]

WIDTH = 0.25
POINTS = ["layer1", "layer2", "layer3"]
WEIGHTS = [1.0, 0.5, 0.5, 1.0]
# The first exit decides most samples, so its head matters most. On this backbone (frozen, heads alone
# trained 3 epochs) the first exit's head compared as: one 3x3 conv block (0.90 M MACs) 86.3% accuracy,
# 2.07x fewer MACs after calibration; two conv blocks (1.81 M) 90.5%, 2.29x; separable 64-128 (0.66 M)
# 89.7%, 2.34x; separable 64-128-256 (1.21 M) 91.7%, 2.59x.
HEAD0_WIDTHS = (64, 128, 256)
DISTILLATION = 0.5  # early exits also learn the final exit's softened output (T = 3): they agree with it more
HEAD_EPOCHS = 2  # after joint training, the heads alone on the frozen backbone (they lag a backbone that moved)
TARGET = 0.005  # accuracy drop, as a fraction (0.5 points)
CONFIDENCE = 0.95


def _recipe(quick: bool) -> dict:
    if quick:
        return dict(n_train=8_000, n_cal=4_000, epochs=1, head_epochs=1, b256_batches=4, b1_images=100, repeats=3)
    return dict(n_train=None, n_cal=10_000, epochs=3, head_epochs=HEAD_EPOCHS, b256_batches=6, b1_images=200, repeats=3)


def trained_network(seed: int, quick: bool, out=print):
    """The jointly trained early-exit ResNet-18 and its data splits; trained once, then cached."""
    from moco.data import load_fashion_mnist, split
    from moco.exits import attach_exits, conv_pool_linear, load_exits, save_exits, sep_conv_pool_linear, train_exits
    from moco.io import cache_dir
    from moco.models import create
    from moco.train import load_checkpoint, save_checkpoint

    r = _recipe(quick)
    train = load_fashion_mnist(train=True)
    test = load_fashion_mnist(train=False)
    fit_part, cal_part = split(train, val_fraction=r["n_cal"] / len(train), seed=seed)
    if r["n_train"] is not None:
        fit_part = fit_part.subset(range(r["n_train"]))
    kwargs = {"num_classes": 10, "in_channels": 1, "width_multiplier": WIDTH}
    tag = f"exits-fashion-resnet18-w{WIDTH}-e{r['epochs']}+{r['head_epochs']}-sep{'-'.join(map(str, HEAD0_WIDTHS))}-d{DISTILLATION}-seed{seed}{'-quick' if quick else ''}"
    ckpt = cache_dir() / "models" / f"{tag}.pt"
    stem = cache_dir() / "models" / f"{tag}-exits"
    x_test, _ = test.tensors()
    if ckpt.exists() and stem.with_name(stem.name + ".json").exists():
        model, meta = load_checkpoint(ckpt)
        if meta.get("complete"):
            net = load_exits(model, stem)
            out(f"loaded the trained network from {ckpt}")
            return net, model, meta, fit_part, cal_part, test
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create("resnet18", **kwargs)
    head = [sep_conv_pool_linear(widths=HEAD0_WIDTHS), conv_pool_linear(), conv_pool_linear()]
    net = attach_exits(model, POINTS, example_input=x_test[:1], head=head, criterion="entropy", seed=seed)
    t0 = time.perf_counter()
    result = train_exits(net, fit_part.tensors(), mode="joint", weights=WEIGHTS, epochs=r["epochs"], batch_size=128,
                         lr=2e-3, schedule="cosine", distillation=DISTILLATION, seed=seed, progress=True)
    heads = train_exits(net, fit_part.tensors(), mode="retrofit", weights=WEIGHTS[:-1], epochs=r["head_epochs"],
                        batch_size=128, lr=1e-3, schedule="cosine", distillation=DISTILLATION, seed=seed + 1,
                        progress=True)
    seconds = time.perf_counter() - t0
    meta = {"complete": True, "train_seconds": seconds, "epochs": r["epochs"], "weights": WEIGHTS,
            "head0": {"type": "sep_conv_pool_linear", "widths": list(HEAD0_WIDTHS)}, "distillation": DISTILLATION,
            "head_epochs": r["head_epochs"],
            "n_train": len(fit_part), "history": [
                {"epoch": h.epoch, "loss": h.loss, "train_accuracy": list(h.train_accuracy)} for h in result.history],
            "head_history": [{"epoch": h.epoch, "loss": h.loss, "train_accuracy": list(h.train_accuracy)}
                             for h in heads.history]}
    save_checkpoint(model, ckpt, arch={"name": "resnet18", "kwargs": kwargs}, meta=meta)
    save_exits(net, stem)
    return net.eval(), model.eval(), meta, fit_part, cal_part, test


def _vs_ort(cmp, name: str) -> float:
    """``name``'s median time over the original in ONNX Runtime's (NaN when that baseline is unavailable)."""
    return cmp.timing(name).median_s / cmp.timing("onnxruntime").median_s if "onnxruntime" in cmp.names else float("nan")


def deployed_exits_summary(deployed: dict, exported, cmp256, cmp1, best: str, x_test, y_test, original_pred,
                           target: float) -> dict:
    """Per precision of a deployed early-exit network: ratios at batch 256 and 1, test accuracy and agreement
    with the original's predictions ``original_pred`` (numpy ``[n]``, the final exit). The deployed choice is the fastest precision at batch 256 whose test
    accuracy is within ``target`` of the original and, for int8, whose re-checked bound holds (else FP32)."""
    import numpy as np

    per = {}
    best1 = min((n for n in cmp1.names if n in ("eager", "onnxruntime")), key=lambda n: cmp1.timing(n).median_s)
    for p, fn in deployed.items():
        logits, exits = zip(*(fn.runtime(x) for x in x_test.split(1000)))
        pred = np.concatenate(logits).argmax(1)
        exit_index = np.concatenate(exits)
        per[p] = {
            "ratio_vs_best_baseline_b256": cmp256.timing(f"deployed-{p}").median_s / cmp256.timing(best).median_s,
            "ratio_vs_onnxruntime_fp32_b256": _vs_ort(cmp256, f"deployed-{p}"),
            "ratio_vs_eager_b256": cmp256.ratio(f"deployed-{p}"),
            "ratio_vs_best_baseline_b1": cmp1.timing(f"deployed-{p}").median_s / cmp1.timing(best1).median_s,
            "ratio_vs_onnxruntime_fp32_b1": _vs_ort(cmp1, f"deployed-{p}"),
            "accuracy_test": float((pred == y_test.numpy()).mean()),
            "agreement_test": float((pred == original_pred).mean()),
            "exit_fractions": np.bincount(exit_index, minlength=len(fn.runtime.graphs)).tolist(),
        }
        per[p]["accuracy_drop_points"] = float((original_pred == y_test.numpy()).mean() - per[p]["accuracy_test"]) * 100
    recheck_ok = exported.recheck is None or exported.recheck["holds"]
    ok = [p for p, d in per.items() if d["accuracy_drop_points"] <= target * 100 and (p == "fp32" or recheck_ok)]
    choice = min(ok or ["fp32"], key=lambda p: cmp256.timing(f"deployed-{p}").median_s)
    d = per[choice]
    return {"precisions": per, "deployed_precision": choice, "best_baseline_b1": best1,
            "deployed_ratio_vs_best_baseline_b256": d["ratio_vs_best_baseline_b256"],
            "deployed_ratio_vs_best_baseline_b1": d["ratio_vs_best_baseline_b1"],
            "deployed_accuracy_test": d["accuracy_test"], "deployed_accuracy_drop_points": d["accuracy_drop_points"],
            "deployed_agreement_test": d["agreement_test"]}


class _ExitVariant:
    """``net(x)`` for the timing harness; returns the logits and keeps the exit indices of the last calls."""

    def __init__(self, net):
        self.net = net
        self.exits: list = []

    def __call__(self, x):
        logits, exit_index = self.net(x)
        self.exits.append(exit_index)
        return logits


@register("exits-fashion", "seed 004: ResNet-18 early exits on Fashion-MNIST, calibrated for <= 0.5 points drop")
def bench_exits_fashion(quick: bool, seed: int, out=print) -> dict:
    """Train (cached), calibrate and measure the early-exit ResNet-18 against the same network without exits."""
    from moco.bench.baselines import baseline_variants, best_baseline, deploy_variants, stage_table
    from moco.bench.harness import compare
    from moco.exits import calibrate, collect_outputs, simulate, summarize_outputs, tradeoff_curve
    from moco.io import cache_dir

    r = _recipe(quick)
    net, model, meta, fit_part, cal_part, test = trained_network(seed, quick, out)
    n_params = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for p in net.heads.parameters())
    out(f"ResNet-18 (small-image stem, width multiplier {WIDTH}: stage widths 16/32/64/128, {n_params:,} params; "
        f"exit heads {head_params:,} params) on Fashion-MNIST; exits after {', '.join(POINTS)} + final")
    out(f"trained jointly on {meta['n_train']:,} training images, {meta['epochs']} epoch(s), loss weights "
        f"{meta['weights']}, Adam lr 2e-3 cosine, distillation {meta.get('distillation', 0)}, first head "
        f"{meta.get('head0')}, then {meta.get('head_epochs', 0)} epoch(s) of the heads alone on the frozen "
        f"backbone, {meta['train_seconds']:.0f} s in all; "
        f"calibration: {len(cal_part):,} held-out training images; test: {len(test):,} images")
    costs = net.costs
    out("MACs per sample (profiler): segments " + ", ".join(f"{m / 1e6:.2f} M" for m in costs.segment_macs)
        + "; heads " + ", ".join(f"{m / 1e6:.2f} M" for m in costs.head_macs)
        + f"; full network {costs.full_macs / 1e6:.2f} M")

    cal_out = collect_outputs(net, cal_part.tensors(), batch_size=500)
    t0 = time.perf_counter()
    cal = calibrate(net, cal_out, target=TARGET, metric="accuracy_drop", confidence=CONFIDENCE, seed=seed,
                    progress=False)
    cal_s = time.perf_counter() - t0
    out("\ncalibration (entropy thresholds, Learn-then-Test, Clopper-Pearson):")
    out(cal.to_text())

    x_test, y_test = test.tensors()
    test_out = collect_outputs(net, (x_test, y_test), batch_size=500)
    per_exit_acc = [float((test_out.predictions[i] == test_out.labels).mean()) for i in range(net.num_exits)]
    out("\naccuracy of every exit on all test images: "
        + ", ".join(f"exit {i} {a:.2%}" for i, a in enumerate(per_exit_acc)))
    report = summarize_outputs(net, test_out)  # the cascade replayed on the one pass above (what net(x) computes)
    out("\ntest set, early exit vs the same network with exits disabled:")
    out(report.to_text())
    curve = tradeoff_curve(net, test_out, n_points=41)
    png = curve.plot(cache_dir() / "bench" / f"exits-fashion-tradeoff-seed{seed}{'-quick' if quick else ''}.png",
                     mark=(report.expected_macs, report.accuracy), title="ResNet-18 / Fashion-MNIST early exits (test)")
    best_same = curve.lowest_macs(report.accuracy_final - TARGET)
    out(f"accuracy vs MACs over thresholds (test set): {png}")
    if best_same is not None:
        out(f"  lowest MACs on the swept curve within {TARGET * 100:.1f} points of the full network (chosen on the "
            f"test set itself, not certified): {best_same.expected_macs / 1e6:.2f} M "
            f"({costs.full_macs / best_same.expected_macs:.2f}x fewer)")

    # wall-clock, side by side
    n_b = r["b256_batches"]
    batches = list(x_test[: 256 * n_b].split(256))
    exit_fn = _ExitVariant(net)
    base = baseline_variants(model, batches[0], include=("eager", "channels_last", "onnxruntime"),
                             check_inputs=batches[:2])
    # deployed: one ONNX graph per segment (exit head + entropy inside), FP32 and int8 (calibrated on 2,000
    # calibration images; the certified bound re-checked for int8 on all of them)
    x_cal, y_cal = cal_part.tensors()
    deployed, exported = deploy_variants(net, batches[0], int8=(x_cal[:2000], y_cal[:2000]), check=(x_test, y_test),
                                         calibration=cal, warmup=batches[:2])
    out("\n" + exported.to_text())
    variants = {**base.variants, "early-exit": exit_fn, **{f"deployed-{p}": fn for p, fn in deployed.items()}}
    cmp256 = compare(variants, batches, warmup=1, repeats=r["repeats"])
    # the real batched forward must take the exits the replay above counted
    measured = torch.cat(exit_fn.exits[-len(batches):]).numpy()
    replayed = simulate(test_out, net.thresholds, net.criterion)[: len(measured)]
    same_exits = float((measured == replayed).mean())
    out(f"\nbatch 256 ({n_b} batches, {256 * n_b:,} test images; the timed forward took the replayed exit for "
        f"{same_exits:.2%} of them):")
    out(cmp256.to_text())
    singles = list(x_test[: r["b1_images"]].split(1))
    b1_variants = {"eager": base.variants["eager"], "early-exit": exit_fn,
                   **{k: base.variants[k] for k in ("onnxruntime",) if k in base.variants},
                   **{f"deployed-{p}": fn for p, fn in deployed.items()}}
    cmp1 = compare(b1_variants, singles, warmup=1, repeats=r["repeats"])
    out(f"\nbatch 1 (the first {len(singles)} test images, one at a time):")
    out(cmp1.to_text())
    best = best_baseline(cmp256, [n for n in base.variants])
    drop_points = (report.accuracy_final - report.accuracy) * 100
    dep = deployed_exits_summary(deployed, exported, cmp256, cmp1, best, x_test, y_test, test_out.predictions[-1], TARGET)
    stages = [{"stage": "original, ONNX Runtime FP32", "ratio": 1.0, "agreement": 1.0, "accuracy": report.accuracy_final,
               "macs_ratio": 1.0},
              {"stage": "+ learned exits (PyTorch eager)", "ratio": _vs_ort(cmp256, "early-exit"),
               "agreement": report.agreement, "accuracy": report.accuracy, "macs_ratio": 1 / report.macs_reduction},
              *({"stage": f"+ deployed {p}", "ratio": d["ratio_vs_onnxruntime_fp32_b256"], "agreement": d["agreement_test"],
                 "accuracy": d["accuracy_test"], "macs_ratio": 1 / report.macs_reduction}
                for p, d in dep["precisions"].items())]
    out(f"\nstage by stage (batch 256; ratio = median time / the original in ONNX Runtime FP32, same run, "
        f"{torch.get_num_threads()} thread(s)):")
    out(stage_table(stages))
    out(f"deployed ({dep['deployed_precision']}): {dep['deployed_ratio_vs_best_baseline_b256']:.3f} of the best "
        f"baseline ({best}) at batch 256, {dep['deployed_ratio_vs_best_baseline_b1']:.3f} at batch 1; test accuracy "
        f"{dep['deployed_accuracy_test']:.4f} (original {report.accuracy_final:.4f})")
    result = {
        **{k: v for k, v in dep.items() if k.startswith("deployed")},
        "deployed": dep["precisions"],
        "export": exported.to_dict(),
        "threads": torch.get_num_threads(),
        "stages": stages,
        "macs_reduction": report.macs_reduction,
        "ratio_vs_eager_b256": cmp256.ratio("early-exit"),
        "ratio_vs_eager_b1": cmp1.ratio("early-exit"),
        "accuracy_base": report.accuracy_final,
        "accuracy_exit": report.accuracy,
        "accuracy_drop_points": drop_points,
        "exit_fractions": list(report.exit_fractions),
        "accuracy_per_exit_taken": list(report.accuracy_per_exit),
        "accuracy_per_exit_all": per_exit_acc,
        "agreement_test": report.agreement,
        "forward_matches_replay": same_exits,
        "expected_macs": report.expected_macs,
        "full_macs": report.full_macs,
        "ratio_vs_best_baseline_b256": cmp256.timing("early-exit").median_s / cmp256.timing(best).median_s,
        "best_baseline_b256": best,
        "thresholds": list(cal.thresholds),
        "calibration": cal.to_dict(),
        "calibration_seconds": cal_s,
        "macs_reduction_curve_same_accuracy": (costs.full_macs / best_same.expected_macs) if best_same else None,
        "targets": {"macs_reduction>=2.5": report.macs_reduction >= 2.5, "accuracy_drop<=0.5pt": drop_points <= 0.5,
                    "ratio_vs_eager_b256<=0.6": cmp256.ratio("early-exit") <= 0.6},
        "model": {"arch": "resnet18", "width_multiplier": WIDTH, "params": n_params, "head_params": head_params,
                  "points": POINTS, "weights": meta["weights"], "epochs": meta["epochs"], "n_train": meta["n_train"],
                  "train_seconds": meta["train_seconds"], "n_calibration": len(cal_part), "n_test": len(test)},
        "tradeoff_png": str(png),
        "comparison_b256": cmp256.to_dict(),
        "comparison_b1": cmp1.to_dict(),
        "unavailable": dict(base.unavailable),
    }
    return result
