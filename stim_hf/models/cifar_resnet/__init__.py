"""CIFAR-style ResNets (ResNet-20/32/44/56/110) as Hugging Face models."""

from stim_hf.models.cifar_resnet.configuration_cifar_resnet import CifarResNetConfig
from stim_hf.models.cifar_resnet.modeling_cifar_resnet import (
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
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "CifarResNetPaddingShortcut",
    "CifarResNetPreTrainedModel",
    "CifarResNetStage",
]
