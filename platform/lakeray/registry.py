"""The MLflow model registry as lakeray uses it: one client factory, aliases resolved to versions.

Below training and serving in the layering: training registers through it, serving resolves through it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


# MLflow retries an HTTP request 7 times with exponential backoff (minutes against a server that is
# down). A lookup fails fast instead, unless the operator set these variables.
_FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_ENV_LOCK = threading.Lock()
_CREDENTIALS = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}


@contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow reads its HTTP retry settings from the environment at each request: set them for this
    lookup only (serialised, so two lookups never remove each other's settings)."""
    with _ENV_LOCK:
        added = [key for key in _FAIL_FAST_ENV if key not in os.environ]
        os.environ.update({key: _FAIL_FAST_ENV[key] for key in added})
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)


def _registry_error(settings: Settings, model_uri: str, exc: Exception) -> ModelRegistryError:
    """A missing model or alias → "not in the registry"; a server that is down, or refuses the
    credentials, or fails otherwise → that cause, with the tracking URI."""
    uri = settings.mlflow_tracking_uri
    code = getattr(exc, "error_code", None)
    text = str(exc)
    lowered = text.lower()
    missing_alias = code == "INVALID_PARAMETER_VALUE" and "alias" in lowered and "not found" in lowered
    if isinstance(exc, ValueError) or code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
        return ModelRegistryError(f"{model_uri} is not in the registry at {uri}",
                                  "train and register a model first (`lakeray demo` or `lakeray train`)")
    fix = "check mlflow.tracking_uri in lakeray.yaml (or LAKERAY_MLFLOW__TRACKING_URI) and MLFLOW_TRACKING_TOKEN"
    if code in _CREDENTIALS:
        status = _CREDENTIALS[code]
        why = "refused the credentials" if status == 401 else "denied access with these credentials"
        return ModelRegistryError(f"the MLflow server at {uri} {why} (HTTP {status}) looking up {model_uri}",
                                  "set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME/PASSWORD) for this "
                                  "server, and check mlflow.tracking_uri")
    if "connection refused" in lowered or "failed to establish a new connection" in lowered:
        return ModelRegistryError(f"cannot reach the MLflow server at {uri}: connection refused", fix)
    if "timed out" in lowered or "timeout" in lowered:
        return ModelRegistryError(f"cannot reach the MLflow server at {uri}: timed out", fix)
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return ModelRegistryError(f"the MLflow registry at {uri} failed looking up {model_uri}: {first_line}", fix)


def resolve_alias(settings: Settings, model_uri: str) -> RegisteredModel:
    """``models:/name@alias`` or ``models:/name/N`` → the concrete registered version.

    A model or alias that is not registered is a ModelRegistryError "not in the registry"; a tracking
    server that is down or refuses the credentials is one naming the server and the cause, within
    seconds (one retry, 15 s timeout, unless ``MLFLOW_HTTP_REQUEST_*`` say otherwise).
    """
    client = mlflow_client(settings)
    rest = model_uri.removeprefix("models:/")
    try:
        with _fail_fast():
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
                return RegisteredModel(name, int(mv.version), alias, mv.run_id)
            name, version = rest.rsplit("/", 1)
            mv = client.get_model_version(name, version)
            return RegisteredModel(name, int(mv.version), None, mv.run_id)
    except Exception as exc:  # MlflowException (missing, unreachable, refused), ValueError for a bad URI
        raise _registry_error(settings, model_uri, exc) from exc
