"""Which tensor PFA analyses for a layer named by its ``Conv2d`` / ``Linear``: the activation after it.

PFA's units are a layer's filters, but their responses are most informative after the layer's
BatchNorm and activation (seed 001 pools the ReLU outputs). :func:`activation_probe` traces the model
with torch.fx (the tracer model surgery uses), starts at the call of each named conv/linear and
follows the chain of single-user BatchNorm / activation / dropout steps after it, whether they are
modules (``nn.BatchNorm2d``, ``nn.ReLU``) or functional (``F.relu(self.bn(self.conv(x)))``,
``x.relu()``), stopping at anything else (a residual add, pooling, the next layer). It returns a
*probe*: a ``torch.fx.GraphModule`` over the same submodules (nothing on the model is changed) with an
identity tap module inserted after the last step of each chain, so the responses can be captured by
module hooks like any other module output.

Names that are not ``Conv2d`` / ``Linear`` modules are analysed at their own output, as before; a
model that torch.fx cannot trace falls back to the named modules' own outputs, and says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["activation_probe", "call_counts", "ACTIVATION_MODULES"]

ACTIVATION_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d,
)
"""Modules that continue a layer's chain: BatchNorm, element-wise activations, dropout (identity in eval)."""

_ACTIVATION_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.leaky_relu, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.batch_norm,
    F.dropout, F.dropout1d, F.dropout2d,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


class _Tap(nn.Identity):
    """An identity module inserted after a layer's activation, so that module hooks can see it."""


def _continues(node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not node.args or node.args[0] is not prev:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    return False


def _chain_end(start: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    chain = [start]
    while True:
        users = [u for u in chain[-1].users if u.op != "output"] if len(chain[-1].users) == 1 else []
        if len(users) != 1 or not _continues(users[0], chain[-1], modules):
            return chain
        chain.append(users[0])


def _describe(chain: list[fx.Node]) -> str:
    steps = []
    for node in chain:
        if node.op == "call_module":
            steps.append(str(node.target))
        elif node.op == "call_method":
            steps.append(f".{node.target}()")
        else:
            steps.append(getattr(node.target, "__name__", str(node.target)))
    return " -> ".join(steps)


def call_counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """How many times each module (qualified name) runs in one forward pass on ``example``, in eval and
    inference mode as PFA's capture runs it (a fused attention kernel, for one, skips the ``out_proj`` and
    feed-forward Linears it owns). {} when the model fails on ``example`` (the capture then says why)."""
    from moco.capture import _eval_mode

    names = {id(m): n for n, m in model.named_modules() if n}
    counts = dict.fromkeys(names.values(), 0)

    def hook(module: nn.Module, _inputs, _output) -> None:
        name = names.get(id(module))
        if name is not None:
            counts[name] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with _eval_mode(model), torch.inference_mode():
            model(example)
    except Exception:  # noqa: BLE001 - user code raises anything; the capture reports it with context
        return {}
    finally:
        handle.remove()
    return counts


def activation_probe(model: nn.Module, names: list[str]) -> tuple[nn.Module, dict[str, str], dict[str, str]]:
    """``(probe, {layer: module name to capture in probe}, {layer: what is captured})``.

    For a ``Conv2d`` / ``Linear`` name, the captured tensor is the end of its BatchNorm/activation
    chain (e.g. ``"conv1 -> bn1 -> relu"``); for other names (or when tracing fails) the module's own
    output (``probe`` is then ``model`` itself for those names).
    """
    modules = dict(model.named_modules())
    owners = [n for n in names if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
    if not owners:
        return model, {n: n for n in names}, {n: f"{n} (its own output)" for n in names}
    from moco.compress.surgery.analysis import _Tracer, _last_line

    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many kinds from user code
        why = f"the model cannot be traced with torch.fx ({type(err).__name__}: {_last_line(err)})"
        return model, {n: n for n in names}, {n: f"{n} (its own output: {why})" for n in names}
    probe = fx.GraphModule(model, graph)
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    targets: dict[str, str] = {}
    described: dict[str, str] = {}
    for i, name in enumerate(names):
        if name in owners and len(calls.get(name, [])) == 1:
            chain = _chain_end(calls[name][0], modules)
            tap = f"moco_pfa_tap_{i}"
            probe.add_submodule(tap, _Tap())
            with graph.inserting_after(chain[-1]):
                graph.call_module(tap, (chain[-1],))
            targets[name] = tap
            described[name] = _describe(chain)
        else:
            targets[name] = name
            described[name] = f"{name} (its own output)"
    probe.recompile()
    return probe, targets, described
