"""LAKERAY_* environment overrides are parsed by the type of the field they set (pydantic-settings);
section and field names are case-insensitive, keys below a dict field keep their case."""

from pathlib import Path

import pytest

from lakeray.config import load_settings
from lakeray.errors import ConfigError


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "lakeray.yaml"
    path.write_text("profiles:\n  local:\n    train:\n      params: {max_depth: 6}\n")
    return path


def test_a_string_field_keeps_a_value_that_looks_like_a_number(config):
    settings = load_settings(config, environ={"LAKERAY_MLFLOW__EXPERIMENT": "2024", "LAKERAY_SERVE__HOST": "0.0.0.0",
                                               "LAKERAY_MLFLOW__MODEL_NAME": "yes"})
    assert settings.profile.mlflow.experiment == "2024"
    assert settings.profile.serve.host == "0.0.0.0"
    assert settings.profile.mlflow.model_name == "yes"  # not True


def test_typed_fields_are_converted(config):
    settings = load_settings(config, environ={"LAKERAY_TRAIN__NUM_WORKERS": "4", "LAKERAY_SERVE__FAST_PROXY": "false",
                                               "LAKERAY_TRAIN__TEST_FRACTION": "0.25", "LAKERAY_RAY__ADDRESS": "null"})
    assert settings.profile.train.num_workers == 4 and settings.profile.serve.fast_proxy is False
    assert settings.profile.train.test_fraction == 0.25 and settings.profile.ray.address is None


def test_dict_keys_keep_their_case_and_merge_with_the_file(config):
    settings = load_settings(config, environ={
        "LAKERAY_SPARK__CONF__spark.sql.adaptive.coalescePartitions.enabled": "false",
        "LAKERAY_TRAIN__PARAMS__tree_method": "approx",
        "lakeray_train__params__colsample_byTree": "0.5",  # field names in any case
    })
    assert settings.profile.spark.conf == {"spark.sql.adaptive.coalescePartitions.enabled": "false"}
    params = settings.profile.train.params
    assert params["tree_method"] == "approx" and params["colsample_byTree"] == "0.5"
    assert params["max_depth"] == 6  # from the file, untouched


def test_a_whole_dict_can_be_given_as_json(config):
    settings = load_settings(config, environ={"LAKERAY_SPARK__CONF": '{"spark.sql.ansi.enabled": "true"}'})
    assert settings.profile.spark.conf == {"spark.sql.ansi.enabled": "true"}
    with pytest.raises(ConfigError) as err:
        load_settings(config, environ={"LAKERAY_SPARK__CONF": "{not json"})
    assert "LAKERAY_SPARK__CONF" in err.value.headline and "spark.conf" in err.value.headline


def test_a_value_of_the_wrong_type_names_the_variable_and_field(config):
    with pytest.raises(ConfigError) as err:
        load_settings(config, environ={"LAKERAY_SERVE__PORT": "high"})
    assert "environment variable LAKERAY_SERVE__PORT: serve.port" in err.value.headline
