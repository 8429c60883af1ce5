"""Benchmark ``exits-mnist-retrofit``: exit heads retrofitted on the trained seed CNN, against seed 000's rules.

The seed CNN (``moco.train.pretrained("seed_cnn", "mnist")``, trained on all 60,000 MNIST training
images) stays frozen: one pool-linear exit head (2x2 average pool to 32x13x13, linear to 10 classes,
54 K MACs; a conv head costs 1.6 M MACs, 8x conv1, and lost its MAC saving to wall-clock) is trained
after split index 2 (conv1 + ReLU, 32x26x26), the rules' layer, on the training images. Because the backbone saw every training image, calibration uses 5,000 MNIST
*test* images (stratified, seeded) and everything is evaluated on the other 5,000, which neither the
heads, the thresholds nor the rules saw. Thresholds are calibrated for an accuracy drop <= 0.5 points
at 95% confidence. The rule-based exit (``AnalyticsEngine`` linear sufficient rules at layer 2, fitted
on 20,000 training images, :class:`moco.rules.BranchedNetwork`) runs on the same evaluation images.
Wall-clock with :func:`moco.bench.compare` at batch 256 (10 batches, 2,560 evaluation images) against
eager, channels_last and ONNX Runtime, and at batch 1 (200 images) against eager.

``--quick``: the quick pretrained CNN, heads trained on 10,000 images, rules on 10,000, fewer timings.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moco.bench.registry import register

__all__ = ["CONFIDENCE", "POINT", "RULES_MAX_ERROR", "TARGET", "bench_exits_mnist_retrofit"]

POINT = 2
TARGET = 0.005
CONFIDENCE = 0.95
RULES_MAX_ERROR = {False: 0.002, True: 0.005}  # certified error among rule exits; --quick holds out fewer samples


def _recipe(quick: bool) -> dict:
    if quick:
        return dict(n_head_train=10_000, epochs=1, n_rules=10_000, b256_batches=5, b1_images=100, repeats=3)
    return dict(n_head_train=60_000, epochs=2, n_rules=20_000, b256_batches=10, b1_images=200, repeats=3)


class _Logits:
    """A network returning ``(logits, extra)`` as a callable returning the logits (for the timing harness)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x)[0]


@register("exits-mnist-retrofit", "exit heads retrofitted on the frozen seed CNN (MNIST) vs seed 000's rule-based exit")
def bench_exits_mnist_retrofit(quick: bool, seed: int, out=print) -> dict:
    """Retrofit, calibrate and time an exit on the seed CNN, and the rule-based exit on the same test images."""
    from moco.bench.baselines import baseline_variants, best_baseline
    from moco.bench.harness import compare
    from moco.capture import build_embeddings_and_predictions
    from moco.data import load_mnist
    from moco.data.split import split_indices
    from moco.exits import attach_exits, calibrate, evaluate_exits, pool_linear, train_exits
    from moco.rules import AnalyticsEngine
    from moco.rules.branched import BranchedNetwork, expected_macs
    from moco.train import pretrained

    r = _recipe(quick)
    model, meta = pretrained("seed_cnn", "mnist", seed=seed, quick=quick)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_train, y_train = load_mnist(train=True).tensors()
    x_test, y_test = load_mnist(train=False).tensors()
    _, cal_idx, _ = split_indices(y_test.numpy(), val_fraction=0.5, seed=seed)
    mask = np.zeros(len(y_test), dtype=bool)
    mask[cal_idx] = True
    x_cal, y_cal = x_test[torch.from_numpy(mask)], y_test[torch.from_numpy(mask)]
    x_ev, y_ev = x_test[torch.from_numpy(~mask)], y_test[torch.from_numpy(~mask)]
    out(f"seed CNN on MNIST ({meta.get('data_source')}), test accuracy {meta['accuracy_test']:.2%}; exit after split "
        f"index {POINT} (conv1 + ReLU); calibration on {len(x_cal):,} test images, evaluation on the other {len(x_ev):,}")

    # --- learned exit, retrofit
    net = attach_exits(model, [POINT], example_input=x_test[:1], head=[pool_linear(pool_size=13)],
                       criterion="entropy", seed=seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_train), generator=g)[: r["n_head_train"]]
    t0 = time.perf_counter()
    train_exits(net, (x_train[order], y_train[order]), mode="retrofit", epochs=r["epochs"], batch_size=128, lr=2e-3,
                schedule="cosine", seed=seed, progress=True)
    head_s = time.perf_counter() - t0
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out(f"retrofit: head trained on {len(order):,} training images, {r['epochs']} epoch(s), {head_s:.1f} s; backbone "
        f"weights unchanged: {unchanged}")
    t0 = time.perf_counter()
    cal = calibrate(net, (x_cal, y_cal), target=TARGET, metric="accuracy_drop", confidence=CONFIDENCE, seed=seed,
                    progress=False)
    cal_s = time.perf_counter() - t0
    out(cal.to_text())
    report = evaluate_exits(net, (x_ev, y_ev), batch_size=256)
    out("\nlearned exit on the evaluation images:")
    out(report.to_text())

    # --- rule-based exit (seed 000), same evaluation images
    n_rules = r["n_rules"]
    max_error = RULES_MAX_ERROR[quick]
    with tempfile.TemporaryDirectory(prefix="moco-exits-rules-") as tmp:
        t0 = time.perf_counter()
        feats, preds = build_embeddings_and_predictions(model, x_train[:n_rules], POINT, batch_size=1000,
                                                        out=Path(tmp) / "layer2.npy", progress=False)
        flat = feats.reshape(len(feats), -1)
        ae = AnalyticsEngine(flat, {"predictions": preds.argmax(1)}, layer=POINT, seed=seed, progress=False)
        rule_set, rule_out = ae.compute_linear_sufficient_rules("predictions", max_error=max_error)
        rules_s = time.perf_counter() - t0
        del ae, flat, feats
    branched = BranchedNetwork(model, layer=POINT, rule=rule_set)
    with torch.inference_mode():
        r_pred, r_mask, finals = [], [], []
        for xb in x_ev.split(1000):
            o, m = branched(xb)
            r_pred.append(o.argmax(1))
            r_mask.append(m)
            finals.append(model(xb).argmax(1))
        r_pred, r_mask, finals = torch.cat(r_pred), torch.cat(r_mask), torch.cat(finals)
    rules_cov = float(r_mask.float().mean())
    rules_acc = float((r_pred == y_ev).float().mean())
    rules_cost = expected_macs(model, POINT, rules_cov, example_input=x_test[:1], n_features=rule_set.n_features,
                               num_classes=rule_set.num_classes)
    certified = rule_out.get("certified_precision")
    certified_text = "none certified" if certified is None else f"certified precision {certified:.4f}"
    out(f"\nrule-based exit (seed 000) at layer {POINT}, fitted on {n_rules:,} training images in {rules_s:.1f} s "
        f"(max_error {max_error}, {certified_text}): coverage "
        f"{rules_cov:.1%}, accuracy {rules_acc:.2%}, agreement {float((r_pred == finals).float().mean()):.2%}, "
        f"expected MACs ratio {rules_cost.ratio:.3f} ({1 / rules_cost.ratio:.2f}x fewer)")

    # --- wall-clock, side by side
    batches = list(x_ev[: 256 * r["b256_batches"]].split(256))
    base = baseline_variants(model, batches[0], include=("eager", "channels_last", "onnxruntime"),
                             check_inputs=batches[:2])
    exit_fn, rules_fn = _Logits(net), _Logits(branched)
    cmp256 = compare({**base.variants, "early-exit": exit_fn, "rules": rules_fn}, batches, warmup=1,
                     repeats=r["repeats"])
    out(f"\nbatch 256 ({len(batches)} batches of evaluation images):")
    out(cmp256.to_text())
    singles = list(x_ev[: r["b1_images"]].split(1))
    cmp1 = compare({"eager": base.variants["eager"], "early-exit": exit_fn, "rules": rules_fn}, singles, warmup=1,
                   repeats=r["repeats"])
    out(f"\nbatch 1 ({len(singles)} evaluation images, one at a time):")
    out(cmp1.to_text())
    best = best_baseline(cmp256, list(base.variants))
    drop = (report.accuracy_final - report.accuracy) * 100
    return {
        "macs_reduction": report.macs_reduction,
        "ratio_vs_eager_b256": cmp256.ratio("early-exit"),
        "ratio_vs_eager_b1": cmp1.ratio("early-exit"),
        "accuracy_base": report.accuracy_final,
        "accuracy_exit": report.accuracy,
        "accuracy_drop_points": drop,
        "exit_fractions": list(report.exit_fractions),
        "agreement_test": report.agreement,
        "certified_bound": cal.certified_bound,
        "thresholds": list(cal.thresholds),
        "backbone_unchanged": unchanged,
        "ratio_vs_best_baseline_b256": cmp256.timing("early-exit").median_s / cmp256.timing(best).median_s,
        "best_baseline_b256": best,
        "rules_macs_reduction": 1 / rules_cost.ratio,
        "rules_ratio_vs_eager_b256": cmp256.ratio("rules"),
        "rules_ratio_vs_eager_b1": cmp1.ratio("rules"),
        "rules_accuracy_exit": rules_acc,
        "rules_accuracy_drop_points": (report.accuracy_final - rules_acc) * 100,
        "rules_exit_fractions": [rules_cov, 1 - rules_cov],
        "rules_agreement_test": float((r_pred == finals).float().mean()),
        "rules_max_error": max_error,
        "rules_certified_precision": certified,
        "rules_n_fit": n_rules,
        "rules_fit_seconds": rules_s,
        "head_train_seconds": head_s,
        "calibration_seconds": cal_s,
        "calibration": cal.to_dict(),
        "n_calibration": len(x_cal),
        "n_eval": len(x_ev),
        "comparison_b256": cmp256.to_dict(),
        "comparison_b1": cmp1.to_dict(),
        "unavailable": dict(base.unavailable),
    }
