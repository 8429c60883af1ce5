"""Benchmark ``approx-lenet``: seed 002's approximate-computing workflow on LeNet5 / MNIST.

1. FP32 baseline: ``moco.train.pretrained("lenet5", "mnist")`` (cached; 3 epochs of Adam);
2. 8-bit QAT, 1 epoch (:func:`moco.approx.train_quant`);
3. noise-tolerance search, 3 epochs, ``lmbd=0.2, initial_noise=0.025, sigma_max=0.5`` (seed defaults);
4. per-layer selection from :func:`moco.approx.library` (exact, truncated, broken-array, DRUM,
   Mitchell; energies from the gate-count model of :mod:`moco.approx.multipliers`);
5. deployment as bit-exact LUT layers and approximate retraining, 2 epochs (Adam, lr 5e-4);
6. the uniform comparison: the library multiplier whose energy is closest to the heterogeneous
   result, in every layer, retrained the same way.

Accuracies are on the 10,000 MNIST test images. ``energy_ratio`` is the op-weighted multiplier
energy relative to the exact 8-bit multiplier. ``lut_slowdown_vs_int8``: median time of training
steps (forward, backward, Adam step; batch 128, 8 batches per run) of the deployed approximate model
over the fake-quant int8 model, measured side by side (interleaved) with
:func:`moco.bench.harness.compare`; ``lut_slowdown_epoch`` is the same ratio from the whole
retraining and QAT epochs (not interleaved; noisier under load). There is no ONNX Runtime bar here:
the approximate multipliers exist only in simulation, and what is measured is accuracy and the
modelled energy, not speed.

Writes under ``out_dir`` (default ``moco-out/approx-lenet``): ``selection.png`` (seed 002's two bar
charts), ``multipliers.csv`` (error statistics, energy model and published figures per multiplier)
and ``error_map_<name>.png`` for each selected multiplier.

``--quick``: a pretrained model from one epoch on 10,000 images, 6,000 training images, one epoch
per stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moco.bench.registry import register

__all__ = ["STEP_BATCH", "STEP_BATCHES", "bench_approx_lenet"]

STEP_BATCH = 128
STEP_BATCHES = 8


def _step_timer(model, x, y, lr: float):
    """A callable ``fn(idx)`` running one training step of a copy of ``model`` on ``x[idx], y[idx]``."""
    import copy

    import torch.nn.functional as F

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)

    def fn(idx):
        with torch.inference_mode(False), torch.enable_grad():
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    return fn


@register("approx-lenet", "seed 002: int8 QAT, noise search, per-layer approximate multipliers and approximate "
                          "retraining of LeNet5 on MNIST, against one multiplier everywhere")
def bench_approx_lenet(quick: bool, seed: int, out=print, *, out_dir: str | Path = "moco-out/approx-lenet") -> dict:
    from moco.approx import multipliers as M
    from moco.approx.workflow import run_approx
    from moco.bench.harness import compare
    from moco.data import load_mnist
    from moco.io import write_bytes_atomic
    from moco.train import pretrained

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = pretrained("lenet5", "mnist", seed=seed, quick=quick, progress=False)
    x_train, y_train = load_mnist(train=True).tensors()
    test = load_mnist(train=False).tensors()
    if quick:
        x_train, y_train = x_train[:6000], y_train[:6000]
    config = {"seed": seed, "progress": False}
    if quick:
        config.update(gradient_epochs=1, approx_epochs=1)
    result = run_approx(model, (x_train, y_train), test, config, log=out)

    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(x_train), (STEP_BATCH,), generator=gen) for _ in range(STEP_BATCHES)]
    timing = compare({"int8": _step_timer(result.quant_model, x_train, y_train, 5e-4),
                      "approx": _step_timer(result.approx_model, x_train, y_train, 5e-4)},
                     batches, warmup=1, repeats=3 if quick else 7)
    slowdown = timing.ratio("approx")
    slowdown_epoch = result.epoch_seconds["approx"] / result.epoch_seconds["quant"]

    lib = M.library()
    table = M.error_table(lib).join(M.energy_table(lib).drop(columns=["relative_energy"]))
    write_bytes_atomic(out_dir / "multipliers.csv", table.to_csv().encode())
    result.selection.plot(out_dir / "selection.png")
    by_name = {m.name: m for m in lib}
    for name in sorted(set(result.selected.values()) | {result.uniform_multiplier}):
        M.plot_error_map(by_name[name], out_dir / f"error_map_{name}.png")

    out("")
    out(result.to_text())
    out("")
    repeats = len(timing.timing("approx").times)
    out(f"training step, approximate LUT layers vs fake-quant int8 (median of {repeats} interleaved runs of "
        f"{STEP_BATCHES} steps): {slowdown:.2f}x; whole epochs: {slowdown_epoch:.2f}x")
    loss_pts = 100 * (result.accuracy_base - result.accuracy_approx)
    out(f"energy_ratio {result.energy_ratio:.3f} (target <= 0.35) at {loss_pts:+.2f} points vs FP32 "
        f"(target <= 0.3); lut_slowdown_vs_int8 {slowdown:.2f} (target <= 5)")
    out(f"wrote {out_dir / 'selection.png'}, {out_dir / 'multipliers.csv'}")
    d = result.to_dict()
    return {
        "accuracy_base": result.accuracy_base,
        "accuracy_quant": result.accuracy_quant,
        "accuracy_noise": result.accuracy_noise,
        "accuracy_deployed": result.accuracy_deployed,
        "accuracy_approx": result.accuracy_approx,
        "accuracy_uniform": result.accuracy_uniform,
        "accuracy_loss_points": loss_pts,
        "energy_ratio": result.energy_ratio,
        "energy_ratio_uniform": result.energy_ratio_uniform,
        "uniform_multiplier": result.uniform_multiplier,
        "sigma": d["sigma"],
        "sigma_history": [h["sigma"] for h in d["search"]["history"]],
        "selected": d["selected"],
        "selection": d["selection"]["layers"],
        "lut_slowdown_vs_int8": slowdown,
        "lut_slowdown_epoch": slowdown_epoch,
        "step_timing": timing.to_dict(),
        "seconds": d["seconds"],
        "base_checkpoint": meta.get("checkpoint"),
        "targets_met": {"energy_ratio": result.energy_ratio <= 0.35, "accuracy_loss": loss_pts <= 0.3,
                        "lut_slowdown": slowdown <= 5},
        "n_train": len(x_train),
        "config": d["config"],
    }
