"""Project configuration: named profiles in ``lakeray.yaml``, validated by pydantic.

Resolution order (later wins): built-in defaults < the profile in the YAML file < ``LAKERAY_*``
environment overrides. The profile is ``--profile``, else ``LAKERAY_PROFILE``, else the file's
``default_profile``. Overrides use ``__`` between levels, e.g. ``LAKERAY_RAY__ADDRESS=auto`` or
``LAKERAY_TRAIN__NUM_WORKERS=4``. Values are parsed by the type of the field they set
(pydantic-settings): ``LAKERAY_MLFLOW__EXPERIMENT=2024`` stays the string ``"2024"``, ``4`` becomes an
int for an int field, a dict or list field takes JSON. Section and field names are case-insensitive;
keys below a dict field keep their case (``LAKERAY_SPARK__CONF__spark.sql.adaptive.coalescePartitions.enabled``).

Every validation error is a :class:`~lakeray.errors.ConfigError` naming the file (or the
environment variable) and the field path, e.g.
``lakeray.yaml: profiles.local.train.num_workers: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lakeray import storage
from lakeray.errors import ConfigError

__all__ = [
    "SparkConfig",
    "RayConfig",
    "StorageConfig",
    "MlflowConfig",
    "TrainConfig",
    "ServeConfig",
    "TrainingSetsConfig",
    "SchedulerPostgresConfig",
    "SchedulerConfig",
    "Profile",
    "ProjectConfig",
    "Settings",
    "load_settings",
    "CONFIG_FILE_NAME",
]

CONFIG_FILE_NAME = "lakeray.yaml"
_ENV_PREFIX = "LAKERAY_"
# Environment variables that steer loading itself rather than override a profile field.
# LAKERAY_CLUSTER_NODE tags every process of a `lakeray cluster up` node (how `down` finds them): a
# lakeray command run inside the cluster (a job's driver, a task) inherits it and must still load.
_RESERVED_ENV = {"LAKERAY_PROFILE", "LAKERAY_CONFIG", "LAKERAY_DEBUG", "LAKERAY_CACHE", "LAKERAY_CLUSTER_NODE"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SparkConfig(_Model):
    master: str = Field("local[*]", description="Spark master: local[*], local[N] or spark://host:port.")
    app_name: str = Field("lakeray", description="Spark application name shown in the Spark UI.")
    driver_memory: str = Field("4g", description="spark.driver.memory (local mode holds everything).")
    shuffle_partitions: int = Field(8, ge=1, description="spark.sql.shuffle.partitions; small for laptops.")
    jars_dir: str | None = Field(
        None,
        description="Folder with the Delta jars resolved by `lakeray setup`, relative to the project; empty: "
        "the per-user cache ~/.cache/lakeray/jars/<coordinate> (or $LAKERAY_CACHE/jars/…), shared by projects.",
    )
    ui: bool = Field(False, description="Start the Spark UI (port 4040).")
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark conf, applied last.")

    @field_validator("master")
    @classmethod
    def _known_master(cls, value: str) -> str:
        if re.fullmatch(r"local(\[(\*|\d+)\])?", value) or value.startswith(("spark://", "k8s://", "yarn")):
            return value
        raise ValueError("must be local[*], local[N], spark://host:port, k8s://… or yarn")


class RayConfig(_Model):
    address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or 'auto'); empty starts a local Ray."
    )
    num_cpus: int | None = Field(
        None,
        ge=2,
        description="Logical CPUs of a local Ray. Default: physical cores + 2, so Ray Data and Ray Train "
        "cannot take every CPU from each other on a 2-core machine.",
    )
    object_store_memory_mb: int | None = Field(None, ge=128, description="Object store size of a local Ray.")
    op_timeout_s: float = Field(900, gt=0, description="Upper bound on any single Ray wait (fit, deploy).")
    dashboard_address: str | None = Field(
        None,
        description="Ray dashboard / Jobs API of a remote cluster (http://head:8265) for `lakeray jobs`; empty: "
        "the `lakeray cluster up` cluster of this storage root.",
    )

    @field_validator("dashboard_address")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"https?://[^/\s]+/?", value):
            raise ValueError("must be http(s)://host:port (the Ray dashboard, not the GCS or ray:// address)")
        return value.rstrip("/") if value else value


class StorageConfig(_Model):
    root: str = Field(
        "lakehouse",
        description="Lakehouse root (a folder, relative to the project, or an object-store URI). "
        "Tables live under <root>/tables/<name>.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (http(s)://host:port) for an s3:// or s3a:// root; empty: AWS S3 "
        "itself. The same settings feed Spark (spark.hadoop.fs.s3a.*), deltalake and pyarrow.",
    )
    region: str = Field("us-east-1", description="Object-store region (any value for most S3-compatible servers).")
    access_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the access key id (never the key itself); empty: "
        "the default AWS credential chain (AWS_ACCESS_KEY_ID, instance identity).",
    )
    secret_key_env: str | None = Field(
        None, description="Name of the environment variable holding the secret access key (never the secret)."
    )
    path_style: bool = Field(
        False, description="Path-style requests (http://host/bucket/key), as MinIO and S3Proxy need; off: "
        "virtual-hosted style (http://bucket.host/key), as AWS prefers.")
    allow_http: bool = Field(False, description="Allow a plain-http endpoint_url (a store on a trusted network).")
    timeout_s: float = Field(
        30, gt=0, description="Upper bound on one object-store request, so a wrong endpoint or credentials fail "
        "with an error naming the setting instead of retrying for minutes.")

    @field_validator("access_key_env", "secret_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must be the NAME of an environment variable (the secret itself stays out of the file)")
        return value

    @property
    def is_object_store(self) -> bool:
        return bool(self.endpoint_url) or not storage.is_local(self.root)


class MlflowConfig(_Model):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; empty means sqlite:///<storage.root>/mlflow.db."
    )
    experiment: str = Field("lakeray", description="MLflow experiment that training runs log to.")
    model_name: str = Field("lakeray_fraud_xgb", description="Registered model name for the demo model.")


def _default_xgb_params() -> dict[str, Any]:
    return {
        "objective": "binary:logistic",
        "eval_metric": "auc",
        "tree_method": "hist",
        "max_depth": 6,
        "eta": 0.1,
        "subsample": 0.8,
        "seed": 7,
    }


class TrainConfig(_Model):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel XGBoost ranks).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs (and XGBoost threads) per worker.")
    use_gpu: bool = Field(False, description="Train on one GPU per worker (device=cuda).")
    num_boost_round: int = Field(100, ge=1, description="XGBoost boosting rounds.")
    report_every: int = Field(
        0,
        ge=0,
        description="Report metrics and checkpoint every N rounds; 0 only at the end. Per-round "
        "reporting costs ~2 s a report through Ray Train (see DESIGN.md).",
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out share of rows for the AUC.")
    params: dict[str, Any] = Field(default_factory=_default_xgb_params, description="xgboost.train params.")


class ServeConfig(_Model):
    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port.")
    fast_proxy: bool = Field(
        True,
        description="Use Ray Serve's HAProxy ingress and throughput-optimised mode (≈5× the default proxy "
        "on 2 cores); falls back with a warning when haproxy is missing.",
    )
    num_replicas: int = Field(1, ge=1, description="Replicas of the model deployment.")
    replica_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica.")
    max_batch_rows: int = Field(10_000, ge=1, description="Largest number of rows one request may carry.")


class TrainingSetsConfig(_Model):
    engine: Literal["auto", "duckdb", "spark"] = Field(
        "auto",
        description="Point-in-time join engine: duckdb (in process, no JVM), spark, or auto: duckdb when "
        "the profile is local (local Spark master, local storage) and the pinned inputs are at most "
        "duckdb_max_input_mb of Delta files, else spark. A training-set spec's own `engine` wins.",
    )
    duckdb_max_input_mb: int | None = Field(
        None, ge=1, description="Largest input (sum of the pinned versions' Delta file sizes) auto sends to "
        "duckdb. Default: 1/8 of the machine's memory (the inputs are held as Arrow, ~3-5x their parquet size).")
    duckdb_memory_limit_mb: int | None = Field(
        None, ge=64, description="DuckDB's memory limit; past it the join spills to <storage.root>/_tmp/duckdb. "
        "Default: half of the machine's memory.")
    duckdb_spill: bool = Field(
        True, description="Let DuckDB spill past its memory limit to <storage.root>/_tmp/duckdb. Off: a duckdb "
        "build whose inputs would not fit the limit (estimated at 4x their Delta file size) is refused up front.")


class SchedulerPostgresConfig(_Model):
    host: str | None = Field(
        None, description="Postgres host of Dagster's run, event-log and schedule storage; empty: SQLite files in "
        "the scheduler's home.")
    port: int = Field(5432, ge=1, le=65535, description="Postgres port.")
    database: str = Field("dagster", min_length=1, description="Database (created beforehand; Dagster creates its "
                          "tables in it).")
    user: str = Field("dagster", min_length=1, description="Postgres user.")
    password_env: str | None = Field(
        None, description="Name of the environment variable holding the user's password (never the password); "
        "empty: no password (trust, or libpq's PGPASSWORD / ~/.pgpass).")
    params: dict[str, str] = Field(
        default_factory=dict, description="Extra libpq connection parameters, e.g. {sslmode: require}.")

    @field_validator("password_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must be the NAME of an environment variable (the password stays out of the file)")
        return value


class SchedulerConfig(_Model):
    home: str | None = Field(
        None, description="Local folder for the scheduler's DAGSTER_HOME (dagster.yaml, workspace.yaml, state.json, "
        "the daemon's and webserver's logs, compute logs), relative to the project; empty: <storage.root>/_dagster, "
        "which needs a local storage.root.")
    postgres: SchedulerPostgresConfig = Field(
        default_factory=SchedulerPostgresConfig, description="Dagster's storage in Postgres (set host); "
        "default: SQLite in the scheduler's home.")

    @field_validator("home")
    @classmethod
    def _local_home(cls, value: str | None) -> str | None:
        if value and not storage.is_local(value):
            raise ValueError("must be a local folder (the scheduler's pids, logs and config files)")
        return value


class Profile(_Model):
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    training_sets: TrainingSetsConfig = Field(default_factory=TrainingSetsConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    feature_paths: list[str] = Field(
        default_factory=lambda: ["jobs/features"],
        min_length=1,
        description="Folders (relative to the project) whose *.py files hold feature jobs.",
    )

    @field_validator("feature_paths", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # One string (from LAKERAY_FEATURE_PATHS=a,b or `feature_paths: a`) is a comma-separated list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class ProjectConfig(_Model):
    default_profile: str = Field("local", description="Profile used when none is named.")
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"local": Profile()})


@dataclass(frozen=True)
class Settings:
    """A resolved profile plus where it came from; the one object passed around."""

    profile_name: str
    profile: Profile
    project_dir: Path
    source: str

    def resolve(self, path_or_uri: str) -> str:
        """A project-relative path made absolute; URIs (``s3://…``) are returned as they are."""
        if not storage.is_local(path_or_uri):
            return path_or_uri
        path_or_uri = path_or_uri.removeprefix("file://")
        path = Path(path_or_uri).expanduser()
        return str(path if path.is_absolute() else (self.project_dir / path).resolve())

    @property
    def storage_root(self) -> str:
        return self.resolve(self.profile.storage.root)

    def table_path(self, table_name: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table_name):
            raise ConfigError(
                f"table name {table_name!r} is not valid",
                "use letters, digits and underscores, starting with a letter",
            )
        return storage.join(self.storage_root, "tables", table_name)

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.profile.mlflow.tracking_uri:
            return self.profile.mlflow.tracking_uri
        return f"sqlite:///{self.storage_root}/mlflow.db"

    @property
    def mlflow_artifact_root(self) -> str:
        return storage.join(self.storage_root, "mlartifacts")


def parse_spec(model: type[BaseModel], data: Any, where: str, example: str, fix: str,
               keys_doc: str | None = None) -> Any:
    """``model`` validated from a YAML document; a ConfigError naming ``where`` and each field path
    (``jobs/training/x.yaml: split.fraction: Input should be less than 1``) otherwise. ``keys_doc``:
    the page an unknown key's message points to."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping", f"see {example} for an example")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        def message(error: Any) -> str:
            if keys_doc and error["type"] == "extra_forbidden":
                return f"unknown key (misspelled? {keys_doc} lists the keys)"
            return str(error["msg"]).removeprefix("Value error, ")

        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {message(e)}" for e in exc.errors())
        raise ConfigError(f"{where}: {fields}", fix) from None


def read_spec_file(path: str | os.PathLike[str], what: str, example: str) -> Any:
    """A spec file's YAML document; ConfigError for a missing file or invalid YAML."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", f"pass a YAML file such as {example}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {getattr(exc, 'problem', exc)}", "fix the YAML") from None


def _format_errors(where: str, prefix: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelled? see docs/configuration.md for the keys)"
        lines.append(f"{where}: {loc}: {msg}")
    return "; ".join(lines)


# Profile fields outside any section (set as LAKERAY_<FIELD>, e.g. LAKERAY_FEATURE_PATHS=a,b).
_TOP_LEVEL_FIELDS = frozenset(
    name for name, f in Profile.model_fields.items()
    if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))
)


def _env_field_path(key: str) -> list[str]:
    """The field path ``key`` sets: model field names lower-cased, the rest below a dict field as written."""
    parts = key[len(_ENV_PREFIX) :].split("__")
    if not all(parts) or (len(parts) == 1 and parts[0].lower() not in _TOP_LEVEL_FIELDS):
        raise ConfigError(
            f"environment variable {key}: cannot tell which field it sets",
            "use LAKERAY_<SECTION>__<FIELD>, e.g. LAKERAY_RAY__ADDRESS=auto "
            f"(top-level fields: {', '.join('LAKERAY_' + f.upper() for f in sorted(_TOP_LEVEL_FIELDS))})",
        )
    model: type[BaseModel] | None = Profile
    path: list[str] = []
    for index, part in enumerate(parts):
        if model is None:  # below a dict field: one key, case kept (Spark and XGBoost keys are case-sensitive)
            path.append("__".join(parts[index:]))
            break
        name = part.lower()
        field = model.model_fields.get(name)
        last = index == len(parts) - 1
        if field is None or (not last and _section(field.annotation) is None and not _is_dict(field.annotation)):
            where = ".".join([*path, *(p.lower() for p in parts[index:])])
            if not last:
                raise ConfigError(f"environment variable {key}: {where}: unknown section",
                                  "see docs/configuration.md for the sections")
            raise ConfigError(f"environment variable {key}: {where}: unknown key (misspelled? see "
                              "docs/configuration.md for the keys)", f"correct or unset {key}")
        path.append(name)
        model = _section(field.annotation)
    return path


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_dict(annotation: Any) -> bool:
    from typing import get_origin

    return annotation is dict or get_origin(annotation) is dict


@lru_cache(maxsize=1)
def _env_source_class():
    """A pydantic-settings source over the profile's sections, reading a given mapping, not os.environ."""
    from pydantic import create_model
    from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
    from pydantic_settings.sources.utils import parse_env_vars

    class _Base(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="lakeray_", env_nested_delimiter="__", case_sensitive=True,
                                          env_parse_none_str="null", extra="ignore")

    sections = create_model("ProfileSections", __base__=_Base, **{
        name: (field.annotation, None) for name, field in Profile.model_fields.items()
        if name not in _TOP_LEVEL_FIELDS})

    class MappingSource(EnvSettingsSource):
        def __init__(self, environ: Mapping[str, str]) -> None:
            self._mapping = environ
            super().__init__(sections)

        def _load_env_vars(self) -> Mapping[str, str | None]:
            return parse_env_vars(self._mapping, True, False, "null")

    return MappingSource


def _env_value(key: str, path: list[str], raw: str) -> Any:
    """``raw`` parsed as the field at ``path`` expects it (pydantic-settings), ConfigError naming ``key``."""
    from pydantic_settings import SettingsError

    if raw == "":
        raw = "null"  # an empty variable unsets an optional field, as `key:` does in YAML
    name = "lakeray_" + "__".join(path)
    try:
        value: Any = _env_source_class()({name: raw})()
    except SettingsError as exc:
        raise ConfigError(f"environment variable {key}: {'.'.join(path)}: not valid for this field ({exc.__cause__ or exc})",
                          f"a dict or list field takes JSON, e.g. {key}='{{\"k\": \"v\"}}'") from None
    for part in path:
        value = value[part]
    return value


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, list[str], Any]]:
    import yaml

    overrides = []
    for key, raw in sorted(environ.items()):
        if not key.upper().startswith(_ENV_PREFIX) or key.upper() in _RESERVED_ENV:
            continue
        path = _env_field_path(key)
        if len(path) == 1:  # a top-level list (feature_paths): comma-separated, or a YAML list
            value: Any = raw
            if raw.lstrip().startswith("["):
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError:
                    value = raw
        else:
            value = _env_value(key, path, raw)
        overrides.append((key, path, value))
    return overrides


def _find_config(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist", "pass an existing lakeray.yaml")
        return path
    if environ.get("LAKERAY_CONFIG"):
        path = Path(environ["LAKERAY_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"LAKERAY_CONFIG={path}: file does not exist", "point it at a lakeray.yaml")
        return path
    candidate = Path.cwd() / CONFIG_FILE_NAME
    return candidate if candidate.is_file() else None


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load, select and validate a profile. Raises ConfigError naming file and field."""
    import yaml

    environ = os.environ if environ is None else environ
    path = _find_config(config_path, environ)
    where = str(path) if path else "<built-in defaults>"
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{where}:{at} is not valid YAML: {getattr(exc, 'problem', exc)}",
                              "fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: top level must be a mapping", "see lakeray.yaml in the repo")
    try:
        project = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(where, "", exc), "correct the field named above") from None

    name = profile or environ.get("LAKERAY_PROFILE") or project.default_profile
    if name not in project.profiles:
        known = ", ".join(sorted(project.profiles)) or "none"
        raise ConfigError(
            f"{where}: unknown profile {name!r} (profiles: {known})",
            "pass --profile with one of those, or add it under profiles:",
        )
    data = project.profiles[name].model_dump()
    for key, field_path, value in _env_overrides(environ):
        node = data
        for part in field_path[:-1]:  # sections always exist; a dict field may be None in the file
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[field_path[-1]] = value
        try:
            Profile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_errors(f"environment variable {key}", "", exc),
                              f"correct or unset {key}") from None
    resolved = Profile.model_validate(data)
    project_dir = path.parent.resolve() if path else Path.cwd().resolve()
    if resolved.storage.is_object_store:
        # Readers that get a path only (Delta readers, ingest) use the loaded profile's object store.
        storage.configure(resolved.storage)
    return Settings(profile_name=name, profile=resolved, project_dir=project_dir, source=where)
