"""The profile's `scheduler` section: where DAGSTER_HOME is, and Dagster's storage (SQLite or the Postgres
URL named by an environment variable), checked before anything starts. The real Postgres runs are in
tests/spark/test_scheduler_postgres.py."""

import pytest
import yaml

from lakeray.config import load_settings
from lakeray.errors import ConfigError
from lakeray.scheduler.service import check_storage, dagster_home, instance_yaml


def settings_for(tmp_path, profile: str, environ: dict | None = None):
    (tmp_path / "lakeray.yaml").write_text(yaml.safe_dump({"profiles": {"local": yaml.safe_load(profile)}}))
    return load_settings(tmp_path / "lakeray.yaml", "local", environ=environ or {})


def test_default_is_sqlite_under_the_storage_root(tmp_path):
    settings = settings_for(tmp_path, "storage: {root: data}")
    assert dagster_home(settings) == (tmp_path / "data" / "_dagster").resolve()
    text = instance_yaml(settings)
    assert "storage" not in yaml.safe_load(text) and "run_queue" in yaml.safe_load(text)
    assert check_storage(settings) is False  # nothing to connect to


def test_postgres_url_is_an_env_reference_never_the_url(tmp_path):
    settings = settings_for(tmp_path, "scheduler: {postgres_url_env: DAGSTER_PG_URL}")
    config = yaml.safe_load(instance_yaml(settings))
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    assert config["run_queue"]["max_concurrent_runs"] == 1  # the rest of the instance settings stay
    with pytest.raises(ConfigError, match=r"must be the NAME of an environment variable"):
        settings_for(tmp_path, 'scheduler: {postgres_url_env: "postgresql://u:secret@db:5432/dagster"}')


def test_missing_or_wrong_scheme_variable_names_the_setting(tmp_path, monkeypatch):
    settings = settings_for(tmp_path, "scheduler: {postgres_url_env: LR_TEST_PG_URL}")
    monkeypatch.delenv("LR_TEST_PG_URL", raising=False)
    with pytest.raises(ConfigError, match=r"scheduler.postgres_url_env names LR_TEST_PG_URL, which is not set") as err:
        check_storage(settings)
    assert "export LR_TEST_PG_URL=postgresql://" in str(err.value)
    monkeypatch.setenv("LR_TEST_PG_URL", "postgres://u:secret@127.0.0.1:5432/dagster")  # SQLAlchemy refuses it
    with pytest.raises(ConfigError, match=r"LR_TEST_PG_URL \(scheduler.postgres_url_env\) is not a postgresql:// URL") as err:
        check_storage(settings)
    assert "secret" not in str(err.value)


def test_object_store_root_needs_a_local_scheduler_home(tmp_path):
    bucket = "storage: {root: 's3://bucket/lake', endpoint_url: 'http://127.0.0.1:9', allow_http: true}"
    with pytest.raises(ConfigError, match=r"set scheduler.home to a local folder"):
        dagster_home(settings_for(tmp_path, bucket))
    settings = settings_for(tmp_path, bucket + "\nscheduler: {home: state/dagster, postgres_url_env: PG}")
    assert dagster_home(settings) == (tmp_path / "state" / "dagster").resolve()
    with pytest.raises(ConfigError, match=r"scheduler.home: .*must be a local folder"):
        settings_for(tmp_path, "scheduler: {home: 's3://bucket/dagster'}")


def test_scheduler_settings_from_the_environment(tmp_path):
    settings = settings_for(tmp_path, "storage: {root: data}",
                            environ={"LAKERAY_SCHEDULER__POSTGRES_URL_ENV": "PG_URL", "LAKERAY_SCHEDULER__HOME": "/srv/d"})
    assert settings.profile.scheduler.postgres_url_env == "PG_URL" and str(dagster_home(settings)) == "/srv/d"
