"""Deploy every moco result to ONNX Runtime (FP32 and int8): :func:`export` and :func:`load`.

``export(obj, path, example_input, *, int8=None)`` (needs torch) writes a plain model, a
``BranchedNetwork`` or an ``EarlyExitNetwork`` as ONNX graphs and checks the runtime against PyTorch
before returning an :class:`ExportResult`. ``load(path)`` (numpy and onnxruntime only: importing
``moco.deploy`` and loading never imports torch) returns a runtime with the PyTorch object's call
contract. ``op_profile(path, x)`` (numpy and onnxruntime too) shows where a deployed model's time goes,
node by node. A plain model with few-channel convolutions may also get a lane graph
(:mod:`moco.deploy.lanes`: the convolutions vectorised over the batch's images) when the export measures
it faster. Names load on first use, so the runtime side stays torch-free.
"""

from importlib import import_module

_LAZY = {
    "export": "moco.deploy.exporter",
    "export_onnx": "moco.deploy.exporter",
    "ExportResult": "moco.deploy.exporter",
    "Check": "moco.deploy.exporter",
    "load": "moco.deploy.runtime",
    "read_manifest": "moco.deploy.runtime",
    "ModelRuntime": "moco.deploy.runtime",
    "BranchedRuntime": "moco.deploy.runtime",
    "ExitsRuntime": "moco.deploy.runtime",
    "op_profile": "moco.deploy.opprofile",
    "OpProfile": "moco.deploy.opprofile",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moco.deploy' has no attribute {name!r}")
