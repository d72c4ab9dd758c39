"""Models that Hugging Face does not ship, registered with the Auto classes on import.

After ``import stim_hf.models``, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageClassification``
know ``model_type="cifar_resnet"``, so ``AutoModelForImageClassification.from_pretrained(dir)`` loads a
saved CIFAR ResNet without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from stim_hf.models.cifar_resnet import (
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarResNetModel,
)

__all__ = ["CifarResNetConfig", "CifarResNetForImageClassification", "CifarResNetModel", "register_models"]


def register_models() -> None:
    """Register the models of this package with the transformers Auto classes (idempotent)."""
    AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)
    AutoModel.register(CifarResNetConfig, CifarResNetModel, exist_ok=True)
    AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)


register_models()
