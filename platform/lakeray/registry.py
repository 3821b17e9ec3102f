"""The MLflow model registry as lakeray uses it: one client factory, aliases resolved to versions.

Below training and serving in the layering: training registers through it, serving resolves through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakeray.errors import ModelRegistryError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["RegisteredModel", "mlflow_client", "resolve_alias"]


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: int
    alias: str | None
    run_id: str

    @property
    def uri(self) -> str:
        """The alias URI when there is one (what Serve loads), else the version URI."""
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def mlflow_client(settings: Settings):
    """Point MLflow at the profile's store (creating the local SQLite folder) and return a client."""
    import os

    import mlflow

    # MLflow 3 warns about filesystem stores and prints a banner per run; keep the CLI output readable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_alias(settings: Settings, model_uri: str) -> RegisteredModel:
    """``models:/name@alias`` or ``models:/name/N`` → the concrete registered version."""
    client = mlflow_client(settings)
    rest = model_uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
            return RegisteredModel(name, int(mv.version), alias, mv.run_id)
        name, version = rest.rsplit("/", 1)
        mv = client.get_model_version(name, version)
        return RegisteredModel(name, int(mv.version), None, mv.run_id)
    except Exception as exc:  # MlflowException for a missing model/alias, ValueError for a bad URI
        raise ModelRegistryError(f"{model_uri} is not in the registry at {settings.mlflow_tracking_uri}",
                                 "train and register a model first (`lakeray demo` or `lakeray train`)") from exc
