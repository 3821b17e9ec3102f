"""Config loading: profiles, overrides, and errors that name the file and the field path."""

from pathlib import Path

import pytest

from lakeray.config import load_settings
from lakeray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lakeray.yaml"
    path.write_text(text)
    return path


def test_repo_example_config_has_local_and_cluster_profiles():
    local = load_settings(REPO / "lakeray.yaml", environ={})
    assert local.profile_name == "local"
    assert local.profile.spark.master == "local[*]"
    assert local.profile.ray.address is None
    assert local.mlflow_tracking_uri == f"sqlite:///{REPO / 'lakehouse'}/mlflow.db"
    cluster = load_settings(REPO / "lakeray.yaml", "cluster", environ={})
    assert cluster.profile.spark.master.startswith("spark://")
    assert cluster.profile.ray.address == "ray://ray-head:10001"
    assert cluster.table_path("t") == "s3a://my-lakehouse/lakeray/tables/t"


def test_profile_chosen_by_env(tmp_path):
    path = write(tmp_path, "profiles:\n  local: {}\n  other:\n    train: {num_workers: 3}\n")
    assert load_settings(path, environ={"LAKERAY_PROFILE": "other"}).profile.train.num_workers == 3


def test_unknown_profile_names_file_and_known_profiles(tmp_path):
    path = write(tmp_path, "profiles:\n  local: {}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, "prod", environ={})
    assert str(path) in err.value.headline and "'prod'" in err.value.headline and "local" in err.value.headline


def test_misspelled_key_names_file_and_field_path(tmp_path):
    path = write(tmp_path, "profiles:\n  local:\n    train:\n      num_worker: 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert f"{path}: profiles.local.train.num_worker: unknown key" in err.value.headline


def test_wrong_type_and_range_name_the_field(tmp_path):
    path = write(tmp_path, "profiles:\n  local:\n    train: {num_workers: 0}\n    serve: {port: high}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert "profiles.local.train.num_workers: Input should be greater than or equal to 1" in err.value.headline
    assert "profiles.local.serve.port" in err.value.headline


def test_bad_spark_master_is_refused(tmp_path):
    path = write(tmp_path, "profiles:\n  local:\n    spark: {master: 'localhost'}\n")
    with pytest.raises(ConfigError, match="profiles.local.spark.master"):
        load_settings(path, environ={})


def test_env_override_is_typed_and_wins_over_file(tmp_path):
    path = write(tmp_path, "profiles:\n  local:\n    train: {num_workers: 2}\n")
    settings = load_settings(path, environ={"LAKERAY_TRAIN__NUM_WORKERS": "4", "LAKERAY_RAY__ADDRESS": "auto"})
    assert settings.profile.train.num_workers == 4
    assert settings.profile.ray.address == "auto"


def test_feature_paths_can_be_set_from_the_environment(tmp_path):
    path = write(tmp_path, "profiles:\n  local:\n    feature_paths: [jobs/features]\n")
    listed = load_settings(path, environ={"LAKERAY_FEATURE_PATHS": "jobs/features, team/jobs"})
    assert listed.profile.feature_paths == ["jobs/features", "team/jobs"]
    as_yaml = load_settings(path, environ={"LAKERAY_FEATURE_PATHS": "[other/jobs]"})
    assert as_yaml.profile.feature_paths == ["other/jobs"]
    # Folder names that YAML would read as a number or a bool stay names.
    assert load_settings(path, environ={"LAKERAY_FEATURE_PATHS": "2024,on"}).profile.feature_paths == ["2024", "on"]
    with pytest.raises(ConfigError, match="LAKERAY_FEATURE_PATHS: feature_paths: List should have at least 1 item"):
        load_settings(path, environ={"LAKERAY_FEATURE_PATHS": ","})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("LAKERAY_TRAIN__NUM_WORKERS", "many", "environment variable LAKERAY_TRAIN__NUM_WORKERS: train.num_workers"),
        ("LAKERAY_TRAIN__NUM_WROKERS", "2", "train.num_wrokers: unknown key"),
        ("LAKERAY_NOPE__X", "1", "nope.x: unknown section"),
        ("LAKERAY_WORKERS", "2", "cannot tell which field"),
    ],
)
def test_bad_env_override_names_the_variable(tmp_path, key, value, expected):
    path = write(tmp_path, "profiles:\n  local: {}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={key: value})
    assert key in err.value.headline and expected in err.value.headline


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "profiles:\n  local: {\n")
    with pytest.raises(ConfigError, match=r"line \d+ is not valid YAML"):
        load_settings(path, environ={})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", environ={})


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = write(tmp_path, "profiles:\n  local:\n    storage: {root: data}\n")
    settings = load_settings(path, environ={})
    assert settings.table_path("events") == f"{tmp_path.resolve()}/data/tables/events"
    with pytest.raises(ConfigError, match="table name"):
        settings.table_path("../escape")


def test_every_config_field_is_documented():
    from lakeray.config import Profile

    doc = (REPO / "docs" / "configuration.md").read_text()
    for section, field in Profile.model_fields.items():
        model = field.annotation
        names = [f"{section}.{name}" for name in model.model_fields] if hasattr(model, "model_fields") else [section]
        for name in names:
            assert f"`{name}`" in doc, f"{name} is missing from docs/configuration.md"
