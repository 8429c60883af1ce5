"""``attach_exits(model, points, head=...)``: a BranchyNet-style early-exit network over any model.

The backbone is cut into consecutive *segments* at the exit points (plain ``nn.Sequential`` slices,
or one ``torch.fx`` trace with every point kept as a single step, cut after each point, as
:mod:`moco.split` does for one point). Segments hold the model's own submodules: parameters are
shared, nothing is copied, the model itself is not changed. After every point but the last segment
an exit head (:mod:`moco.exits.heads`) maps the activation to logits; the last segment (the rest of
the model) is the final exit, so exit ``K - 1`` is exactly ``model(x)``.

Inference (:meth:`EarlyExitNetwork.forward`) is batched and really skips work: after segment ``i``
only the samples still active are fed to head ``i``; those whose criterion passes the threshold are
written to the output (``index_copy_``), the others continue as a smaller batch (``index_select``).
When no sample is left no later segment or head runs, and an exit whose threshold is ``None`` is
skipped entirely (its head is not computed).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from moco.errors import MocoError
from moco.exits.criteria import Criterion, get_criterion
from moco.exits.heads import choose_head, get_head_factory, head_spec
from moco.split import _LeafTracer, _cut, _describe, _is_plain_sequential, split_at, split_boundaries, split_points

__all__ = ["AUTO_HEAD_BUDGET", "EarlyExitNetwork", "ExitCosts", "attach_exits", "auto_points"]

#: ``head="auto"``: each exit head costs at most this fraction of the model's MACs
AUTO_HEAD_BUDGET = 0.05


# ----------------------------------------------------------------------------------------- points


def _valid_list(model: nn.Module, valid: list[str] | None = None) -> str:
    if valid is None:
        valid = split_points(model)  # every accepted name (a container and its last block end at the same point)
    shown = ", ".join(repr(v) for v in valid[:24]) + (", ..." if len(valid) > 24 else "")
    return f"valid points are [{shown}]" if valid else "the model has no split points (torch.fx cannot trace it)"


def _resolve_points(model: nn.Module, points: Any) -> list[str]:
    """Exit points as qualified module names (Sequential ints ``k`` become child ``k - 1``)."""
    if isinstance(points, (str, int)) and not isinstance(points, bool):
        points = [points]
    if not isinstance(points, (list, tuple)) or not points:
        raise MocoError("points must be a non-empty list of exit points (module names, or ints for an nn.Sequential)")
    modules = dict(model.named_modules())
    names: list[str] = []
    for p in points:
        if isinstance(p, bool) or not isinstance(p, (int, str)):
            raise TypeError(f"an exit point must be an int split index or a str module name, not {type(p).__name__}")
        if isinstance(p, int):
            if not _is_plain_sequential(model):
                raise MocoError(f"int exit point {p} needs an nn.Sequential model, but it is {type(model).__name__}; "
                                f"name modules instead ({_valid_list(model)})")
            keys = list(model._modules)
            if not 1 <= p <= len(keys) - 1:
                raise MocoError(f"exit point {p} is out of range for a Sequential of {len(keys)} modules; "
                                f"choose 1..{len(keys) - 1}")
            names.append(keys[p - 1])
        else:
            if p == "" or p not in modules:
                valid = split_points(model)
                close = difflib.get_close_matches(p, valid, n=3)
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                raise MocoError(f"exit point {p!r} does not exist in {type(model).__name__}{hint}; "
                                f"{_valid_list(model, valid)}")
            names.append(p)
    if len(set(names)) != len(names):
        raise MocoError(f"exit points {list(points)} name the same point twice; give each point once")
    return names


def _slice_sequential(model: nn.Sequential, names: list[str]) -> list[nn.Module]:
    keys = list(model._modules)
    cuts = [keys.index(n) + 1 for n in names]
    if cuts != sorted(cuts):
        order = sorted(names, key=keys.index)
        raise MocoError(f"exit points {names} are not in execution order; pass them as {order}")
    if cuts[-1] >= len(keys):
        raise MocoError(f"exit point {names[-1]!r} is the model's last module; nothing would be left for the final exit")
    segments, start = [], 0
    for end in [*cuts, len(keys)]:
        seg = nn.Sequential()
        for key in keys[start:end]:
            seg.add_module(key, model._modules[key])
        segments.append(seg)
        start = end
    return segments


def _cut_graph(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """One fx trace with every point as a leaf, cut after each point into ``len(names) + 1`` GraphModules."""
    try:
        graph = _LeafTracer(frozenset(names)).trace(model)
    except Exception:
        split_at(model, names[0])  # raises moco.split's MocoError explaining why fx cannot trace the model
        raise
    nodes = list(graph.nodes)
    cut_nodes: list[fx.Node] = []
    for name in names:
        cut = _cut(graph, name)
        if not cut.ok or cut.node is None:
            if cut.crossing:
                values = ", ".join(_describe(n) for n in cut.crossing)
                why = f"values [{values}] computed before it are used after it"
            else:
                why = cut.problem
            raise MocoError(f"cannot put an exit after {name!r}: {why}; {_valid_list(model)}")
        cut_nodes.append(cut.node)
    positions = [nodes.index(n) for n in cut_nodes]
    if positions != sorted(positions):
        order = [n for _, n in sorted(zip(positions, names))]
        raise MocoError(f"exit points {names} are not in execution order; pass them as {order}")
    label = type(model).__name__
    segments: list[nn.Module] = []
    bounds = [-1, *positions, len(nodes) - 1]
    for s in range(len(bounds) - 1):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if s > 0:
            prev = cut_nodes[s - 1]
            env[prev] = g.placeholder(prev.name)
        last = None
        for node in nodes[bounds[s] + 1: bounds[s + 1] + 1]:
            if node.op == "output" and s < len(bounds) - 2:
                continue
            for arg in node.all_input_nodes:
                if arg not in env and arg.op == "get_attr":
                    env[arg] = g.node_copy(arg)
            env[node] = g.node_copy(node, lambda n: env[n])
            last = node
        if s < len(bounds) - 2:
            g.output(env[cut_nodes[s]])
        elif last is None or last.op != "output":
            raise MocoError(f"exit point {names[-1]!r} leaves nothing for the final exit")
        segments.append(fx.GraphModule(model, g, class_name=f"{label}Segment{s}"))
    return segments


def _segments(model: nn.Module, names: list[str]) -> list[nn.Module]:
    if _is_plain_sequential(model) and all(n in model._modules for n in names):
        return _slice_sequential(model, names)
    return _cut_graph(model, names)


# ----------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class ExitCosts:
    """**MACs per sample** (multiply-accumulates, counted by :func:`moco.profile.profile`) of the parts.

    ``segment_macs[i]``: backbone segment ``i`` (segment ``K - 1`` ends with the final classifier);
    ``head_macs[i]``: exit head ``i`` (``K - 1`` entries); ``full_macs``: the backbone alone (the
    model), the sum of ``segment_macs``.
    """

    segment_macs: tuple[float, ...]
    head_macs: tuple[float, ...]

    @property
    def full_macs(self) -> float:
        return float(sum(self.segment_macs))

    def exit_macs(self, enabled: Sequence[bool] | None = None) -> tuple[float, ...]:
        """MACs per sample of a sample leaving at exit ``i`` (segments ``0..i`` and every enabled head up to ``i``).

        ``enabled[j]`` says whether head ``j`` runs (its threshold is not None); default all.
        """
        k = len(self.segment_macs)
        enabled = [True] * (k - 1) if enabled is None else list(enabled)
        out, total = [], 0.0
        for i in range(k):
            total += self.segment_macs[i]
            if i < k - 1 and enabled[i]:
                total += self.head_macs[i]
            out.append(total)
        return tuple(out)

    def expected_macs(self, fractions: Sequence[float], enabled: Sequence[bool] | None = None) -> float:
        """Expected MACs per sample for exit fractions ``fractions`` (summing to 1), ``sum_i f_i * exit_macs[i]``."""
        return float(sum(f * m for f, m in zip(fractions, self.exit_macs(enabled))))


def _macs(module: nn.Module, x: torch.Tensor) -> float:
    from moco.profile import profile

    return profile(module, x, latency=False).totals.macs / x.shape[0]


# ----------------------------------------------------------------------------------------- network


def _check_input(x: Any, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A floating batch ``[B, *input_shape]`` without NaN or inf, else TypeError / MocoError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor batch [B, ...], not {type(x).__name__}")
    if x.dim() == 0:
        raise MocoError("input is a 0-d tensor; pass a batch with a leading batch dimension")
    if not x.is_floating_point():
        raise TypeError(f"input has dtype {x.dtype}; pass floating-point inputs (e.g. x.float(), normalised as in training)")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise MocoError(f"input has per-sample shape {tuple(x.shape[1:])}, the network expects {tuple(input_shape)} "
                        f"(a batch [B, {', '.join(map(str, input_shape))}])")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise MocoError("the input contains NaN or inf; clean or normalise the data first")
    return x


class EarlyExitNetwork(nn.Module):
    """A model with exit heads: ``forward(x) -> (logits [B, C] of the exit taken, exit_index int64 [B])``.

    Built by :func:`attach_exits`. Exits are numbered ``0 .. K - 1``; exit ``K - 1`` is the model's
    own output. Attributes: ``segments`` (ModuleList, sharing the model's modules), ``heads``
    (ModuleList, ``K - 1`` exit heads), ``points`` (qualified names of the exit points),
    ``criterion``, ``thresholds`` (``K - 1`` floats or None = exit disabled), ``num_classes``,
    ``input_shape`` (one sample's shape), ``costs`` (:class:`ExitCosts`, MACs per sample) and
    ``head_specs`` (JSON specs of the heads, for saving).
    """

    def __init__(self, segments: Sequence[nn.Module], heads: Sequence[nn.Module], *, points: Sequence[str],
                 criterion: Criterion, num_classes: int, input_shape: tuple[int, ...],
                 head_specs: Sequence[dict], costs: ExitCosts, thresholds: Sequence[float | None] | None = None):
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.points = tuple(points)
        self.criterion = get_criterion(criterion)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.head_specs = tuple(dict(s) for s in head_specs)
        self.costs = costs
        self._thresholds: tuple[float | None, ...] = (None,) * len(self.heads)
        if thresholds is not None:
            self.thresholds = thresholds

    @property
    def num_exits(self) -> int:
        """``K``: the early exits plus the final one."""
        return len(self.segments)

    @property
    def thresholds(self) -> tuple[float | None, ...]:
        """Per early exit: the criterion's threshold, or None (exit disabled, its head is not computed)."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values: Sequence[float | None]) -> None:
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or len(values) != len(self.heads):
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise MocoError(f"thresholds needs one value per early exit ({len(self.heads)}, final exit excluded), "
                            f"got {got}; use None to disable an exit")
        out: list[float | None] = []
        for v in values:
            if v is None:
                out.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
                raise MocoError(f"a threshold must be a number or None, got {v!r}")
            out.append(float(v))
        self._thresholds = tuple(out)

    @property
    def enabled(self) -> tuple[bool, ...]:
        """Per early exit: whether it is active (threshold not None)."""
        return tuple(t is not None for t in self._thresholds)

    def extra_repr(self) -> str:
        return f"points={list(self.points)}, criterion={self.criterion!r}, thresholds={list(self._thresholds)}"

    # ------------------------------------------------------------------ inference

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-exit inference: ``(logits [B, C] of the exit each sample took, exit_index int64 [B])``.

        Only samples that have not exited reach later segments and heads; disabled exits cost
        nothing. ``B = 0`` gives empty outputs.
        """
        x = _check_input(x, self.input_shape)
        batch = x.shape[0]
        last = len(self.segments) - 1
        exit_index = torch.full((batch,), last, dtype=torch.int64, device=x.device)
        if batch == 0:
            return x.new_zeros((0, self.num_classes)), exit_index
        out: torch.Tensor | None = None
        idx: torch.Tensor | None = None  # original rows of the active samples; None = all, in order
        h = x
        for i, segment in enumerate(self.segments):
            h = segment(h)
            if i == last:
                if out is None:
                    return h, exit_index
                out.index_copy_(0, idx, h.to(out.dtype))
                return out, exit_index
            t = self._thresholds[i]
            if t is None:
                continue
            logits = self.heads[i](h)
            mask = self.criterion.exits(self.criterion.score(logits), t)
            n_exit = int(mask.sum())
            if n_exit == 0:
                continue
            if out is None:
                out = logits.new_empty((batch, logits.shape[1]))
                idx = torch.arange(batch, device=x.device)
            if n_exit == h.shape[0]:
                out.index_copy_(0, idx, logits)
                exit_index.index_fill_(0, idx, i)
                return out, exit_index
            leave = mask.nonzero().squeeze(1)
            stay = (~mask).nonzero().squeeze(1)
            rows = idx.index_select(0, leave)
            out.index_copy_(0, rows, logits.index_select(0, leave))
            exit_index.index_fill_(0, rows, i)
            idx = idx.index_select(0, stay)
            h = h.index_select(0, stay)
        raise AssertionError("unreachable")  # pragma: no cover

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        """Exits disabled: the backbone alone (the same ops as ``model(x)``), logits ``[B, C]``."""
        h = _check_input(x, self.input_shape)
        for segment in self.segments:
            h = segment(h)
        return h

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit on every sample (training, calibration): ``K`` logits tensors ``[B, C]``, final last."""
        h = _check_input(x, self.input_shape)
        outs = []
        last = len(self.segments) - 1
        for i, segment in enumerate(self.segments):
            h = segment(h)
            outs.append(h if i == last else self.heads[i](h))
        return outs

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone activations at every exit point (``K - 1`` tensors) and the final logits (last)."""
        h = _check_input(x, self.input_shape)
        outs = []
        for segment in self.segments:
            h = segment(h)
            outs.append(h)
        return outs

    def backbone_parameters(self):
        """The parameters of the backbone (the model's own), each once."""
        seen: set[int] = set()
        for p in self.segments.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


# ----------------------------------------------------------------------------------------- attach


def _probe(segments: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    outs, h = [], x
    for i, seg in enumerate(segments):
        try:
            h = seg(h)
        except Exception as exc:
            raise MocoError(f"the model could not run segment {i} on example_input of shape {tuple(x.shape)}: "
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from None
        if not isinstance(h, torch.Tensor):
            raise MocoError(f"segment {i} returns {type(h).__name__}; exit points must carry a single tensor")
        outs.append(h)
    return outs


def attach_exits(
    model: nn.Module,
    points: Sequence[int | str] | int | str,
    *,
    example_input: torch.Tensor,
    head: Any = "auto",
    criterion: str | Criterion = "entropy",
    thresholds: Sequence[float | None] | None = None,
    seed: int = 0,
) -> EarlyExitNetwork:
    """Attach exit heads after ``points`` of ``model``; returns an :class:`EarlyExitNetwork` sharing its parameters.

    Args:
        model: the classifier (returns logits ``[B, C]``); not modified. Its modules become the
            network's segments, so training the network jointly trains the model.
        points: exit points in execution order: qualified module names (``"layer1"``), or split
            indices into a plain ``nn.Sequential`` (``2`` = after child ``1``). :func:`auto_points`
            picks them from the profiler. The final exit is always the model's own output.
        example_input: a batch ``[N, ...]`` (``N >= 1``) the model accepts; used to find the
            activation shapes, check the heads and count MACs per sample with the profiler.
        head: ``"auto"`` (default: per point the strongest built-in head costing at most 5% of the
            model's MACs, :func:`moco.exits.heads.choose_head`), ``"conv_pool_linear"``, ``"pool_linear"``, a factory from
            :mod:`moco.exits.heads`, any callable ``factory(in_shape, num_classes) -> nn.Module``,
            or a list of these, one per point.
        criterion: ``"entropy"`` (default, seed 004), ``"max_prob"`` or a :class:`Criterion`.
        thresholds: one per point (None disables that exit); default all None until
            :func:`moco.exits.calibrate` sets them.
        seed: seeds the heads' initial weights (the global RNG is left as it was).

    Raises:
        MocoError: a point that does not exist (the message lists the valid points), cannot carry
            an exit, or is out of order; a head whose output is not ``[N, num_classes]``; a model
            that fails on ``example_input``. TypeError: wrong argument types.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise MocoError("example_input must be a tensor batch [N, ...] with N >= 1, e.g. torch.zeros(1, 1, 28, 28)")
    names = _resolve_points(model, points)
    factories = head if isinstance(head, (list, tuple)) else [head] * len(names)
    if len(factories) != len(names):
        raise MocoError(f"head is a list of {len(factories)} but there are {len(names)} exit points; give one per point")
    factories = [f if isinstance(f, str) and f == "auto" else get_head_factory(f) for f in factories]
    crit = get_criterion(criterion)
    segments = _segments(model, names)
    example = example_input[:1].detach()
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            acts = _probe(segments, example)
            final = acts[-1]
            if final.dim() != 2:
                raise MocoError(f"the model must return logits [N, classes]; it returns shape {tuple(final.shape)}")
            num_classes = int(final.shape[1])
            if any(isinstance(f, str) for f in factories):  # "auto": heads within 5% of the model's MACs each
                budget = AUTO_HEAD_BUDGET * sum(_macs(seg, a) for seg, a in zip(segments, [example, *acts[:-1]]))
                factories = [choose_head(tuple(a.shape[1:]), num_classes, budget) if isinstance(f, str) else f
                             for f, a in zip(factories, acts[:-1])]
            heads: list[nn.Module] = []
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                for name, factory, act in zip(names, factories, acts[:-1]):
                    module = factory(tuple(act.shape[1:]), num_classes)
                    if not isinstance(module, nn.Module):
                        raise MocoError(f"the head factory for {name!r} returned {type(module).__name__}, not an nn.Module")
                    module.eval()
                    try:
                        y = module(act)
                    except Exception as exc:
                        raise MocoError(f"the exit head at {name!r} fails on its input [N, *{tuple(act.shape[1:])}]: "
                                        f"{type(exc).__name__}: {exc}") from None
                    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (1, num_classes):
                        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                        raise MocoError(f"the exit head at {name!r} returns shape {got}; it must return logits "
                                        f"[N, {num_classes}] like the model's output")
                    module.train()
                    heads.append(module)
            seg_macs = tuple(_macs(seg, a) for seg, a in zip(segments, [example, *acts[:-1]]))
            head_macs = tuple(_macs(h, a) for h, a in zip(heads, acts[:-1]))
    finally:
        for m, flag in flags:
            m.training = flag
    net = EarlyExitNetwork(
        segments, heads, points=names, criterion=crit, num_classes=num_classes,
        input_shape=tuple(example.shape[1:]), head_specs=[head_spec(f) for f in factories],
        costs=ExitCosts(seg_macs, head_macs), thresholds=thresholds,
    )
    net.train(model.training)
    return net


def auto_points(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    strategy: str = "stages",
    n: int = 3,
) -> list[str]:
    """Exit points chosen from the profiler (names, in execution order).

    ``strategy="stages"``: after each stage, i.e. the last boundary before every spatial
    downsampling (output ``H x W`` larger than the next boundary's), skipping points after which
    less than 10% of the model's MACs remain (they would save little). ``strategy="macs"``: ``n``
    boundaries closest to equal fractions ``1/(n+1), 2/(n+1), ...`` of the model's MACs.
    Candidates are :func:`moco.split.split_boundaries` (each boundary once).
    """
    from moco.profile import profile

    if strategy not in ("stages", "macs"):
        raise MocoError(f"strategy must be 'stages' or 'macs', got {strategy!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MocoError(f"n must be a positive int, got {n!r}")
    candidates = split_boundaries(model)
    if not candidates:
        raise MocoError(f"{type(model).__name__} has no split points (torch.fx cannot trace it); name points yourself")
    example = example_input[:1]
    total = profile(model, example, latency=False).totals.macs
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    info = []
    try:
        with torch.no_grad():
            for name in candidates:
                head = split_at(model, name).head
                act = head(example)
                info.append((name, tuple(act.shape), profile(head, example, latency=False).totals.macs))
    finally:
        for m, flag in flags:
            m.training = flag
    if strategy == "macs":
        chosen: list[str] = []
        for j in range(1, n + 1):
            goal = j / (n + 1) * total
            best = min(info, key=lambda r: abs(r[2] - goal))[0]
            if best not in chosen:
                chosen.append(best)
        return [name for name, _, _ in info if name in chosen]
    out = []
    for (name, shape, macs), (_, nxt, _) in zip(info, info[1:]):
        if len(shape) == 4 and (len(nxt) != 4 or nxt[2] * nxt[3] < shape[2] * shape[3]):
            if total and (total - macs) / total >= 0.10:
                out.append(name)
    if not out:
        raise MocoError("found no stage boundary with at least 10% of the MACs after it; pass points yourself "
                        "or use strategy='macs'")
    return out
