"""Model zoo: the seeds' architectures behind a registry, ``create(name, **kw)`` and ``list_models()``."""

from moco.models import zoo as _zoo  # noqa: F401  (registers the architectures)
from moco.models.registry import ModelSpec, create, get_spec, input_shape, list_models, register
from moco.models.zoo import LeNet5, MobileNetV1, ResNet18

__all__ = [
    "ModelSpec", "create", "get_spec", "input_shape", "list_models", "register",
    "LeNet5", "MobileNetV1", "ResNet18",
]
