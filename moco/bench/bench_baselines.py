"""Benchmark ``baselines``: how much faster the standard tricks run the seed CNN on MNIST.

The trained seed CNN (``moco.train.pretrained``) runs on the MNIST training images in batches of 1000
as eager PyTorch, channels-last, ``torch.compile`` and onnxruntime; each variant is first checked to
give eager's predictions on the MNIST test images, then all are timed interleaved
(:func:`moco.bench.compare`). The ratios (median time / eager's) are the bar any moco method has to
beat. Full run: 60,000 images, 1 warm-up + 7 timed runs per variant, agreement on the 10,000 test
images; ``--quick``: 10,000 images, 3 timed runs, agreement on 2,000 test images.
"""

from __future__ import annotations

from moco.bench.registry import register

__all__ = ["BATCH_SIZE", "bench_baselines"]

BATCH_SIZE = 1000


@register("baselines", "seed CNN on MNIST: the four baselines on 60,000 images at batch 1000, ratio of each to eager")
def bench_baselines(quick: bool, seed: int, out=print) -> dict:
    """Time eager / channels_last / compile / onnxruntime on the trained seed CNN; returns ratios to eager."""
    from moco.bench.baselines import BASELINE_NAMES, baseline_variants, best_baseline
    from moco.bench.harness import compare
    from moco.data import load_mnist
    from moco.train import pretrained

    n_images, repeats, n_check = (10_000, 3, 2_000) if quick else (60_000, 7, 10_000)
    model, meta = pretrained(name="seed_cnn", dataset="mnist", seed=seed, quick=quick)
    x_train, _ = load_mnist(train=True).tensors()
    x_test, _ = load_mnist(train=False).tensors()
    batches = list(x_train[:n_images].split(BATCH_SIZE))
    check = list(x_test[:n_check].split(BATCH_SIZE))
    n_images = sum(len(b) for b in batches)

    out(f"seed CNN on MNIST ({meta.get('data_source', '?')}), test accuracy {meta['accuracy_test']:.2%}; "
        f"{n_images:,} images in batches of {BATCH_SIZE}")
    base = baseline_variants(model, batches[0], check_inputs=check)
    out(f"agreement with eager on {sum(len(b) for b in check):,} test images:")
    out(base.to_text())
    comparison = compare(base.variants, batches, warmup=1, repeats=repeats)
    out(comparison.to_text())

    def ratio(name: str) -> float | None:
        return comparison.ratio(name) if name in comparison.names else None

    best = best_baseline(comparison, BASELINE_NAMES)
    out(f"best baseline: {best} ({comparison.ratio(best):.2f}x eager)")
    return {
        "ratio_compile": ratio("compile"),
        "ratio_channels_last": ratio("channels_last"),
        "ratio_onnxruntime": ratio("onnxruntime"),
        "best_baseline": best,
        "ratio_best": comparison.ratio(best),
        "n_images": n_images,
        "batch_size": BATCH_SIZE,
        "accuracy_test": meta["accuracy_test"],
        "data_source": meta.get("data_source"),
        "checkpoint": meta.get("checkpoint"),
        "comparison": comparison.to_dict(),
        "agreement": {name: a.to_dict() for name, a in base.agreement.items()},
        "unavailable": dict(base.unavailable),
        "notes": dict(base.notes),
    }
