"""The report's figures, as PNG bytes: Pareto fronts, per-parameter effects, training curves, error grid.

* :func:`pareto_mask` is the non-dominated set of points for any number of objectives and directions
  (``"maximize"``/``"minimize"``): a point is dominated when another is at least as good in every
  objective and better in one; equal points do not dominate each other (both stay on the front).
* :func:`pareto_figure` scatters every complete trial (e.g. test accuracy against MACs) with the front
  marked and labelled by trial number; :func:`effects_figure` is seed 003's box and contour view: per swept
  parameter a box + strip plot of the objective against the parameter's values, and per pair of numeric
  parameters a heatmap of the mean objective; :func:`curves_figure` is train/test accuracy and loss per
  epoch; :func:`error_grid_figure` is seed 003's Facets view of a model's errors: sample images placed by
  true label (columns) and predicted label (rows), correct cells dimmed, off-diagonal cells framed in red
  by their count.

Figures are made with ``matplotlib.figure.Figure`` (no pyplot state, no display needed); randomness (the
strip plot's jitter) comes from the seed given.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["categories", "confusion_counts", "curves_figure", "effects_figure", "error_grid_figure",
           "pareto_figure", "pareto_mask"]

_FRONT = "#d62728"
_POINT = "#1f77b4"


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _figure(width_in: float, height_in: float, dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=dpi)


# ------------------------------------------------------------------------------------------------ Pareto

def pareto_mask(values: Any, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` [n, d] for ``directions`` (d of
    ``"maximize"``/``"minimize"``). Rows with a NaN are never on the front."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    if v.shape[1] != len(directions):
        raise ValueError(f"{v.shape[1]} objective columns but {len(directions)} directions")
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad:
        raise ValueError(f"directions are 'maximize' or 'minimize', got {bad}")
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    q = v * sign  # everything minimised
    ok = ~np.isnan(q).any(axis=1)
    mask = np.zeros(len(q), dtype=bool)
    idx = np.flatnonzero(ok)
    pts = q[idx]
    for k, i in enumerate(idx):
        le = (pts <= pts[k]).all(axis=1)
        lt = (pts < pts[k]).any(axis=1)
        mask[i] = not (le & lt).any()
    return mask


def pareto_figure(x: Sequence[float], y: Sequence[float], labels: Sequence[int], front: Sequence[bool], *,
                  xlabel: str, ylabel: str, title: str, best: int | None = None,
                  x_direction: str = "minimize", y_direction: str = "maximize", x_engineering: bool = False) -> bytes:
    """Scatter of every point with the front (``front`` mask) in red, joined as a staircase and labelled
    ``#N`` by ``labels``; ``best`` (a label) gets a star. Log x when it spans more than 20x; ``x_engineering``
    writes x ticks as 250K, 1.2M (counts such as MACs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    labels, front = np.asarray(labels), np.asarray(front, bool)
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    rest = ~front
    ax.scatter(x[rest], y[rest], s=28, color=_POINT, alpha=0.7, label=f"trials ({int(rest.sum())})")
    ax.scatter(x[front], y[front], s=46, color=_FRONT, zorder=3, label=f"Pareto front ({int(front.sum())})")
    if front.any():
        order = np.argsort(x[front], kind="stable")
        fx, fy = x[front][order], y[front][order]
        ax.step(fx, fy, where="post" if x_direction == "minimize" and y_direction == "maximize" else "pre",
                color=_FRONT, lw=1.2, alpha=0.8)
        for xi, yi, n in zip(fx, fy, labels[front][order]):
            ax.annotate(f"#{n}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8, color=_FRONT)
    if best is not None and (labels == best).any():
        i = int(np.flatnonzero(labels == best)[0])
        ax.scatter([x[i]], [y[i]], marker="*", s=220, facecolor="none", edgecolor="black", lw=1.2, zorder=4,
                   label=f"best (#{best})")
    finite = x[np.isfinite(x)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_xscale("log")
    if x_engineering:
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------- effects

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def categories(values: Sequence[Any], *, max_levels: int = 8, bins: int = 5) -> tuple[list[int], list[str], bool]:
    """Levels of one parameter: ``(code per value, level labels, numeric)``. Numbers with at most
    ``max_levels`` distinct values are levels in numeric order; more are cut into ``bins`` quantile bins
    (labels ``"lo-hi"``); anything else is a level per distinct text."""
    vals = list(values)
    numeric = bool(vals) and all(_is_number(v) for v in vals)
    if numeric:
        arr = np.asarray(vals, float)
        levels = sorted(set(arr.tolist()))
        if len(levels) <= max_levels:
            codes = [levels.index(v) for v in arr.tolist()]
            return codes, [_fmt(v) for v in levels], True
        edges = np.unique(np.quantile(arr, np.linspace(0, 1, bins + 1)))
        codes = np.clip(np.searchsorted(edges, arr, side="right") - 1, 0, len(edges) - 2).tolist()
        labels = [f"{_fmt(edges[i])}-{_fmt(edges[i + 1])}" for i in range(len(edges) - 1)]
        used = sorted(set(codes))
        return [used.index(c) for c in codes], [labels[c] for c in used], True
    texts = [str(v) for v in vals]
    levels = sorted(set(texts))
    return [levels.index(t) for t in texts], levels, False


def _fmt(v: float) -> str:
    v = float(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def effects_figure(params: Mapping[str, Sequence[Any]], objective: Sequence[float], *, objective_name: str,
                   seed: int = 0, max_pairs: int = 12) -> bytes | None:
    """Per parameter a box + strip plot of ``objective`` by the parameter's levels, then for pairs of
    numeric parameters (at most ``max_pairs``) a heatmap of the mean objective. Parameters with one value
    are left out; None when none is left."""
    names = [n for n in params if len(params[n]) == len(objective)]
    if not names or not len(objective):
        return None
    y = np.asarray(objective, float)
    levels = {n: categories(params[n]) for n in names}
    names = [n for n in names if len(levels[n][1]) > 1]   # a parameter held at one value has no effect to show
    if not names:
        return None
    numeric = [n for n in names if levels[n][2]]
    pairs = [(a, b) for i, a in enumerate(numeric) for b in numeric[i + 1:]][:max_pairs]
    ncols = max(1, min(4, max(len(names), len(pairs))))
    rows_box, rows_pair = math.ceil(len(names) / ncols), math.ceil(len(pairs) / ncols)
    fig = _figure(3.6 * ncols, 3.2 * (rows_box + rows_pair))
    gs = fig.add_gridspec(rows_box + rows_pair, ncols)
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        codes, labels, _ = levels[name]
        ax = fig.add_subplot(gs[k // ncols, k % ncols])
        codes = np.asarray(codes)
        groups = [y[codes == c] for c in range(len(labels))]
        ax.boxplot(groups, positions=range(len(labels)), widths=0.5, showfliers=False,
                   medianprops={"color": _FRONT})
        ax.scatter(codes + rng.uniform(-0.15, 0.15, len(codes)), y, s=12, color=_POINT, alpha=0.6, zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 5 else 0, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(objective_name if k % ncols == 0 else "", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    for k, (a, b) in enumerate(pairs):
        ax = fig.add_subplot(gs[rows_box + k // ncols, k % ncols])
        ca, la, _ = levels[a]
        cb, lb, _ = levels[b]
        sums = np.zeros((len(lb), len(la)))
        counts = np.zeros_like(sums)
        np.add.at(sums, (np.asarray(cb), np.asarray(ca)), y)
        np.add.at(counts, (np.asarray(cb), np.asarray(ca)), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts > 0, sums / counts, np.nan)
        im = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis")
        for (r, c), v in np.ndenumerate(mean):
            if np.isfinite(v):
                lo, hi = np.nanmin(mean), np.nanmax(mean)
                light = hi > lo and (v - lo) / (hi - lo) > 0.6
                ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
        ax.set_xticks(range(len(la)), la, fontsize=7, rotation=30 if max(map(len, la)) > 5 else 0)
        ax.set_yticks(range(len(lb)), lb, fontsize=7)
        ax.set_xlabel(a, fontsize=8)
        ax.set_ylabel(b, fontsize=8)
        ax.set_title(f"mean {objective_name}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------------ curves

def curves_figure(history: Sequence[Mapping[str, Any]], *, title: str) -> bytes | None:
    """Accuracy (train, validation, test) and loss (train, test) per epoch; None without any of them."""
    rows = [h for h in history if isinstance(h, Mapping)]
    if not rows:
        return None
    epochs = [h.get("epoch", i) for i, h in enumerate(rows)]

    def series(key):
        pts = [(e, h[key]) for e, h in zip(epochs, rows) if _is_number(h.get(key)) and math.isfinite(h[key])]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None

    acc = {lab: series(k) for lab, k in (("train", "train_accuracy"), ("validation", "val_accuracy"),
                                         ("test", "test_accuracy"))}
    loss_key = "loss" if series("loss") else "train_loss"
    loss = {lab: series(k) for lab, k in (("train", loss_key), ("validation", "val_loss"), ("test", "test_loss"))}
    if not any(acc.values()) and not any(loss.values()):
        return None
    fig = _figure(9.6, 3.6)
    for j, (what, data) in enumerate((("accuracy", acc), ("loss", loss))):
        ax = fig.add_subplot(1, 2, j + 1)
        for (lab, s), color in zip(data.items(), ("#1f77b4", "#2ca02c", "#d62728")):
            if s:
                ax.plot(s[0], s[1], marker="o", ms=4, color=color, label=lab)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        if any(data.values()):
            ax.legend(fontsize=8)
        if len(set(epochs)) <= 12:
            ax.set_xticks(sorted(set(e for e in epochs if _is_number(e))))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------------- error grid

def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts ``[predicted, true]`` (rows = predicted label, columns = true label, as the error grid)."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_pred, np.int64), np.asarray(y_true, np.int64)), 1)
    return counts


def _thumb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [h, w, 3] RGB (grey repeated), strided down to at most ``size``."""
    if img.shape[0] >= 3:
        rgb = np.transpose(img[:3], (1, 2, 0))
    else:
        rgb = np.repeat(img[0][:, :, None], 3, axis=2)
    sh, sw = max(1, math.ceil(rgb.shape[0] / size[0])), max(1, math.ceil(rgb.shape[1] / size[1]))
    return rgb[::sh, ::sw][: size[0], : size[1]]


def error_grid_figure(predictions: Mapping[str, np.ndarray], *, title: str, side: int = 3,
                      max_classes: int = 20) -> bytes:
    """Seed 003's Facets view: columns = true label, rows = predicted label, each cell up to ``side``x``side``
    sample thumbnails and its count; diagonal (correct) cells dimmed on green, off-diagonal (errors) framed in
    red, thicker for more errors. With more than ``max_classes`` classes, the most confused ones are shown."""
    from matplotlib.patches import Rectangle

    y_true, y_pred = predictions["y_true"], predictions["y_pred"]
    names = [str(n) for n in predictions.get("class_names", [])]
    k_all = max(len(names), int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1)
    names += [str(i) for i in range(len(names), k_all)]
    counts_all = confusion_counts(y_true, y_pred, k_all)
    shown = list(range(k_all))
    if k_all > max_classes:
        off = counts_all - np.diag(np.diag(counts_all))
        shown = sorted(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:max_classes].tolist())
    K = len(shown)
    pos = {c: i for i, c in enumerate(shown)}
    counts = counts_all[np.ix_(shown, shown)]
    images = predictions.get("sample_images")
    index = predictions.get("sample_index")
    if images is None or index is None or not len(index):
        images, index = np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64)
    th, tw = min(images.shape[2], 32), min(images.shape[3], 32)
    pad, gap, label_h = 2, 6, 14
    cw, ch = side * tw + (side + 1) * pad, label_h + side * th + (side + 1) * pad
    W, H = K * cw + (K + 1) * gap, K * ch + (K + 1) * gap
    canvas = np.ones((H, W, 3), np.float32)
    off = counts - np.diag(np.diag(counts))
    max_off = max(int(off.max()), 1)

    def origin(r, c):
        return gap + r * (ch + gap), gap + c * (cw + gap)

    for r in range(K):
        for c in range(K):
            y0, x0 = origin(r, c)
            if r == c:
                bg = (0.88, 0.95, 0.88)
            elif counts[r, c]:
                t = counts[r, c] / max_off
                bg = (1.0, 0.93 - 0.25 * t, 0.93 - 0.25 * t)
            else:
                bg = (0.95, 0.95, 0.95)
            canvas[y0:y0 + ch, x0:x0 + cw] = bg
    filled: dict[tuple[int, int], int] = {}
    for img, i in zip(images, index):
        t, p = int(y_true[i]), int(y_pred[i])
        if t not in pos or p not in pos:
            continue
        r, c = pos[p], pos[t]
        n = filled.get((r, c), 0)
        if n >= side * side:
            continue
        filled[(r, c)] = n + 1
        thumb = _thumb(img, (th, tw))
        if r == c:
            thumb = 0.4 * thumb + 0.6 * np.asarray((0.88, 0.95, 0.88), np.float32)
        y0, x0 = origin(r, c)
        yy = y0 + label_h + pad + (n // side) * (th + pad)
        xx = x0 + pad + (n % side) * (tw + pad)
        canvas[yy:yy + thumb.shape[0], xx:xx + thumb.shape[1]] = thumb
    left, top, bottom, right = 120, 120, 50, 20
    dpi = 100
    fig = _figure((W + left + right) / dpi, (H + top + bottom) / dpi, dpi=dpi)
    fw, fh = W + left + right, H + top + bottom
    ax = fig.add_axes((left / fw, bottom / fh, W / fw, H / fh))
    ax.imshow(canvas, interpolation="nearest", extent=(0, W, H, 0))
    for r in range(K):
        for c in range(K):
            y0, x0 = origin(r, c)
            n = int(counts[r, c])
            if r != c and n:
                ax.add_patch(Rectangle((x0, y0), cw, ch, fill=False, edgecolor=_FRONT,
                                       lw=0.6 + 2.4 * n / max_off))
            if n:
                ax.text(x0 + 3, y0 + 2, f"{n}" + (" ok" if r == c else ""), ha="left", va="top", fontsize=7,
                        color="#2a6a2a" if r == c else "#a01010", fontweight="normal" if r == c else "bold")
    centres_x = [gap + c * (cw + gap) + cw / 2 for c in range(K)]
    centres_y = [gap + r * (ch + gap) + ch / 2 for r in range(K)]
    ax.set_xticks(centres_x, [names[c] for c in shown], rotation=35, ha="left", fontsize=9)
    ax.set_yticks(centres_y, [names[c] for c in shown], fontsize=9)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("true label", fontsize=10)
    ax.set_ylabel("predicted label", fontsize=10)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    n_all, right_all = len(y_true), int(np.trace(counts_all))
    note = (f"{title}: {right_all}/{n_all} right ({100 * right_all / max(n_all, 1):.1f}%); "
            f"errors off the diagonal (count in red), correct predictions dimmed on the diagonal")
    if K < k_all:
        note += f"; {K} most confused of {k_all} classes"
    fig.text(0.01, 0.012, note, fontsize=8, ha="left", va="bottom")
    return _png(fig)
