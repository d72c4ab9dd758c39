"""The sub-network engine: residual stages, sampling, running a model as a sub-network."""

from stim_hf.subnets.running import use_subnet
from stim_hf.subnets.sampling import (
    SAMPLING_RULES,
    Subnet,
    SubnetSampler,
    resolve_sample_space,
    subnet_from_depths,
)
from stim_hf.subnets.stages import (
    ResidualFamily,
    ResidualStage,
    find_residual_family,
    find_residual_stages,
    identity_shortcut_flags,
    register_stage_finder,
    registered_families,
)

__all__ = [
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
    "resolve_sample_space",
    "subnet_from_depths",
    "use_subnet",
]
