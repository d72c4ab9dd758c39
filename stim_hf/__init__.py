"""stim_hf: stimulative training (ST, ST++) of residual networks for the Hugging Face Trainer."""

from stim_hf import (
    _moved,
    models,  # noqa: F401  (registers the CIFAR ResNets with the Auto classes)
)
from stim_hf.errors import ConfigError, DataError, ModelStructureError, StimError, StorageError
from stim_hf.method import (
    ResidualStage,
    Subnet,
    SubnetSampler,
    find_residual_stages,
    register_stage_finder,
    subnet_from_depths,
    use_subnet,
)
from stim_hf.training.config import ModelArguments, StimulativeTrainingArguments
from stim_hf.training.trainer import StimulativeTrainer

_moved.install()  # the module paths from before the subpackages (stim_hf.trainer, ...), with a warning

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "ModelArguments",
    "ModelStructureError",
    "ResidualStage",
    "StimError",
    "StimulativeTrainer",
    "StimulativeTrainingArguments",
    "StorageError",
    "Subnet",
    "SubnetSampler",
    "find_residual_stages",
    "register_stage_finder",
    "subnet_from_depths",
    "use_subnet",
]
