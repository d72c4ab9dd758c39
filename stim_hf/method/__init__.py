"""The method, without the Trainer: residual stages and model families, sampling, running a sub-network.

Also here: the distillation losses (:mod:`stim_hf.method.losses`) and the BatchNorm handling of
sub-networks (:mod:`stim_hf.method.batchnorm`), imported from their modules.
"""

from stim_hf.method.running import resize_for_subnet, resize_input, use_subnet
from stim_hf.method.sampling import (
    EVAL_SUBNET_STREAM,
    FULL_INPUT_STREAM,
    SAMPLING_RULES,
    Subnet,
    SubnetSampler,
    resolve_sample_space,
    subnet_from_depths,
)
from stim_hf.method.stages import (
    ResidualFamily,
    ResidualStage,
    find_residual_family,
    find_residual_stages,
    identity_shortcut_flags,
    register_stage_finder,
    registered_families,
    zero_init_residual_branches,
)

# Registers the built-in model families (stage finders); after the names above, which it imports.
from stim_hf.method import families  # noqa: E402,F401  isort: skip

__all__ = [
    "EVAL_SUBNET_STREAM",
    "FULL_INPUT_STREAM",
    "SAMPLING_RULES",
    "ResidualFamily",
    "ResidualStage",
    "Subnet",
    "SubnetSampler",
    "find_residual_family",
    "find_residual_stages",
    "identity_shortcut_flags",
    "register_stage_finder",
    "registered_families",
    "resize_for_subnet",
    "resize_input",
    "resolve_sample_space",
    "subnet_from_depths",
    "use_subnet",
    "zero_init_residual_branches",
]
