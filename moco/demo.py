"""``moco demo``: the main job end to end on an embedded default.

Today it trains the seed CNN (on MNIST when found, else scikit-learn's bundled digits), profiles it,
names the bottleneck and shows where the later stages plug in. Each capability adds its step here.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from moco.errors import MocoError

__all__ = ["PIPELINE", "run_demo"]

# The user's path through moco; a stage marked available=False is announced but not yet run.
PIPELINE = (
    ("profile", "moco.profile", "MACs, FLOPs, params, latency per module; the bottleneck", True),
    ("capture + rules", "moco.rules", "rule-based early exit before the bottleneck (seed 000)", True),
    ("exits", "moco.exits", "learned early-exit heads with calibrated thresholds (seed 004)", True),
    ("compress", "moco.compress", "PFA and L1 filter pruning to a smaller dense model (seeds 001, 003)", True),
    ("approx", "moco.approx", "quantization and approximate multipliers (seed 002)", False),
    ("verify", "moco.bench", "side-by-side timing against eager, channels_last, torch.compile, ONNX Runtime", True),
)


def _choose_data(dataset: str, root, train_size: int, seed: int):
    from moco.data import available_datasets, load_digits, load_mnist, resolve_root

    if dataset == "auto":
        found = "mnist" in available_datasets(root)
        dataset = "mnist" if found else "digits"
        if not found:
            print(f"no MNIST under {resolve_root(root)} (set MOCO_DATA to use it); using the embedded default")
    if dataset == "mnist":
        train, test = load_mnist(root, train=True), load_mnist(root, train=False)
        if train_size < len(train):
            gen = torch.Generator().manual_seed(seed)
            train = train.subset(torch.randperm(len(train), generator=gen)[:train_size].tolist())
        return train, test
    return load_digits(train=True), load_digits(train=False)


def run_demo(
    *,
    dataset: str = "auto",
    root: str | Path | None = None,
    train_size: int = 12_000,
    epochs: int | None = None,
    out: str | Path = "moco-out",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the demo and return its report (also written to ``out/report.json``).

    ``dataset`` is ``"auto"`` (MNIST if found, else digits), ``"mnist"`` or ``"digits"``;
    ``train_size`` caps the MNIST training images so the demo stays quick on 2 cores.
    """
    from moco import __version__
    from moco.io import write_json_atomic
    from moco.models import create
    from moco.profile import profile
    from moco.train import evaluate, fit, save_checkpoint

    if train_size < 1:
        raise MocoError(f"train_size must be >= 1, got {train_size}")
    t0 = time.perf_counter()
    out = Path(out)
    train, test = _choose_data(dataset, root, train_size, seed)
    print(f"data: {train.name} from {train.source}: {len(train):,} training / {len(test):,} test images")
    epochs = epochs if epochs is not None else (1 if train.name == "mnist" else 8)

    print(f"\n[1] train seed_cnn (seed 000's MNIST CNN), {epochs} epoch(s), seed {seed}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create("seed_cnn")
    history = fit(model, train.tensors(), epochs=epochs, batch_size=64 if train.name == "digits" else 128,
                  seed=seed, progress=progress)
    acc = evaluate(model, test.tensors())
    print(f"test accuracy {acc.accuracy:.4f} on {acc.n:,} images ({history.seconds:.1f} s training)")
    ckpt = save_checkpoint(model, out / "seed_cnn.pt", arch={"name": "seed_cnn", "kwargs": {}},
                           meta={"dataset": train.name, "accuracy_test": acc.accuracy, "seed": seed})
    print(f"checkpoint: {ckpt}")

    print("\n[2] profile (batch 1)")
    model.eval()
    prof = profile(model, test.tensors()[0][:1], repeats=20)
    print(prof.to_text())
    bottleneck = next(r for r in prof.rows if r.name == prof.bottleneck)
    macs_share = bottleneck.macs / max(prof.totals.macs, 1)
    print(f"bottleneck: module {prof.bottleneck!r} ({bottleneck.type}) holds {macs_share:.0%} of the MACs "
          f"and {bottleneck.latency_share:.0%} of the measured time")
    chart = prof.plot(out / "profile.png")
    print(f"chart: {chart}")

    rules_report = _rule_step(model, train, test, seed=seed, progress=progress)

    print("\n[4] where the next stages plug in")
    for i, (stage, module, what, available) in enumerate(PIPELINE, 1):
        mark = "ready" if available else "coming"
        print(f"  {i}. {stage:16s} {module:14s} [{mark:6s}] {what}")
    print("  measure against the honest baselines with: moco bench baselines --quick; moco bench rules-mnist --quick; "
          "moco bench exits-mnist-retrofit --quick; moco bench prune-fashion --quick")

    report = {
        "dataset": train.name,
        "data_source": train.source,
        "n_train": len(train),
        "n_test": len(test),
        "epochs": epochs,
        "seed": seed,
        "accuracy_test": acc.accuracy,
        "checkpoint": str(ckpt),
        "chart": str(chart),
        "bottleneck": prof.bottleneck,
        "rules": rules_report,
        "profile": prof.to_dict(),
        "versions": {"moco": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }
    path = write_json_atomic(out / "report.json", report)
    print(f"\nreport: {path} ({report['seconds']:.0f} s)")
    return report


def _rule_step(model, train, test, *, seed: int, progress: bool) -> dict:
    """Seed 000 on the demo data: capture layer 2, fit a certified RuleSet, run the BranchedNetwork."""
    from moco.bench.harness import compare
    from moco.capture import build_embeddings_and_predictions
    from moco.rules import AnalyticsEngine
    from moco.rules.branched import BranchedNetwork

    layer = 2
    # a small held-out split can only certify a looser error rate: 3% on digits, 0.5% on 12,000 MNIST images
    max_error = 0.005 if len(train) >= 10_000 else 0.03
    print(f"\n[3] rule-based early exit at layer {layer} (after the first ReLU, before the bottleneck)")
    x_train = train.tensors()[0]
    feats, preds = build_embeddings_and_predictions(model, x_train, layer, progress=progress)
    ae = AnalyticsEngine(feats.reshape(len(feats), -1), {"predictions": preds.argmax(1)}, layer=layer, seed=seed,
                         progress=progress)
    rules, out = ae.compute_linear_sufficient_rules("predictions", max_error=max_error)
    cert = out["certified_precision"]
    print(f"fitted rules for {len(rules.rule_classes)} classes on {len(x_train):,} images in {out['fit_seconds']:.1f} s: "
          f"held-out coverage {out['coverage_val']:.1%}, precision {out['precision_val'] or 0:.4f}"
          + (f", certified >= {cert:.4f} (95%)" if cert is not None else ", nothing certified"))
    net = BranchedNetwork(model, layer=layer, rule=rules)
    x_test = test.tensors()[0]
    with torch.inference_mode():
        full = model(x_test).argmax(1)
        pred, mask = net(x_test)
    agreement = float((pred.argmax(1) == full).float().mean())
    print(f"on {len(x_test):,} test images: {mask.float().mean():.1%} exit early, agreement with the model {agreement:.4f}")
    batches = list(x_test.split(500))
    cmp = compare({"eager": model, "branched": net}, batches, warmup=1, repeats=3)
    print(f"time ratio branched / eager: {cmp.ratio('branched'):.2f}x (median of 3 interleaved runs)")
    return {"layer": layer, "max_error": max_error, "coverage_test": float(mask.float().mean()),
            "agreement_test": agreement, "ratio_vs_eager": cmp.ratio("branched"), "fit": out}
