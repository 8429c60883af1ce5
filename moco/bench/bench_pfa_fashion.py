"""Benchmark ``pfa-fashion``: seed 001's Principal Filter Analysis on a VGG-style CNN, taken to a faster model.

1. the base: ``pretrained("vgg_bn", "fashion_mnist")`` (cached under ``cache_dir()/models``): six
   conv3x3-BN-ReLU layers of widths 32-32-64-64-128-128 in three stages (28, 14, 7 pixels),
   global average pooling and a linear classifier (288,170 params, 29.1 M MACs per image), trained
   4 epochs with Adam (lr 2e-3 annealed to 0 on a cosine, batch 128) on the 60,000 training images;
2. :meth:`PFA.introspect` on a random subset of the *training* images: the max-pooled (as in the seed)
   output of each conv block's ReLU, i.e. after BatchNorm, streamed into float64 covariances;
3. recipes ``KL`` and ``Energy(0.99)`` with ``AbsMax`` unit selection (table + chart under ``out_dir``);
4. each recipe applied to the block's ``Conv2d`` with :func:`moco.compress.surgery.apply` (BatchNorm
   and the next conv follow; the accuracy right after surgery is also shown with BatchNorm statistics
   re-estimated on 2,000 training images, :func:`moco.compress.finetune.recalibrate_batchnorm`), fine-tuned with :func:`moco.compress.finetune.finetune` on the training
   images, and measured with :func:`moco.compress.report.compare_models` on the 10,000 test images
   (params, MACs, accuracy; original eager / channels-last / ONNX Runtime against the small model,
   side by side);
5. a third recipe, ``Size`` (one energy threshold shared by all layers), with the largest
   ``relative_size`` whose recipe gives at least 3.3x fewer MACs (found by bisection on MACs alone,
   before any training) -- ``size_<f>``;
6. full run: if KL alone gives less than 3x fewer MACs, PFA is applied again to the fine-tuned KL
   model (as the PFA paper iterates) -- ``kl_x2``;
7. KL with every kept count rounded to this CPU's ONNX Runtime channel block (``round_to="auto"``:
   8 on AVX2, 16 on AVX-512) -- ``kl_r<block>``, iterated like ``kl`` -- ``kl_r<block>_x2``.

The result's headline keys (``macs_reduction``, ``params_reduction``, ``accuracy_base``,
``accuracy_pruned``, ``ratio_vs_eager``) are those of the recipe with the most MACs reduction among
those within 0.5 accuracy points of the base on the test set (the target: >= 3x at <= 0.5 points); if
none is, the one with the smallest drop. ``recipes`` holds every recipe's numbers. Note that the
fine-tune is extra training the base did not get (stated in the output, ``finetune_epochs``).

Fine-tuning: Adam, lr 1e-3 annealed to 0 on a cosine, batch 128.
Full run: PFA on 4,000 training images, fine-tune 2 epochs on all 60,000, 2,000 images per timing run,
5 repeats. ``--quick``: the quick base (1 epoch on 10,000 images), 1,000 images for PFA, one fine-tune
epoch on 3,000, 500 images per timing run, 3 repeats, no second iteration. The kept unit indices of
every recipe are in ``out_dir/recipes.csv``; the JSON holds the counts.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from moco.bench.registry import register

__all__ = [
    "BATCH_SIZE", "SETTINGS", "SIZE_MARGIN", "TARGET_DROP_POINTS", "TARGET_MACS", "bench_pfa_fashion",
    "block_responses",
]

TARGET_MACS = 3.0
TARGET_DROP_POINTS = 0.5
SIZE_MARGIN = 1.1  # the Size recipe aims at 10% more MACs reduction than the target
BATCH_SIZE = 1000

SETTINGS = {
    False: dict(n_introspect=4000, n_finetune=None, finetune_epochs=2, timing_samples=2000, repeats=5, iterate=True,
                round_to="auto"),
    True: dict(n_introspect=1000, n_finetune=3_000, finetune_epochs=1, timing_samples=500, repeats=3, iterate=False,
               round_to="auto"),
}
# round_to: the KL recipe is also run with every kept count rounded to this CPU's ONNX Runtime channel block
# (``kl_r<block>``, and ``kl_r<block>_x2`` when iterating): odd widths fall off ORT's fast kernels
# (moco.profile.hardware); None skips those rows


def block_responses(model: nn.Module) -> dict[str, str]:
    """``{ReLU module name: Conv2d module name}`` for each conv followed (after BN) by a ReLU in a Sequential.

    PFA analyses the ReLU's output (the block's response); surgery prunes the conv (BN follows it).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"block_responses expects an nn.Sequential, got {type(model).__name__}")
    mapping, conv = {}, None
    for name, module in model.named_children():
        if isinstance(module, nn.Conv2d):
            conv = name
        elif isinstance(module, nn.ReLU) and conv is not None:
            mapping[name] = conv
            conv = None
        elif not isinstance(module, nn.BatchNorm2d):
            conv = None
    return mapping


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _size_for_macs(pfa, model, responses, target: float, example) -> tuple[float, float]:
    """Largest ``Size`` fraction (3 decimals) whose recipe cuts the model's MACs by at least ``target``.

    Only unit *counts* matter for MACs, so each candidate is measured on a surgery of the first units
    (no unit selection, no training): bisection over the fraction, ~12 profiles of the small model.
    Returns ``(fraction, MACs reduction)``.
    """
    from moco.compress.pfa import PFA
    from moco.compress.surgery import apply
    from moco.profile import profile

    spectra = {name: st.eigenvalues for name, st in pfa.statistics.items()}
    base_macs = profile(model, example, latency=False).totals.macs

    def reduction(fraction: float) -> float:
        counts, _ = PFA.Strategy.Size(relative_size=fraction, min_kept_count=1).recommend(spectra)
        keep = {responses[name]: list(range(k)) for name, k in counts.items()}
        return base_macs / profile(apply(model, keep, example_input=example), example, latency=False).totals.macs

    lo, hi = 0.02, 1.0  # reduction(lo) >= target > reduction(hi) unless the target is out of reach
    if reduction(lo) < target:
        return lo, reduction(lo)
    for _ in range(12):
        mid = (lo + hi) / 2
        if reduction(mid) >= target:
            lo = mid
        else:
            hi = mid
    fraction = round(lo - 0.0005, 3)
    return fraction, reduction(fraction)


def _run_recipe(name, base, current, keep, data, cfg, seed, out, out_dir):
    """Surgery + fine-tune + side-by-side report for one recipe applied to ``current``; ``keep``:
    ``{module: kept unit indices}`` (``PFA.keep(recipes, rename=...)`` or
    :func:`moco.compress.pfa.partial_keep`)."""
    from moco.compress.finetune import finetune, recalibrate_batchnorm
    from moco.compress.report import compare_models
    from moco.compress.surgery import apply
    from moco.train import evaluate

    (x_ft, y_ft), (x_te, y_te) = data["finetune"], data["test"]
    example = x_te[:1]
    small = apply(current, keep, example_input=example)
    acc_pre = evaluate(small, (x_te, y_te)).accuracy
    # diagnostic, on a copy: surgery leaves the original's BatchNorm statistics, which no longer fit the
    # smaller layers (hence near-chance accuracy right after surgery); re-estimating them shows what the
    # rebuilt weights alone give. The fine-tune starts from the surgery output itself (train-mode
    # BatchNorm re-estimates the statistics within its first steps anyway).
    refreshed = copy.deepcopy(small)
    recalibrate_batchnorm(refreshed, x_ft, max_samples=2000)
    acc_bn = evaluate(refreshed, (x_te, y_te)).accuracy
    t0 = time.perf_counter()
    # cfg["distill"]: knowledge distillation from the base (the trained model the small one replaces)
    finetune(small, (x_ft, y_ft), epochs=cfg["finetune_epochs"], lr=1e-3, optimizer="adam", batch_size=128,
             schedule="cosine", seed=seed, progress=False, teacher=base if cfg.get("distill") else None)
    ft_s = time.perf_counter() - t0
    small.eval()
    rep = compare_models(base, small, (x_te, y_te), example_input=example, batch_size=BATCH_SIZE,
                         repeats=cfg["repeats"], max_timing_samples=cfg["timing_samples"], seed=seed)
    d = rep.to_dict()
    out(f"\n[{name}] widths {list(_widths(small).values())}; test accuracy {acc_pre:.2%} right after surgery, "
        f"{acc_bn:.2%} with BatchNorm statistics re-estimated on 2,000 training images, "
        f"{d['accuracy_after']:.2%} after {cfg['finetune_epochs']} fine-tune epoch(s) on {len(x_ft):,} images "
        f"({ft_s:.0f} s)")
    out(rep.to_text())
    try:
        from moco.compress.surgery import save

        save(small, out_dir / f"small_{name}")
        saved = str(out_dir / f"small_{name}")
    except Exception as exc:  # noqa: BLE001 - saving is a by-product; say why it failed
        saved = f"not saved: {type(exc).__name__}: {exc}"
    row = {
        "macs_reduction": d["macs_reduction"],
        "params_reduction": d["params_reduction"],
        "accuracy_base": d["accuracy_before"],
        "accuracy_pruned": d["accuracy_after"],
        "accuracy_after_surgery": acc_pre,
        "accuracy_after_bn_recalibration": acc_bn,
        "accuracy_drop_points": d["accuracy_drop_points"],
        "ratio_vs_eager": d["ratio_vs_eager"],
        "ratio_vs_best_baseline": d["ratio_vs_best_baseline"],
        "best_baseline": d["best_baseline"],
        "ratio_best_vs_best": d["ratio_best_vs_best"],
        "best_small": d["best_small"],
        "macs_before": d["macs_before"],
        "macs_after": d["macs_after"],
        "params_before": d["params_before"],
        "params_after": d["params_after"],
        "widths": _widths(small),
        "units_ratio": sum(_widths(small).values()) / sum(_widths(base).values()),
        "finetune_seconds": ft_s,
        "timings": d["timings"],
        "unavailable": d["unavailable"],
        "saved": saved,
    }
    return small, row


@register("pfa-fashion", "seed 001: PFA (KL, Energy 0.99) on a VGG-style BN CNN on Fashion-MNIST, surgery, "
                         "fine-tune, measured side by side against the original")
def bench_pfa_fashion(quick: bool, seed: int, out=print, *, out_dir: str | Path = "moco-out/pfa-fashion",
                      n_introspect: int | None = None, n_finetune: int | None = None,
                      finetune_epochs: int | None = None, repeats: int | None = None) -> dict:
    """Introspect the trained vgg_bn with PFA, apply KL and Energy(0.99) with surgery, fine-tune and measure.

    The keyword arguments override the sizes (smoke runs). Returns the JSON-able result dict.
    """
    from moco.compress.pfa import PFA
    from moco.data import load_fashion_mnist
    from moco.train import pretrained

    cfg = dict(SETTINGS[quick])
    for key, value in (("n_introspect", n_introspect), ("n_finetune", n_finetune),
                       ("finetune_epochs", finetune_epochs), ("repeats", repeats)):
        if value is not None:
            cfg[key] = value
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    base, meta = pretrained("vgg_bn", "fashion_mnist", seed=seed, quick=quick, progress=False)
    base.eval()
    x_tr, y_tr = load_fashion_mnist(train=True).tensors()
    x_te, y_te = load_fashion_mnist(train=False).tensors()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_tr), generator=gen)
    x_intro = x_tr[order[: cfg["n_introspect"]]]
    ft_idx = order if cfg["n_finetune"] is None else order[: cfg["n_finetune"]]
    data = {"finetune": (x_tr[ft_idx], y_tr[ft_idx]), "test": (x_te, y_te)}
    responses = block_responses(base)
    out(f"base: vgg_bn widths {list(_widths(base).values())} on Fashion-MNIST ({meta.get('data_source')}), "
        f"recipe {meta.get('recipe')} on {meta.get('n_train', '?')} images; test accuracy {meta['accuracy_test']:.2%}")

    t0 = time.perf_counter()
    pfa = PFA.introspect(x_intro, model=base, layers=list(responses), pooling="max", batch_size=500, progress=False)
    intro_s = time.perf_counter() - t0
    out(f"PFA introspection: max-pooled ReLU outputs {list(responses)} (convs {list(responses.values())}) over "
        f"{len(x_intro):,} training images in {intro_s:.1f} s; failed: {dict(pfa.failed_responses) or 'none'}")
    recipe_sets = {
        "kl": pfa.get_recipe(strategy=PFA.Strategy.KL(), unit_strategy=PFA.UnitSelectionStrategy.AbsMax()),
        "energy_0.99": pfa.get_recipe(strategy=PFA.Strategy.Energy(energy_threshold=0.99, min_kept_count=1),
                                      unit_strategy=PFA.UnitSelectionStrategy.AbsMax()),
    }
    # Size: one global energy threshold, its fraction chosen (on MACs alone) to reach the MACs target
    fraction, size_macs = _size_for_macs(pfa, base, responses, TARGET_MACS * SIZE_MARGIN, x_te[:1])
    recipe_sets[f"size_{fraction:g}"] = pfa.get_recipe(
        strategy=PFA.Strategy.Size(relative_size=fraction, min_kept_count=1),
        unit_strategy=PFA.UnitSelectionStrategy.AbsMax())
    out(f"Size: relative_size {fraction:g} is the largest fraction whose recipe gives >= "
        f"{TARGET_MACS * SIZE_MARGIN:g}x fewer MACs ({size_macs:.2f}x)")
    cols = ["layer name", "original count", "recommended count", "kept energy", "KL divergence"]
    PFA.show(recipe_sets, include_columns=[], path=out_dir / "recipes.csv")  # every column, kept indices too
    table = PFA.show(recipe_sets, include_columns=cols)
    out("\nPFA recipes (AbsMax unit selection):")
    out(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    chart = out_dir / "recipes.png"
    try:
        PFA.show(recipe_sets, vis_type=PFA.VisType.CHART, path=chart)
    except Exception as exc:  # noqa: BLE001 - the chart is a by-product; say why it is missing
        out(f"(no chart: {type(exc).__name__}: {exc})")
        chart = None

    rows: dict[str, dict] = {}
    smalls: dict[str, nn.Module] = {}
    for name, recipes in recipe_sets.items():
        smalls[name], rows[name] = _run_recipe(name, base, base, PFA.keep(recipes, rename=responses), data, cfg,
                                                   seed, out, out_dir)

    def kl_again(first: nn.Module, round_to: int | None):
        """Iterate as the PFA paper does: introspect the fine-tuned ``first`` and apply KL again;
        returns the recipes and ``{conv: kept indices}`` (counts rounded to ``round_to`` when given)."""
        from moco.compress.pfa import partial_keep

        first_responses = block_responses(first)
        again = PFA.introspect(x_intro, model=first, layers=list(first_responses), pooling="max", batch_size=500,
                               progress=False)
        kl2 = again.get_recipe(strategy=PFA.Strategy.KL(), unit_strategy=PFA.UnitSelectionStrategy.AbsMax())
        if round_to is None:
            return kl2, PFA.keep(kl2, rename=first_responses)
        keep2 = partial_keep(kl2, again, 1.0, PFA.UnitSelectionStrategy.AbsMax(), round_to=round_to)
        return kl2, {first_responses[k]: v for k, v in keep2.items()}

    if cfg["iterate"] and rows["kl"]["macs_reduction"] < TARGET_MACS:
        first = smalls["kl"]
        kl2, keep2 = kl_again(first, None)
        out("\nPFA KL on the fine-tuned KL model (second iteration):")
        out(PFA.show(kl2, include_columns=cols).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        smalls["kl_x2"], rows["kl_x2"] = _run_recipe("kl_x2", base, first, keep2, data, cfg, seed, out, out_dir)

    if cfg["round_to"]:
        from moco.compress.pfa import check_round_to, partial_keep

        block = check_round_to(cfg["round_to"])
        name = f"kl_r{block}"
        keep = partial_keep(recipe_sets["kl"], pfa, 1.0, PFA.UnitSelectionStrategy.AbsMax(), round_to=block)
        out(f"\nKL with kept counts rounded to multiples of {block} (this CPU's ONNX Runtime channel block): "
            f"{ {responses[k]: len(v) for k, v in keep.items()} }")
        smalls[name], rows[name] = _run_recipe(name, base, base, {responses[k]: v for k, v in keep.items()}, data,
                                               cfg, seed, out, out_dir)
        if cfg["iterate"] and rows[name]["macs_reduction"] < TARGET_MACS:
            _, keep2 = kl_again(smalls[name], block)
            smalls[name + "_x2"], rows[name + "_x2"] = _run_recipe(name + "_x2", base, smalls[name], keep2, data, cfg,
                                                                   seed, out, out_dir)

    meeting = {k: r for k, r in rows.items() if r["accuracy_drop_points"] <= TARGET_DROP_POINTS}
    if meeting:
        best = max(meeting, key=lambda k: rows[k]["macs_reduction"])
    else:
        best = min(rows, key=lambda k: rows[k]["accuracy_drop_points"])
    b = rows[best]
    summary = {k: {kk: r[kk] for kk in ("macs_reduction", "params_reduction", "accuracy_pruned",
                                        "accuracy_drop_points", "ratio_vs_eager")} for k, r in rows.items()}
    import pandas as pd

    out(f"\nsummary (test accuracy of the base {b['accuracy_base']:.2%}; fine-tune: {cfg['finetune_epochs']} extra "
        f"epoch(s) the base did not get):")
    out(pd.DataFrame.from_dict(summary, orient="index").to_string(float_format=lambda v: f"{v:.4f}"))
    met = b["macs_reduction"] >= TARGET_MACS and b["accuracy_drop_points"] <= TARGET_DROP_POINTS
    out(f"best within {TARGET_DROP_POINTS} points: {best if meeting else 'none (smallest drop: ' + best + ')'}; "
        f"{b['macs_reduction']:.2f}x fewer MACs, {b['params_reduction']:.2f}x fewer params, "
        f"{b['accuracy_drop_points']:+.2f} points, {1 / b['ratio_vs_eager']:.2f}x faster than eager; "
        f"target (>= {TARGET_MACS:g}x MACs at <= {TARGET_DROP_POINTS} points): {'met' if met else 'MISSED'}")
    if chart is not None:
        out(f"chart: {chart}; table: {out_dir / 'recipes.csv'}")

    # deployed: the chosen small model in ONNX Runtime, FP32 and int8 (calibrated on 1,000 training images),
    # against the original's honest baselines, side by side at batch 1000
    from moco.bench.baselines import compare_deployed, stage_table

    timing_batches = list(x_te[: cfg["timing_samples"]].split(BATCH_SIZE))
    dep, cmp_dep = compare_deployed(base, smalls[best], timing_batches, (x_te, y_te), int8=x_tr[order[:1000]],
                                    repeats=cfg["repeats"], max_drop_points=TARGET_DROP_POINTS, prefix=best)
    out(f"\n[{best}] deployed vs the original's baselines (batch {BATCH_SIZE}, {dep['threads']} thread(s)):")
    out(cmp_dep.to_text())
    out("stage by stage (ratio = median time / the original in ONNX Runtime FP32, same run):")
    out(stage_table(dep["stages"]))
    out(f"deployed ({dep['deployed_precision']}): {dep['deployed_ratio_vs_best_baseline']:.3f} of the best baseline "
        f"({dep['best_baseline']}); FP32 {dep['deployed']['fp32']['ratio_vs_best_baseline']:.3f}"
        + (f", int8 {dep['deployed']['int8']['ratio_vs_best_baseline']:.3f} "
           f"(accuracy {dep['deployed']['int8']['accuracy_test']:.4f})" if "int8" in dep["deployed"] else ""))
    return {
        **{k: v for k, v in dep.items() if k.startswith("deployed_")},
        "deployed": dep["deployed"],
        "stages": dep["stages"],
        "threads": dep["threads"],
        "export": dep["export"],
        "comparison_deployed": dep["comparison"],
        "macs_reduction": b["macs_reduction"],
        "params_reduction": b["params_reduction"],
        "accuracy_base": b["accuracy_base"],
        "accuracy_pruned": b["accuracy_pruned"],
        "ratio_vs_eager": b["ratio_vs_eager"],
        "accuracy_drop_points": b["accuracy_drop_points"],
        "ratio_vs_best_baseline": b["ratio_vs_best_baseline"],
        "best_baseline": b["best_baseline"],
        "best_recipe": best,
        "target_met": met,
        "recipes": rows,
        "recommended_counts": {k: {layer: r.recommended_count for layer, r in v.items()} for k, v in recipe_sets.items()},
        "size_fraction": fraction,
        "failed_responses": dict(pfa.failed_responses),
        "n_introspect": len(x_intro),
        "n_finetune": len(data["finetune"][0]),
        "finetune_epochs": cfg["finetune_epochs"],
        "base_recipe": meta.get("recipe"),
        "introspect_seconds": intro_s,
        "total_seconds": time.perf_counter() - t_start,
        "chart": str(chart) if chart else None,
    }
