"""Split a model into a head and a tail at a layer, so that ``tail(head(x))`` is ``model(x)``.

``split_at(model, layer)`` returns a :class:`ModelSplit`. The head computes the model up to and
including the split point and returns that output (an activation tensor, e.g. ``[N, 32, 26, 26]``
for the seed CNN at index 2); the tail takes that activation and computes the rest, returning what
the model returns (``[N, classes]`` logits for the zoo's classifiers).

Guarantees
----------
* **Same ops.** ``tail(head(x))`` runs exactly the operations of ``model(x)`` in the same order,
  so the results are bitwise equal (in eval mode; in training mode dropout draws differ as usual).
* **Shared parameters.** Head and tail hold the original submodules (no copies): training either
  trains the model, and ``head.eval()`` / ``tail.eval()`` switch the shared submodules too.
* **The model is untouched.** Nothing is added to, removed from or patched on ``model``.

How a layer is named
--------------------
* ``int`` (only for a plain ``nn.Sequential``): the split index ``k``; head is ``model[:k]``, tail
  is ``model[k:]``; valid ``k`` is ``1 .. len(model) - 1``.
* ``str``: the qualified module name (as in ``model.named_modules()``) **after whose output** the
  model is split. For a plain ``nn.Sequential`` and a top-level child name ``"i"`` this is split
  index ``i + 1``. Anything else is traced with ``torch.fx``: the named module is made a leaf of
  the trace (so a whole block such as ``"layer1"`` or ``"layer1.0"`` is one step), the graph is cut
  after its call, and the head and tail become ``torch.fx.GraphModule`` objects over the original
  submodules.

Limitations
-----------
* The point must be a boundary that only the split output crosses. Inside a residual block the
  block input is still needed after ``conv1`` (for the skip connection), so such points are refused
  with the crossing values named and the nearest enclosing boundary suggested.
* The named module must run exactly once per forward pass (a module reused twice, like ResNet's
  ``relu`` inside a block, cannot be a split point).
* Models whose ``forward`` has data-dependent Python control flow (``if x.sum() > 0``) or other
  constructs ``torch.fx.symbolic_trace`` cannot trace can only be split by index as an
  ``nn.Sequential``; the error says so. Tracing runs the Python code of non-leaf ``forward``
  methods once with proxy values, so a forward with side effects on ``self`` would see them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import fx, nn

from moco.errors import MocoError

__all__ = ["ModelSplit", "sequential_child", "split_at", "split_boundaries", "split_points"]


@dataclass(frozen=True)
class ModelSplit:
    """A model cut in two: ``tail(head(x))`` computes ``model(x)`` with the same ops and parameters.

    Attributes:
        head: module mapping the model input ``[N, ...]`` to the activation at the split point.
        tail: module mapping that activation to the model output (e.g. logits ``[N, classes]``).
        point: qualified name of the last module in the head (for a Sequential split at index
            ``k`` the name of child ``k - 1``, e.g. ``"1"`` for ``k = 2``); passing it back to
            :func:`split_at` gives the same split.
        index: the split index ``k`` when the model is a plain ``nn.Sequential`` split between
            top-level children (head ``model[:k]``), else None.
    """

    head: nn.Module
    tail: nn.Module
    point: str
    index: int | None


def _is_plain_sequential(model: nn.Module) -> bool:
    """True for an ``nn.Sequential`` (or subclass) whose forward is Sequential's own: children in order."""
    return isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward


def _model_label(model: nn.Module) -> str:
    return type(model).__name__


class _LeafTracer(fx.Tracer):
    """The default fx tracer, plus extra qualified module names that are kept as single steps."""

    def __init__(self, extra_leaves: frozenset[str] = frozenset()):
        super().__init__()
        self._extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return module_qualified_name in self._extra_leaves or super().is_leaf_module(m, module_qualified_name)


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _trace(model: nn.Module, extra_leaves: frozenset[str], point: str) -> fx.Graph:
    """Trace ``model`` with ``extra_leaves`` as leaf modules; MocoError when fx cannot trace it."""
    try:
        return _LeafTracer(extra_leaves).trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... from user code
        raise MocoError(
            f"cannot trace {_model_label(model)} with torch.fx to split it at {point!r}: "
            f"{type(err).__name__}: {_last_line(err)}; build the model as an nn.Sequential and split it "
            f"by index, or choose a different split point"
        ) from err


@dataclass(frozen=True)
class _Cut:
    """Where a traced graph is cut: the split node, or why it cannot be cut there.

    ``problem`` explains a point that is not a single call (or leaves no tail); ``crossing`` lists the
    values computed before the split node, other than its output, that are used after it.
    """

    node: fx.Node | None
    problem: str | None = None
    crossing: tuple[fx.Node, ...] = ()

    @property
    def ok(self) -> bool:
        return self.node is not None and self.problem is None and not self.crossing


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"{node.name!r} (model input)"
    if node.op == "call_module":
        return f"{node.name!r} (output of {node.target!r})"
    if node.op == "get_attr":
        return f"{node.name!r} (attribute {node.target!r})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({target})"


def _cut(graph: fx.Graph, name: str) -> _Cut:
    """Check that ``graph`` can be cut after the single call of module ``name`` (no modules built)."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        if not calls:
            inside = sorted(
                {str(n.target) for n in graph.nodes if n.op == "call_module" and name.startswith(f"{n.target}.")}
            )
            where = f" (it runs inside {inside[0]!r}, which fx keeps as one step)" if inside else ""
            return _Cut(None, f"module {name!r} is not called as a step of the traced forward pass{where}")
        return _Cut(None, f"module {name!r} is called {len(calls)} times per forward pass; a split point must run once")
    split = calls[0]
    nodes = list(graph.nodes)
    pos = nodes.index(split)
    before = set(nodes[:pos])
    after = nodes[pos + 1 :]
    crossing: dict[fx.Node, None] = {}
    for node in after:
        for arg in node.all_input_nodes:
            if arg in before and arg.op != "get_attr":  # attributes are re-read in the tail, not carried
                crossing[arg] = None
    if crossing:
        return _Cut(split, crossing=tuple(crossing))
    if all(n.op == "output" for n in after):
        return _Cut(split, f"module {name!r} is the model's last step; nothing would be left for the tail")
    return _Cut(split, None)


def _build(model: nn.Module, graph: fx.Graph, split: fx.Node) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Head and tail GraphModules over ``model``'s own submodules, cut after ``split``."""
    nodes = list(graph.nodes)
    pos = nodes.index(split)
    label = _model_label(model)

    head_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[: pos + 1]:
        env[node] = head_graph.node_copy(node, lambda n: env[n])
    head_graph.output(env[split])

    tail_graph = fx.Graph()
    env = {split: tail_graph.placeholder(split.name)}
    for node in nodes[pos + 1 :]:
        for arg in node.all_input_nodes:
            if arg not in env and arg.op == "get_attr":
                env[arg] = tail_graph.node_copy(arg)
        env[node] = tail_graph.node_copy(node, lambda n: env[n])

    head = fx.GraphModule(model, head_graph, class_name=f"{label}Head")
    tail = fx.GraphModule(model, tail_graph, class_name=f"{label}Tail")
    return head, tail


def _check_name(model: nn.Module, name: str) -> None:
    modules = dict(model.named_modules())
    if name == "":
        raise MocoError(f"cannot split {_model_label(model)} after the whole model; name one of its submodules")
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        children = [n for n, _ in model.named_children()][:8]
        raise MocoError(
            f"{_model_label(model)} has no module named {name!r}; {hint}its top-level modules are "
            f"{children} (split_points(model) lists every valid point)"
        )


def _sequential_split(model: nn.Sequential, k: int) -> ModelSplit:
    n = len(model)
    if not 1 <= k <= n - 1:
        raise MocoError(
            f"layer {k} is out of range for a Sequential of {n} modules; choose 1..{n - 1}"
            if n >= 2
            else f"a Sequential of {n} module(s) cannot be split; it needs at least 2"
        )
    items = list(model._modules.items())
    # Plain nn.Sequential (not type(model)): a subclass's __init__ may not accept an OrderedDict.
    head = nn.Sequential()
    tail = nn.Sequential()
    for key, module in items[:k]:
        head.add_module(key, module)
    for key, module in items[k:]:
        tail.add_module(key, module)
    return ModelSplit(head=head, tail=tail, point=items[k - 1][0], index=k)


def _suggest_boundary(model: nn.Module, name: str) -> str | None:
    """The innermost module enclosing ``name`` after which the model can be split, if any."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:depth])
        try:
            graph = _LeafTracer(frozenset({candidate})).trace(model)
        except Exception:
            return None
        if _cut(graph, candidate).ok:
            return candidate
    return None


def sequential_child(model: nn.Module, example_input: torch.Tensor | None) -> tuple[str, nn.Sequential] | None:
    """``(name, child)`` when ``model`` wraps a single plain ``nn.Sequential`` child and computes exactly what
    it computes on ``example_input`` (a Lightning module whose ``forward`` is ``self.model(x)``, as in
    seed 000); else None. Other children (losses, metrics) may exist; the check runs in eval mode under
    ``no_grad`` with the training flags restored."""
    if example_input is None or _is_plain_sequential(model):
        return None
    seqs = [(n, c) for n, c in model.named_children() if _is_plain_sequential(c)]
    if len(seqs) != 1:
        return None
    name, child = seqs[0]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            a, b = model(example_input), child(example_input)
    except Exception:
        return None
    finally:
        for m, flag in flags:
            m.training = flag
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b):
        return name, child
    return None


def split_at(model: nn.Module, layer: int | str, *, example_input: torch.Tensor | None = None) -> ModelSplit:
    """Split ``model`` after ``layer`` into a head and a tail with ``tail(head(x)) == model(x)``.

    Args:
        model: the classifier; never modified. Head and tail share its submodules and parameters.
        layer: an ``int`` split index ``k`` into a plain ``nn.Sequential`` (head ``model[:k]``, tail
            ``model[k:]``, ``1 <= k < len(model)``), or the ``str`` qualified name of the module
            after whose output to split (``"layer1"``, ``"fc1"``, ``"layer2.0"``; for a Sequential,
            ``"1"`` is index 2).
        example_input: an input batch; with it an int ``layer`` also indexes the single Sequential
            child of a wrapper that computes what that child computes (:func:`sequential_child`).

    Returns:
        :class:`ModelSplit`: ``head`` maps input ``[N, ...]`` to the activation at the split point,
        ``tail`` maps that activation to the model output (``[N, classes]`` for a classifier).

    Raises:
        TypeError: ``layer`` is neither an int nor a str.
        MocoError: index out of range, unknown name, a module that does not run exactly once, a
            point that values other than the split output cross (e.g. inside a residual block),
            a point with nothing after it, or a model ``torch.fx`` cannot trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise TypeError(f"layer must be an int split index or a str module name, not {type(layer).__name__}")
    if isinstance(layer, int):
        if not _is_plain_sequential(model):
            wrapped = sequential_child(model, example_input)
            if wrapped is None:
                hint = ("" if example_input is not None else
                        " (with example_input, a wrapper whose forward is its single Sequential child's is indexed)")
                raise MocoError(
                    f"an int layer is a split index into an nn.Sequential, but the model is "
                    f"{_model_label(model)}; pass a module name instead (split_points(model) lists them){hint}"
                )
            name, child = wrapped
            inner = _sequential_split(child, layer)
            return ModelSplit(inner.head, inner.tail, f"{name}.{inner.point}", inner.index)
        return _sequential_split(model, layer)

    _check_name(model, layer)
    if _is_plain_sequential(model) and layer in model._modules:
        return _sequential_split(model, list(model._modules).index(layer) + 1)

    graph = _trace(model, frozenset({layer}), layer)
    cut = _cut(graph, layer)
    if cut.crossing:
        suggestion = _suggest_boundary(model, layer)
        advice = (
            f"split at a block boundary such as {suggestion!r}"
            if suggestion
            else "split at a block boundary (see split_points(model))"
        )
        values = ", ".join(_describe(n) for n in cut.crossing)
        raise MocoError(
            f"cannot split {_model_label(model)} at {layer!r}: values [{values}] computed before it are "
            f"used after it; {advice}"
        )
    if not cut.ok or cut.node is None:
        raise MocoError(f"cannot split {_model_label(model)} at {layer!r}: {cut.problem}")
    head, tail = _build(model, graph, cut.node)
    return ModelSplit(head=head, tail=tail, point=layer, index=None)


def split_boundaries(model: nn.Module) -> list[str]:
    """:func:`split_points` with a module listed right before its parent at the same boundary dropped
    (``"stem.2"`` then ``"stem"``, ``"blocks.3"`` then ``"blocks"``): each boundary once, under the
    outermost name."""
    out: list[str] = []
    for name in split_points(model):
        if out and out[-1].startswith(f"{name}."):  # the parent ends where its last part ends
            out[-1] = name
        else:
            out.append(name)
    return out


def split_points(model: nn.Module) -> list[str]:
    """Module names after which :func:`split_at` can split ``model``, in execution order.

    For a plain ``nn.Sequential`` these are its top-level children except the last (``"0"`` ..
    ``str(len - 2)``; name ``"i"`` is split index ``i + 1``), plus the valid leaf modules inside
    nested children when fx can trace them. For any other model: the top-level children and the
    leaf modules (those fx keeps as one step: ``Conv2d``, ``ReLU``, ...) that run exactly once, that
    no other value crosses and that leave something for the tail, and the blocks nested in containers
    (``"layer1.0"``, ``"blocks.3"``) on the same terms. Every returned name splits
    successfully with ``split_at(model, name)``. A parent is listed right after its last leaf
    (``"fc1.2"`` then ``"fc1"``: the same boundary). Returns ``[]`` for a non-Sequential model fx
    cannot trace. Costs one fx trace, plus one per top-level child that is not a leaf; no modules
    are built.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    sequential = _is_plain_sequential(model)
    children = list(model._modules)
    try:
        graph = _LeafTracer().trace(model)
    except Exception:
        return children[:-1] if sequential else []

    nodes = list(graph.nodes)
    calls = [(i, str(n.target)) for i, n in enumerate(nodes) if n.op == "call_module"]
    keys: dict[str, float] = {}
    for i, target in calls:
        if target not in keys and _cut(graph, target).ok:
            keys[target] = i

    def under(target: str, child: str) -> bool:
        return target == child or target.startswith(f"{child}.")

    # Blocks nested in a container (``self.blocks = nn.Sequential(Block(), ...)``: "blocks.0", "blocks.1")
    # are boundaries too; their leaves are not when a residual crosses them.
    nested = [name for name, m in model.named_modules() if "." in name and m._modules and name not in keys]
    for j, child in enumerate([*children, *nested]):
        if child in keys:
            continue
        if sequential and j < len(children):
            if j == len(children) - 1:
                continue
            # Children run in order: the boundary after child j follows every call made by children 0..j.
            done = [i for i, t in calls if any(under(t, c) for c in children[: j + 1])]
            keys[child] = (max(done) if done else -1) + 0.5
            continue
        try:
            child_graph = _LeafTracer(frozenset({child})).trace(model)
        except Exception:
            continue
        cut = _cut(child_graph, child)
        if not cut.ok or cut.node is None:
            continue
        # The child's own leaf calls are contiguous in the full trace; the calls before it in its trace
        # are the first `before` calls of the full trace outside it.
        child_nodes = list(child_graph.nodes)
        before = sum(1 for n in child_nodes[: child_nodes.index(cut.node)] if n.op == "call_module")
        inner = [i for i, t in calls if under(t, child)]
        outer = [i for i, t in calls if not under(t, child)]
        anchor = outer[before - 1] if 0 < before <= len(outer) else -1
        keys[child] = max([anchor, *inner]) + 0.5
    # a container ends where its last part ends (the same position): the part first, then the container
    return sorted(keys, key=lambda name: (keys[name], -name.count(".")))
