"""Model surgery: rebuild a trained model physically smaller, keeping chosen units of its layers.

``apply(model, keep={layer: unit_indices}, example_input)`` returns a NEW dense model in which the
named ``Conv2d`` layers keep only the listed output channels and the named ``Linear`` layers only the
listed output features, with every dependent layer adjusted: the next conv's input channels,
BatchNorm (weights and running statistics), a ``Linear`` after ``flatten`` (channel ``c`` is the
feature group ``c*H*W .. (c+1)*H*W - 1``), depthwise and grouped convs (whole groups), residual adds
(all members keep the same channels), ``torch.cat`` along channels, squeeze-excitation gates written
as ``Linear`` + ``.view(b, c, 1, 1)`` (views and reshapes whose channel size follows the tensor, not a
hard-coded number) and channels-last blocks (``permute`` + ``LayerNorm`` + ``Linear``). Dependencies are found by
tracing the model with ``torch.fx`` and propagating shapes with the example input, not by assuming an
``nn.Sequential``. The original model is never modified.

``dependency_groups(model, example_input)`` lists the layers whose units are tied (prune them together);
``save(small, path)`` writes ``path.json`` (architecture) + ``path.pt`` (tensor-only state_dict) and
``load(path, base=...)`` rebuilds the smaller model without pickle.
"""

from moco.compress.surgery.analysis import ChannelGroup, dependency_groups
from moco.compress.surgery.errors import SurgeryError
from moco.compress.surgery.rebuild import apply
from moco.compress.surgery.serialize import load, save

__all__ = ["ChannelGroup", "SurgeryError", "apply", "dependency_groups", "load", "save"]
