"""Models that Hugging Face does not ship, registered with the Auto classes on import.

After ``import stim_hf.models``, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageClassification``
know ``model_type="cifar_resnet"``, so ``AutoModelForImageClassification.from_pretrained(dir)`` loads a
saved CIFAR ResNet without remote code. Every folder such a model is saved to also gets its code
(``configuration_cifar_resnet.py``, ``modeling_cifar_resnet.py``) and an ``auto_map`` in
``config.json`` (``register_for_auto_class``), so it loads with transformers alone and
``trust_remote_code=True`` where stim_hf is not installed. Where stim_hf is imported, the classes
registered here win over that code, whatever ``trust_remote_code`` says (transformers prefers a
registered class to remote code of the same ``model_type``).
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from stim_hf.models.cifar_resnet import (
    CifarResNetConfig,
    CifarResNetConfigError,
    CifarResNetForImageClassification,
    CifarResNetModel,
)

__all__ = [
    "CifarResNetConfig",
    "CifarResNetConfigError",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "register_models",
]


def register_models() -> None:
    """Register the models of this package with the transformers Auto classes, and their code for saving (idempotent).

    Why both: the registration loads saved folders inside stim_hf without remote code; the code
    saved beside the weights loads them anywhere else.
    """
    AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)
    AutoModel.register(CifarResNetConfig, CifarResNetModel, exist_ok=True)
    AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)
    CifarResNetConfig.register_for_auto_class("AutoConfig")
    CifarResNetModel.register_for_auto_class("AutoModel")
    CifarResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")


register_models()
