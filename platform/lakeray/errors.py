"""One exception tree for everything a user can hit.

Every error carries a one-line headline and, where there is one, the fix. The CLI prints
``headline`` and ``fix`` (no traceback unless ``--debug``) and exits non-zero. All of them pickle
with their arguments so they survive crossing a Ray task boundary.
"""

from __future__ import annotations

__all__ = [
    "LakerayError",
    "ConfigError",
    "SetupError",
    "DataQualityError",
    "TableNotFoundError",
    "ClusterError",
    "ModelRegistryError",
]


class LakerayError(Exception):
    """Base of every error a user can hit; ``str()`` is headline plus fix."""

    exit_code = 1

    def __init__(self, headline: str, fix: str | None = None):
        self.headline = headline
        self.fix = fix
        super().__init__(headline, fix)

    def __str__(self) -> str:
        return self.headline if not self.fix else f"{self.headline}\n  fix: {self.fix}"

    def __reduce__(self):
        # Exceptions crossing Ray are pickled; keep both fields (the default reduce keeps args only).
        return (type(self), (self.headline, self.fix))


class ConfigError(LakerayError):
    """A config file or override is invalid; the headline names the file and the field path."""

    exit_code = 2


class SetupError(LakerayError):
    """Something the platform needs is not installed (Java, the Delta jars, a binary)."""

    exit_code = 3


class DataQualityError(LakerayError):
    """Data does not meet what a job or a model declared about it; nothing was written."""


class TableNotFoundError(LakerayError):
    """A Delta table or one of its versions does not exist."""


class ClusterError(LakerayError):
    """Ray could not be reached, started, or did not answer within its timeout."""


class ModelRegistryError(LakerayError):
    """A model, version or alias is missing from the MLflow registry."""
