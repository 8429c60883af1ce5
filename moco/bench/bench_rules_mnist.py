"""Benchmark ``rules-mnist``: seed 000's table, measured honestly.

The trained seed CNN (``moco.train.pretrained``) is captured after its first ReLU (split index 2,
32x26x26 = 21,632 features) on the MNIST training images; rules are fitted on the training images only
(scorer on 75%, thresholds certified on the held-out 25%). Then, side by side at batch 1000:

- seed 000's per-class table: one ``BranchedNetwork`` per class rule against eager, with
  ``baseline_time``, ``experimental_time``, ``n_match`` and ``total_shortcutted`` on the training images,
  plus one row for all ten classes in one ``RuleSet``;
- the all-classes network against the honest baselines (eager, channels_last, torch.compile, ONNX
  Runtime), with agreement on the training images and on the 10,000 test images no rule saw, and the
  cost model's expected MACs ratio next to the measured time ratio.

``--quick``: 20,000 training images for capture, fit and timing, fewer repeats.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch

from moco.bench.baselines import deploy_variants, stage_table
from moco.bench.registry import register

__all__ = [
    "AGREEMENT_TARGET", "BATCH_SIZE", "LAYER", "MAX_ERROR_CLASS", "MAX_ERROR_SET", "bench_rules_mnist",
    "pretrained_model",
]

BATCH_SIZE = 1000
LAYER = 2
# certified error rate among exits (95%): the all-classes set and each per-class rule (fewer held-out
# samples per class certify less); --quick holds out a third as many samples and certifies less.
MAX_ERROR_SET = {False: 0.0007, True: 0.002}
MAX_ERROR_CLASS = {False: 0.005, True: 0.01}


class _Recorder:
    """Calls a BranchedNetwork and keeps the predictions and exit counts of its latest full pass."""

    def __init__(self, net, n_batches: int):
        self.net, self.n_batches, self.calls = net, n_batches, 0
        self.preds: list = [None] * n_batches
        self.exited = [0] * n_batches

    def __call__(self, x):
        out, mask = self.net(x)
        i = self.calls % self.n_batches
        self.preds[i], self.exited[i] = out.argmax(1), int(mask.sum())
        self.calls += 1
        return out

    def predictions(self) -> tuple[torch.Tensor, int]:
        return torch.cat(self.preds), sum(self.exited)


def _predict(fn, batches) -> tuple[torch.Tensor, int]:
    preds, exited = [], 0
    with torch.inference_mode():
        for x in batches:
            out = fn(x)
            if isinstance(out, tuple):
                out, mask = out
                exited += int(mask.sum())
            preds.append(out.argmax(1))
    return torch.cat(preds), exited


@register("rules-mnist", "seed 000: rule-based early exit on the MNIST seed CNN, per-class table + all-classes RuleSet")
def bench_rules_mnist(quick: bool, seed: int, out=print, *, n_train: int | None = None,
                      max_error_set: float | None = None, max_error_class: float | None = None) -> dict:
    """Fit rules at layer 2 of the trained seed CNN and time BranchedNetworks against eager and the baselines.

    ``n_train`` and the ``max_error_*`` arguments override the sizes for smoke runs.
    """
    import pandas as pd

    from moco.bench.baselines import BASELINE_NAMES, baseline_variants, best_baseline
    from moco.bench.harness import compare
    from moco.capture import build_embeddings_and_predictions
    from moco.data import load_mnist
    from moco.rules import AnalyticsEngine
    from moco.rules.branched import BranchedNetwork, expected_macs
    from moco.stats import clopper_pearson_lower

    size, repeats, class_repeats = (20_000, 2, 1) if quick else (60_000, 3, 1)
    n_train = n_train or size
    max_error_set = max_error_set or MAX_ERROR_SET[quick]
    max_error_class = max_error_class or MAX_ERROR_CLASS[quick]
    model, meta = pretrained_model(seed, quick)
    x_train, _ = load_mnist(train=True).tensors()
    x_test, y_test = load_mnist(train=False).tensors()
    x_train = x_train[:n_train]
    out(f"seed CNN on MNIST ({meta.get('data_source')}), test accuracy {meta['accuracy_test']:.2%}; "
        f"rules at layer {LAYER} fitted on {n_train:,} training images")

    with tempfile.TemporaryDirectory(prefix="moco-rules-") as tmp:
        t0 = time.perf_counter()
        feats, preds = build_embeddings_and_predictions(model, x_train, LAYER, batch_size=BATCH_SIZE,
                                                        out=Path(tmp) / "layer2.npy", progress=False)
        capture_s = time.perf_counter() - t0
        flat = feats.reshape(len(feats), -1)
        out(f"captured {flat.shape[0]:,} x {flat.shape[1]:,} float32 ({flat.nbytes / 2**30:.2f} GiB, memmap) "
            f"in {capture_s:.1f} s")
        t0 = time.perf_counter()
        ae = AnalyticsEngine(flat, {"predictions": preds.argmax(1)}, layer=LAYER, seed=seed, progress=False)
        rule_set, set_out = ae.compute_linear_sufficient_rules("predictions", max_error=max_error_set)
        fit_s = time.perf_counter() - t0
        class_rules = {}
        for c in range(10):
            rule, _ = ae.compute_linear_sufficient_rule("predictions", c, max_error=max_error_class)
            class_rules[c] = rule
        del ae, flat, feats
    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    out(f"fitted the 10-class rule set in {fit_s:.1f} s (scorer {set_out['scorer_fit_seconds']:.1f} s); "
        f"held-out coverage {set_out['coverage_val']:.3f}, precision {num(set_out['precision_val'], '.5f')}, "
        f"certified >= {num(set_out['certified_precision'], '.5f')}")

    train_batches = list(x_train.split(BATCH_SIZE))
    test_batches = list(x_test.split(BATCH_SIZE))
    model.eval()
    eager_pred_train, _ = _predict(model, train_batches)
    eager_pred_test, _ = _predict(model, test_batches)

    nets = {f"rule_{c}": BranchedNetwork(model, layer=LAYER, rule=r) for c, r in class_rules.items()}
    nets["all"] = BranchedNetwork(model, layer=LAYER, rule=rule_set)
    recorders = {name: _Recorder(net, len(train_batches)) for name, net in nets.items()}
    base = baseline_variants(model, train_batches[0], check_inputs=test_batches[:2])
    for fn in [*base.variants.values(), *recorders.values()]:  # warm-up: a few batches each
        with torch.inference_mode():
            for x in train_batches[:2]:
                fn(x)
    for rec in recorders.values():
        rec.calls = 0

    # deployed: the all-classes network in ONNX Runtime (head + rule graph, tail graph), FP32 and int8
    threads = torch.get_num_threads()
    # int8 calibrated on 2,000 training images; checked against PyTorch on the test set
    deployed, exported = deploy_variants(nets["all"], x_train[:BATCH_SIZE], int8=x_train[:2000], check=(x_test, y_test),
                                         threads=threads, warmup=train_batches[:2])
    out("\n" + exported.to_text())

    # the all-classes network (PyTorch and deployed) against the honest baselines, side by side
    variants = dict(base.variants)
    variants["rules-all"] = recorders["all"]
    variants.update({f"deployed-{p}": fn for p, fn in deployed.items()})
    cmp = compare(variants, train_batches, warmup=0, repeats=repeats)
    out("\nall ten classes in one RuleSet (PyTorch, and deployed to ONNX Runtime) vs the honest baselines:")
    out(cmp.to_text())

    # seed 000's table: each class rule (and the set) against eager, interleaved; predictions are
    # recorded during the timed runs themselves
    table_cmp = compare({"eager": base.variants["eager"], **{k: v for k, v in recorders.items() if k != "all"}},
                        train_batches, warmup=0, repeats=class_repeats)
    rows = {}
    for name, net in nets.items():
        p_train, shortcut_train = recorders[name].predictions()
        p_test, shortcut_test = _predict(net, test_batches)
        timing = cmp if name == "all" else table_cmp
        eager_name = "eager"
        rows[name] = {
            "baseline_time": timing.timing(eager_name).median_s,
            "experimental_time": timing.timing("rules-all" if name == "all" else name).median_s,
            "ratio": timing.ratio("rules-all" if name == "all" else name),
            "n_match": float((p_train == eager_pred_train).float().mean()),
            "total_shortcutted": shortcut_train,
            "n_match_test": float((p_test == eager_pred_test).float().mean()),
            "shortcutted_test": shortcut_test,
        }
    df = pd.DataFrame.from_dict(rows, orient="index")
    out(f"\nseed 000's table on {n_train:,} training images (median seconds; per-class rows: {class_repeats} "
        f"interleaved run(s) against eager; 'all': {repeats} runs, from the comparison above)")
    out(df.to_string(float_format=lambda v: f"{v:.5f}"))

    best = best_baseline(cmp, BASELINE_NAMES)
    all_row = rows["all"]
    n_test = len(x_test)
    matches_test = int(round(all_row["n_match_test"] * n_test))
    coverage_test = all_row["shortcutted_test"] / n_test
    cost = expected_macs(model, LAYER, coverage_test, example_input=x_test[:1],
                         n_features=rule_set.n_features, num_classes=rule_set.num_classes)
    out(f"cost model: expected MACs ratio {cost.ratio:.3f} at test coverage {coverage_test:.3f}; "
        f"measured time ratio {cmp.ratio('rules-all'):.3f} vs eager")

    dep = _deployed_summary(cmp, deployed, test_batches, eager_pred_test, y_test, best)
    ort = cmp.timing("onnxruntime").median_s if "onnxruntime" in cmp.names else float("nan")
    stages = [{"stage": "original, ONNX Runtime FP32", "ratio": 1.0, "agreement": 1.0,
               "accuracy": meta["accuracy_test"], "macs_ratio": 1.0},
              {"stage": "+ rules (PyTorch eager)", "ratio": cmp.timing("rules-all").median_s / ort,
               "agreement": all_row["n_match_test"], "macs_ratio": cost.ratio},
              *({"stage": f"+ deployed {p}", "ratio": d["ratio_vs_onnxruntime_fp32"], "agreement": d["agreement_test"],
                 "accuracy": d["accuracy_test"], "macs_ratio": cost.ratio} for p, d in dep["precisions"].items())]
    out(f"\nstage by stage (batch {BATCH_SIZE}, {threads} thread(s); ratio = median time / the original in ONNX "
        f"Runtime FP32, same run):")
    out(stage_table(stages))
    out(f"deployed ({dep['deployed_precision']}): {dep['deployed_ratio_vs_best_baseline']:.3f} of the best baseline "
        f"({best}), agreement with the original on the test set {dep['deployed_agreement_test']:.5f}")
    return {
        "deployed_ratio_vs_best_baseline": dep["deployed_ratio_vs_best_baseline"],
        "deployed_precision": dep["deployed_precision"],
        "deployed_agreement_test": dep["deployed_agreement_test"],
        "deployed": dep["precisions"],
        "export": exported.to_dict(),
        "threads": threads,
        "stages": stages,
        "ratio_vs_eager": cmp.ratio("rules-all"),
        "ratio_vs_best_baseline": cmp.timing("rules-all").median_s / cmp.timing(best).median_s,
        "best_baseline": best,
        "agreement_train": all_row["n_match"],
        "agreement_test": all_row["n_match_test"],
        "certified_agreement_test": float(clopper_pearson_lower(matches_test, n_test, 0.95)),
        "certified_precision_val": set_out["certified_precision"],
        "shortcut_fraction_test": coverage_test,
        "shortcut_fraction_train": all_row["total_shortcutted"] / n_train,
        "expected_macs_ratio": cost.ratio,
        "fit_seconds": fit_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scorer_fit_seconds": set_out["scorer_fit_seconds"],
        "capture_seconds": capture_s,
        "n_features": rule_set.n_features,
        "n_train": n_train,
        "max_error": max_error_set,
        "accuracy_model_test": meta["accuracy_test"],
        "per_class": rows,
        "comparison": cmp.to_dict(),
        "unavailable": dict(base.unavailable),
    }


AGREEMENT_TARGET = 0.9995
"""Agreement with the original on the test set the deployed network must keep (issue 16)."""


def _deployed_summary(cmp, deployed: dict, test_batches, eager_pred_test, y_test, best: str) -> dict:
    """Per precision: time ratios, test agreement with the original and accuracy; the deployed choice is the
    fastest precision that keeps :data:`AGREEMENT_TARGET` (FP32 when none does)."""
    per = {}
    best_s = cmp.timing(best).median_s
    ort_s = cmp.timing("onnxruntime").median_s if "onnxruntime" in cmp.names else float("nan")
    for p, fn in deployed.items():
        preds, exited = [], 0
        for x in test_batches:
            pred, mask = fn.runtime(x)
            preds.append(torch.from_numpy(pred.argmax(1)))
            exited += int(mask.sum())
        pred = torch.cat(preds)
        median = cmp.timing(f"deployed-{p}").median_s
        per[p] = {"ratio_vs_best_baseline": median / best_s, "ratio_vs_onnxruntime_fp32": median / ort_s,
                  "ratio_vs_eager": cmp.ratio(f"deployed-{p}"), "median_s": median,
                  "agreement_test": float((pred == eager_pred_test).float().mean()),
                  "accuracy_test": float((pred == y_test).float().mean()),
                  "shortcut_fraction_test": exited / len(pred)}
    ok = [p for p, d in per.items() if d["agreement_test"] >= AGREEMENT_TARGET] or ["fp32"]
    choice = min(ok, key=lambda p: per[p]["median_s"])
    return {"precisions": per, "deployed_precision": choice,
            "deployed_ratio_vs_best_baseline": per[choice]["ratio_vs_best_baseline"],
            "deployed_agreement_test": per[choice]["agreement_test"]}


def pretrained_model(seed: int, quick: bool):
    """The trained seed CNN (cached by ``moco.train.pretrained``)."""
    from moco.train import pretrained

    return pretrained(name="seed_cnn", dataset="mnist", seed=seed, quick=quick)
