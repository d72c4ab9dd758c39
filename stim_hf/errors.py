"""Error types of stim_hf.

Every error a user can cause (a bad config value, an unusable model, broken data) is raised as a
subclass of :class:`StimError`, with a message that names the problem and the fix.
"""

from __future__ import annotations


class StimError(Exception):
    """Base class of every error stim_hf raises on purpose."""


class ConfigError(StimError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown choice or key)."""


class DataError(StimError, ValueError):
    """A dataset, file, column or image cannot be used as given."""


class ModelStructureError(StimError, ValueError):
    """A model cannot be trained stimulatively as given (for example it has no residual stages)."""


class StorageError(StimError, OSError):
    """A folder could not be written (no space, a quota, no permission, a read-only or vanished folder)."""
