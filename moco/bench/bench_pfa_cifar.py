"""Benchmark ``pfa-cifar``: seed 001's own setup, PFA on MobileNet and CIFAR-10, taken to a smaller model.

1. the base: moco's ``mobilenet_v1`` with **width multiplier 0.25** (8..256 channels, 3.3 M MACs per
   32x32 image; the multiplier makes it train on 2 shared CPU cores in well under an hour),
   ``pretrained("mobilenet_v1", "cifar10", model_kwargs={"width_multiplier": 0.25})``: 15 epochs of
   Adam (lr 2e-3 cosine-annealed, batch 128, no augmentation; about 8 minutes on 2 cores) on the 50,000
   training images read from the CIFAR-10 binary batches, cached under ``cache_dir()/models``;
2. as the seed: every ``Conv2d`` but the classifier is analysed (``conv1`` = ``stem.0``,
   ``conv_dw_i`` / ``conv_pw_i`` = ``features.{i-1}.depthwise.0`` / ``.pointwise.0``), spatially
   max-pooled, over 2,000 images, through the seed notebook's own calls: a DNIKit-style producer
   (:meth:`PFA.producer`, read after each conv's BatchNorm and ReLU) and
   ``PFA.introspect(producer, batch_size=500)``;
3. recipes KL and Energy(0.8) / Energy(0.99) (``min_kept_count=3``), each with AbsMax and L1Max unit
   selection: the ``PFA.show`` table (printed in full, and as CSV) and chart (PNG) under ``out_dir``,
   and the per-layer counts next to the seed's observation that late pointwise layers (``conv_pw_11``)
   compress most;
4. surgery of the KL recipe (L1Max, DNIKit's default): a depthwise conv keeps the channels of the
   pointwise conv feeding it, so the recipe of each dependency group's first conv is applied
   (:func:`moco.compress.pfa.leader_recipes`); fine-tuning (Adam, lr 1e-3 cosine, batch 128, distilled
   from the base) and the side-by-side report (:func:`moco.compress.report.compare_models`: params, MACs, test accuracy;
   original eager / channels-last / ONNX Runtime against the small model);
5. the KL recipe with its kept counts rounded to this CPU's ONNX Runtime channel block (``round_to="auto"``:
   8 on AVX2, 16 on AVX-512 -- ``kl_r<block>``; ONNX Runtime runs odd widths on slower kernels,
   :func:`moco.compress.pfa.partial_keep`);
6. a second KL iteration on the fine-tuned model, as the PFA paper does (``kl_x2``), applied to it
   and fine-tuned again, also in part: each layer gives up 0.25 / 0.5 of the units the second recipe
   removes (``kl_x2_f0.25``, ``kl_x2_f0.5``).

The JSON has the keys of ``pfa-fashion`` (headline ``macs_reduction``, ``params_reduction``,
``accuracy_base``, ``accuracy_pruned``, ``ratio_vs_eager`` of the recipe with the most MACs reduction
within 1 point of the base, else the one with the smallest drop) plus ``layer_counts`` (seed names).
Target: >= 2x fewer MACs at <= 1 point of test accuracy lost. The fine-tune is training the base did
not get (stated in the output).

Full run: 2,000 images for PFA, 6 fine-tune epochs on all 50,000 training images per applied recipe,
2,000 test images per timing run, 5 repeats. ``--quick``: the quick base (1 epoch on 10,000 images),
600 images for PFA, one fine-tune epoch on 2,000 images, 500 images per timing run, 3 repeats, no
rounded recipe and no second iteration. A full run applies six recipes (about 20 minutes each on 2
AVX2 cores: 6 distilled epochs of 50,000 images).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from moco.bench.registry import register

__all__ = ["SETTINGS", "TARGET_DROP_POINTS", "TARGET_MACS", "WIDTH", "bench_pfa_cifar", "seed_names"]

WIDTH = 0.25
TARGET_MACS = 2.0
TARGET_DROP_POINTS = 1.0

SETTINGS = {
    # 6 distilled fine-tune epochs: 1 plain epoch left the KL model 16 points below the base (surgery alone
    # takes it to chance: 27 layers each lose a third of their units); on the 15-epoch base, 6 epochs
    # distilled from the base bring it to 62.82 % against the base's 63.20 % (full run, 2026-12-02, Zen 5);
    # the same code and seed on an AVX2 machine gave a base of 64.07 % and KL 61.83 % (-2.24 points): the
    # fine-tuned accuracy varies by ~2 points with the machine's arithmetic, as much as the target's budget
    False: dict(n_introspect=2000, n_finetune=None, finetune_epochs=6, distill=True, timing_samples=2000, repeats=5,
                iterate=True, second_fractions=(0.25, 0.5), round_to="auto"),
    True: dict(n_introspect=600, n_finetune=2_000, finetune_epochs=1, distill=True, timing_samples=500, repeats=3,
               iterate=False, second_fractions=(), round_to=None),
}


def seed_names(model: nn.Module) -> dict[str, str]:
    """``{module name: the seed's Keras layer name}`` for moco's MobileNet v1 (``conv1``, ``conv_dw_i``, ``conv_pw_i``)."""
    names = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if name == "stem.0":
            names[name] = "conv1"
        elif name.startswith("features."):
            block, kind = name.split(".")[1:3]
            names[name] = f"conv_{'dw' if kind == 'depthwise' else 'pw'}_{int(block) + 1}"
    return names


def _conv_layers(model: nn.Module) -> list[str]:
    """Every Conv2d but the classifier's (the seed's ``conv2d_responses``, 'preds' excluded)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "preds" not in name]


@register("pfa-cifar", "seed 001 on its own setup: PFA (KL, Energy 0.8/0.99; AbsMax, L1Max) on MobileNet v1 "
                       "(width 0.25) on CIFAR-10, surgery + fine-tune of KL twice, measured side by side")
def bench_pfa_cifar(quick: bool, seed: int, out=print, *, out_dir: str | Path = "moco-out/pfa-cifar",
                    n_introspect: int | None = None, n_finetune: int | None = None,
                    finetune_epochs: int | None = None, repeats: int | None = None) -> dict:
    """Seed 001's notebook on the trained MobileNet, then surgery + fine-tuning of its KL recipe (twice).

    The keyword arguments override the sizes (smoke runs). Returns the JSON-able result dict.
    """
    import pandas as pd

    from moco.bench.bench_pfa_fashion import _run_recipe, _widths  # the same surgery + fine-tune + report step
    from moco.compress.pfa import PFA, check_round_to, leader_recipes, partial_keep
    from moco.data import load_cifar10
    from moco.train import pretrained

    cfg = dict(SETTINGS[quick])
    for key, value in (("n_introspect", n_introspect), ("n_finetune", n_finetune),
                       ("finetune_epochs", finetune_epochs), ("repeats", repeats)):
        if value is not None:
            cfg[key] = value
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    base, meta = pretrained("mobilenet_v1", "cifar10", seed=seed, quick=quick, progress=False,
                            model_kwargs={"width_multiplier": WIDTH})
    base.eval()
    x_tr, y_tr = load_cifar10(train=True).tensors()
    x_te, y_te = load_cifar10(train=False).tensors()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_tr), generator=gen)
    images = x_tr[order[: cfg["n_introspect"]]]
    ft_idx = order if cfg["n_finetune"] is None else order[: cfg["n_finetune"]]
    data = {"finetune": (x_tr[ft_idx], y_tr[ft_idx]), "test": (x_te, y_te)}
    names = seed_names(base)
    out(f"base: mobilenet_v1, width multiplier {WIDTH} (widths {sorted(set(_widths(base).values()))}), CIFAR-10 "
        f"({meta.get('data_source')}), recipe {meta.get('recipe')}; test accuracy {meta['accuracy_test']:.2%}")

    # ---- seed 001, cells [4]-[12]: the conv responses, the producer, introspection, recipes, tables
    conv2d_responses = _conv_layers(base)
    producer = PFA.producer(images, model=base, layers=conv2d_responses)  # moco's stand-in for DNIKit's pipeline
    t0 = time.perf_counter()
    pfa = PFA.introspect(producer, batch_size=500)
    intro_s = time.perf_counter() - t0
    out(f"PFA introspection: {len(conv2d_responses)} conv layers, max-pooled after BatchNorm + ReLU, over "
        f"{len(images):,} training images in {intro_s:.1f} s; failed: {list(pfa.failed_responses) or 'none'}")
    recipe_sets = {}
    for unit_name, unit in (("absmax", PFA.UnitSelectionStrategy.AbsMax()), ("l1max", PFA.UnitSelectionStrategy.L1Max())):
        recipe_sets[f"kl_{unit_name}"] = pfa.get_recipe(strategy=PFA.Strategy.KL(), unit_strategy=unit)
        for energy in (0.8, 0.99):
            recipe_sets[f"energy_{energy:g}_{unit_name}"] = pfa.get_recipe(
                strategy=PFA.Strategy.Energy(energy_threshold=energy, min_kept_count=3), unit_strategy=unit)
    PFA.show(recipe_sets, include_columns=[], path=out_dir / "recipes.csv")
    counts = pd.DataFrame({"layer": [names.get(n, n) for n in conv2d_responses], "module": conv2d_responses,
                           "original": [pfa.statistics[n].units for n in conv2d_responses]})
    for key in ("kl_l1max", "energy_0.8_l1max", "energy_0.99_l1max"):
        counts[key.replace("_l1max", "")] = [recipe_sets[key][n].recommended_count for n in conv2d_responses]
    counts["kl_ratio"] = counts["kl"] / counts["original"]
    same_units = sum(recipe_sets["kl_absmax"][n].units_to_keep == recipe_sets["kl_l1max"][n].units_to_keep
                     for n in conv2d_responses)
    out("\nPFA recommended counts per layer (seed names; KL, Energy 0.8 / 0.99 with min_kept_count=3):")
    out(counts.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    pointwise = counts[counts["layer"].str.startswith("conv_pw")]
    most = pointwise.sort_values("kl_ratio").head(3)
    out(f"most compressed pointwise layers under KL: "
        + ", ".join(f"{r.layer} ({r.kl}/{r.original}, {r.kl_ratio:.0%})" for r in most.itertuples())
        + f"; the seed saw conv_pw_11 compress most (here conv_pw_11 keeps "
        f"{float(counts.loc[counts['layer'] == 'conv_pw_11', 'kl_ratio'].iloc[0]):.0%}); AbsMax and L1Max keep the "
        f"same units in {same_units} of {len(conv2d_responses)} layers")
    chart = out_dir / "recipes.png"
    try:
        PFA.show({"kl": recipe_sets["kl_l1max"], "energy 0.8": recipe_sets["energy_0.8_l1max"],
                  "energy 0.99": recipe_sets["energy_0.99_l1max"]}, vis_type=PFA.VisType.CHART, path=chart)
    except Exception as exc:  # noqa: BLE001 - the chart is a by-product; say why it is missing
        out(f"(no chart: {type(exc).__name__}: {exc})")
        chart = None

    # ---- surgery of KL (and a second iteration), fine-tune, measure
    example = x_te[:1]
    applied, dropped = leader_recipes(recipe_sets["kl_l1max"], base, example)
    out(f"\nKL applied to the first conv of each dependency group ({len(applied)} convs); "
        f"{len(dropped)} follow (depthwise convs keep their input's channels)")
    rows: dict[str, dict] = {}
    first, rows["kl"] = _run_recipe("kl", base, base, PFA.keep(applied), data, cfg, seed, out, out_dir)
    if cfg["round_to"]:
        # the same recipe with every kept count rounded to this CPU's ONNX Runtime channel block ("auto": 8 on
        # AVX2, 16 on AVX-512): ONNX Runtime runs the odd widths PFA gives on slower kernels
        # (moco.compress.pfa.partial_keep)
        block = check_round_to(cfg["round_to"])
        keep = partial_keep(applied, pfa, 1.0, PFA.UnitSelectionStrategy.L1Max(), round_to=block)
        out(f"\nKL with kept counts rounded to multiples of {block}: "
            + ", ".join(f"{names.get(n, n)} {len(keep[n])} (KL {r.recommended_count})" for n, r in applied.items()))
        _, rows[f"kl_r{block}"] = _run_recipe(f"kl_r{block}", base, base, keep, data, cfg, seed, out, out_dir)
    if cfg["iterate"]:
        again = PFA.introspect(PFA.producer(images, model=first, layers=_conv_layers(first)), batch_size=500)
        kl2 = again.get_recipe(strategy=PFA.Strategy.KL(), unit_strategy=PFA.UnitSelectionStrategy.L1Max())
        applied2, _ = leader_recipes(kl2, first, example)
        out("\nsecond KL iteration on the fine-tuned KL model: "
            + ", ".join(f"{names.get(n, n)} {r.recommended_count}/{r.original_count}" for n, r in applied2.items()))
        # the second step also in part (as PFALoop steps): each layer gives up `fraction` of the units
        # the second KL recipe would remove, chosen by L1Max on the fine-tuned model's covariances
        for fraction in cfg["second_fractions"]:
            keep2 = partial_keep(applied2, again, fraction, PFA.UnitSelectionStrategy.L1Max())
            out(f"\nsecond KL iteration at {fraction:g} of its reduction: "
                + ", ".join(f"{names.get(n, n)} {len(v)}/{applied2[n].original_count}" for n, v in keep2.items()))
            _, rows[f"kl_x2_f{fraction:g}"] = _run_recipe(f"kl_x2_f{fraction:g}", base, first, keep2, data, cfg,
                                                         seed, out, out_dir)
        _, rows["kl_x2"] = _run_recipe("kl_x2", base, first, PFA.keep(applied2), data, cfg, seed, out, out_dir)

    meeting = {k: r for k, r in rows.items() if r["accuracy_drop_points"] <= TARGET_DROP_POINTS}
    best = max(meeting, key=lambda k: rows[k]["macs_reduction"]) if meeting else min(
        rows, key=lambda k: rows[k]["accuracy_drop_points"])
    b = rows[best]
    summary = {k: {kk: r[kk] for kk in ("macs_reduction", "params_reduction", "accuracy_pruned",
                                        "accuracy_drop_points", "ratio_vs_eager")} for k, r in rows.items()}
    out(f"\nsummary (test accuracy of the base {b['accuracy_base']:.2%}; fine-tune: {cfg['finetune_epochs']} extra "
        f"epoch(s) per applied recipe that the base did not get):")
    out(pd.DataFrame.from_dict(summary, orient="index").to_string(float_format=lambda v: f"{v:.4f}"))
    met = b["macs_reduction"] >= TARGET_MACS and b["accuracy_drop_points"] <= TARGET_DROP_POINTS
    out(f"best within {TARGET_DROP_POINTS:g} point: {best if meeting else 'none (smallest drop: ' + best + ')'}; "
        f"{b['macs_reduction']:.2f}x fewer MACs, {b['params_reduction']:.2f}x fewer params, "
        f"{b['accuracy_drop_points']:+.2f} points, {1 / b['ratio_vs_eager']:.2f}x faster than eager; "
        f"target (>= {TARGET_MACS:g}x MACs at <= {TARGET_DROP_POINTS:g} point): {'met' if met else 'MISSED'}")
    if chart is not None:
        out(f"chart: {chart}; table: {out_dir / 'recipes.csv'}")
    return {
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
        "recommended_counts": {k: {names.get(n, n): r.recommended_count for n, r in v.items()}
                               for k, v in recipe_sets.items()},
        "layer_counts": counts.to_dict(orient="records"),
        "size_fraction": None,
        "failed_responses": list(pfa.failed_responses),
        "n_introspect": len(images),
        "n_finetune": len(data["finetune"][0]),
        "finetune_epochs": cfg["finetune_epochs"],
        "base_recipe": meta.get("recipe"),
        "width_multiplier": WIDTH,
        "introspect_seconds": intro_s,
        "total_seconds": time.perf_counter() - t_start,
        "chart": str(chart) if chart else None,
    }
