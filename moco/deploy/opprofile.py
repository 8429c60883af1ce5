"""Where a deployed model's time goes: onnxruntime's own per-node profile of a runtime from :func:`load`.

``op_profile(path, x)`` loads the export at ``path`` with the settings it would run with (its tuned
session settings and micro-batches, the fused graph where there is one), runs it on ``x`` with
onnxruntime's profiler on and returns an :class:`OpProfile`: the kernel time of every node after the
graph optimisations (so fused ``FusedConv``/``FusedGemm`` nodes and the NCHWc ``ReorderInput``/
``ReorderOutput`` layout changes appear as onnxruntime runs them), per run, largest first. Like the
runtime, it needs only numpy and onnxruntime.

The profiler times each kernel; the sum is close to, but not exactly, the wall time (thread-pool
dispatch and the gaps between kernels are not in it): ``wall_s`` is recorded beside it. Runs with
the profiler on are a little slower than without; shares are the useful figure.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moco.errors import MocoError

__all__ = ["OpProfile", "OpRow", "op_profile"]


@dataclass(frozen=True)
class OpRow:
    """One node as onnxruntime ran it: ``seconds`` of kernel time per run (mean), ``share`` of the total."""

    graph: str
    node: str
    op_type: str
    seconds: float
    share: float
    calls: float  # kernel calls per run (more than 1 where the runtime runs the graph in micro-batches)


@dataclass(frozen=True)
class OpProfile:
    """Per-node kernel times of one deployed model on one input batch (seconds per run)."""

    rows: tuple[OpRow, ...]
    runs: int
    batch: int
    kernel_s: float  # sum of the rows' seconds: kernel time per run
    wall_s: float  # median wall time of one profiled run
    threads: int
    precision: str
    path: str

    def by_op_type(self) -> dict[str, float]:
        """Seconds per run summed by operator type, largest first."""
        totals: dict[str, float] = defaultdict(float)
        for row in self.rows:
            totals[row.op_type] += row.seconds
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "precision": self.precision, "threads": self.threads, "runs": self.runs,
                "batch": self.batch, "kernel_s": self.kernel_s, "wall_s": self.wall_s,
                "by_op_type": self.by_op_type(),
                "rows": [asdict(r) for r in self.rows]}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.rows])

    def to_text(self, top: int | None = 12) -> str:
        """The ``top`` nodes by time (all with None), then the totals by operator type."""
        rows = self.rows if top is None else self.rows[:top]
        multi = len({r.graph for r in self.rows}) > 1
        names = [(f"{r.graph}:" if multi else "") + r.node for r in rows]
        width = max([len("node")] + [len(n) for n in names])
        opw = max([len("op")] + [len(r.op_type) for r in rows])
        lines = [f"where the time goes: {self.path} ({self.precision}), batch {self.batch}, {self.threads} thread(s), "
                 f"{self.runs} profiled runs; kernel time {self.kernel_s * 1e3:.3f} ms per run "
                 f"(wall {self.wall_s * 1e3:.3f} ms)",
                 f"{'node'.ljust(width)}  {'op'.ljust(opw)}  {'ms/run':>8}  {'share':>6}  {'calls':>5}",
                 f"{'-' * width}  {'-' * opw}  {'-' * 8}  {'-' * 6}  {'-' * 5}"]
        for name, r in zip(names, rows):
            lines.append(f"{name.ljust(width)}  {r.op_type.ljust(opw)}  {r.seconds * 1e3:8.3f}  {r.share:6.1%}  "
                         f"{r.calls:5.3g}")
        if top is not None and len(self.rows) > top:
            rest = sum(r.seconds for r in self.rows[top:])
            lines.append(f"({len(self.rows) - top} more nodes: {rest * 1e3:.3f} ms)")
        lines.append("by op type: " + ", ".join(f"{op} {s / self.kernel_s:.0%}" for op, s in self.by_op_type().items()
                                                if self.kernel_s > 0))
        return "\n".join(lines)


def _check_runs(runs: Any, warmup: Any) -> tuple[int, int]:
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MocoError(f"{name} must be an int >= {low}, got {value!r}")
    return runs, warmup


def op_profile(path: str | Path, x: Any, *, runs: int = 10, warmup: int = 2, precision: str | None = None,
               intra_op_num_threads: int = 1) -> OpProfile:
    """Profile the export at ``path`` on batch ``x`` (numpy or torch): per-node kernel seconds per run.

    ``precision`` and ``intra_op_num_threads`` as in :func:`moco.deploy.load`. The first ``warmup`` runs
    are left out of the figures. Each graph gets a session of its own with the same settings as the
    runtime's plus onnxruntime's profiler; the profiler's JSON files go to a temporary folder, removed
    afterwards. Raises MocoError for a bad ``runs``/``warmup`` or anything :func:`load` refuses.
    """
    from moco.deploy.runtime import _session, load

    runs, warmup = _check_runs(runs, warmup)
    runtime = load(path, precision=precision, intra_op_num_threads=intra_op_num_threads)
    graphs = list(runtime.graphs) + ([runtime.fused] if runtime.fused is not None else [])
    graphs += [g.lanes for g in graphs if g.lanes is not None]  # a plain model's lane graph (moco.deploy.lanes)
    with tempfile.TemporaryDirectory(prefix="moco-opprofile-") as tmp:
        for i, graph in enumerate(graphs):  # the runtime is our own: its sessions are swapped, nobody else's
            graph.session = _session(graph.path, graph.threads, graph.optimization, graph.disabled_optimizers,
                                     profile_prefix=str(Path(tmp) / f"g{i}"))
        batch = runtime._input(x)
        for _ in range(warmup):
            runtime(batch)
        # onnxruntime's event times are microseconds from the session's profiling start (a system-clock time
        # in ns): events before this moment belong to the warm-up runs
        boundary_ns = time.time_ns()
        walls = []
        for _ in range(runs):
            t0 = time.perf_counter()
            runtime(batch)
            walls.append(time.perf_counter() - t0)
        totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        for graph in graphs:
            start_us = (boundary_ns - graph.session.get_profiling_start_time_ns()) / 1e3
            events = json.loads(Path(graph.session.end_profiling()).read_text())
            for e in events:
                if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start_us:
                    continue
                key = (graph.path.name, e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"))
                totals[key][0] += e["dur"] * 1e-6
                totals[key][1] += 1
    kernel = sum(t for t, _ in totals.values()) / runs
    rows = tuple(sorted((OpRow(graph=g, node=n, op_type=op, seconds=t / runs, share=(t / runs) / kernel if kernel else 0.0,
                               calls=c / runs) for (g, n, op), (t, c) in totals.items()), key=lambda r: -r.seconds))
    return OpProfile(rows=rows, runs=runs, batch=int(len(batch)), kernel_s=kernel, wall_s=float(np.median(walls)),
                     threads=intra_op_num_threads, precision=runtime.precision, path=str(path))
