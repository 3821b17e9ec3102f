"""The profile's `scheduler` section: where DAGSTER_HOME is, and Dagster's storage (SQLite, or Postgres
with the password's environment variable named), checked before anything starts. The real Postgres runs are in
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


def test_postgres_storage_names_the_password_variable_never_the_password(tmp_path):
    settings = settings_for(tmp_path, "scheduler: {postgres: {host: db.internal, password_env: DAGSTER_PG_PASSWORD, "
                                      "params: {sslmode: require}}}")
    config = yaml.safe_load(instance_yaml(settings))
    assert config["storage"] == {"postgres": {"postgres_db": {
        "username": "dagster", "hostname": "db.internal", "port": 5432, "db_name": "dagster",
        "scheme": "postgresql+psycopg2", "password": {"env": "DAGSTER_PG_PASSWORD"}, "params": {"sslmode": "require"}}}}
    assert config["run_queue"]["max_concurrent_runs"] == 1  # the rest of the instance settings stay
    with pytest.raises(ConfigError, match=r"must be the NAME of an environment variable"):
        settings_for(tmp_path, "scheduler: {postgres: {host: db, password_env: 's3cret pw!'}}")
    with pytest.raises(ConfigError, match=r"scheduler.postgres.port: Input should be less than or equal to 65535"):
        settings_for(tmp_path, "scheduler: {postgres: {host: db, port: 99999}}")


def test_missing_password_variable_names_the_setting(tmp_path, monkeypatch):
    settings = settings_for(tmp_path, "scheduler: {postgres: {host: 127.0.0.1, password_env: LR_TEST_PG_PW}}")
    monkeypatch.delenv("LR_TEST_PG_PW", raising=False)
    with pytest.raises(ConfigError, match=r"scheduler.postgres.password_env names LR_TEST_PG_PW, which is not set") as err:
        check_storage(settings)
    assert "export LR_TEST_PG_PW=" in str(err.value)


def test_object_store_root_needs_a_local_scheduler_home(tmp_path):
    bucket = "storage: {root: 's3://bucket/lake', endpoint_url: 'http://127.0.0.1:9', allow_http: true}"
    with pytest.raises(ConfigError, match=r"set scheduler.home to a local folder"):
        dagster_home(settings_for(tmp_path, bucket))
    settings = settings_for(tmp_path, bucket + "\nscheduler: {home: state/dagster, postgres: {host: db}}")
    assert dagster_home(settings) == (tmp_path / "state" / "dagster").resolve()
    with pytest.raises(ConfigError, match=r"scheduler.home: .*must be a local folder"):
        settings_for(tmp_path, "scheduler: {home: 's3://bucket/dagster'}")


def test_scheduler_settings_from_the_environment(tmp_path):
    settings = settings_for(tmp_path, "storage: {root: data}",
                            environ={"LAKERAY_SCHEDULER__POSTGRES__HOST": "db", "LAKERAY_SCHEDULER__POSTGRES__PORT": "6432",
                                     "LAKERAY_SCHEDULER__HOME": "/srv/d"})
    assert (settings.profile.scheduler.postgres.host, settings.profile.scheduler.postgres.port) == ("db", 6432)
    assert str(dagster_home(settings)) == "/srv/d"
