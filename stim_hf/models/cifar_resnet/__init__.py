"""CIFAR-style ResNets (ResNet-20/32/44/56/110) as Hugging Face models."""

from .configuration_cifar_resnet import CifarResNetConfig, CifarResNetConfigError
from .modeling_cifar_resnet import (
    CifarResNetBasicBlock,
    CifarResNetForImageClassification,
    CifarResNetModel,
    CifarResNetPaddingShortcut,
    CifarResNetPreTrainedModel,
    CifarResNetStage,
)

__all__ = [
    "CifarResNetBasicBlock",
    "CifarResNetConfig",
    "CifarResNetConfigError",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "CifarResNetPaddingShortcut",
    "CifarResNetPreTrainedModel",
    "CifarResNetStage",
]
