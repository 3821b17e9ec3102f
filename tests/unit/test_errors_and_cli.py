"""Errors pickle across Ray, and the CLI turns them into one clear line and an exit code."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lakeray.errors import ConfigError, DataQualityError, LakerayError, SetupError, TableNotFoundError

LAKERAY = str(Path(sys.executable).parent / "lakeray")


@pytest.mark.parametrize("cls", [LakerayError, ConfigError, SetupError, DataQualityError, TableNotFoundError])
def test_errors_pickle_with_headline_and_fix(cls):
    err = pickle.loads(pickle.dumps(cls("what went wrong", "what to do")))
    assert type(err) is cls and err.headline == "what went wrong" and err.fix == "what to do"
    assert str(err) == "what went wrong\n  fix: what to do"


def test_cli_prints_config_error_without_traceback(tmp_path):
    cfg = tmp_path / "lakeray.yaml"
    cfg.write_text("profiles:\n  local:\n    train: {num_workers: zero}\n")
    result = subprocess.run([LAKERAY, "--config", str(cfg), "config", "show"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {cfg}: profiles.local.train.num_workers" in result.stderr
    assert "fix:" in result.stderr


def test_cli_unknown_profile(tmp_path):
    cfg = tmp_path / "lakeray.yaml"
    cfg.write_text("profiles:\n  local: {}\n")
    result = subprocess.run([LAKERAY, "--config", str(cfg), "--profile", "prod", "config", "validate"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown profile 'prod'" in result.stderr


def test_cli_config_show_applies_env_overrides(tmp_path):
    cfg = tmp_path / "lakeray.yaml"
    cfg.write_text("profiles:\n  local: {}\n")
    env = {"PATH": "/usr/bin:/bin", "LAKERAY_SERVE__PORT": "9123"}
    result = subprocess.run([LAKERAY, "--config", str(cfg), "config", "show"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "port: 9123" in result.stdout


def test_missing_jars_is_a_setup_error_naming_make_setup(tmp_path):
    from lakeray.lakehouse.spark import delta_jars

    with pytest.raises(SetupError) as err:
        delta_jars(tmp_path)
    assert "make setup" in err.value.fix


def test_missing_java_is_a_setup_error(monkeypatch):
    from lakeray.lakehouse.spark import check_java

    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SetupError, match="Java was not found"):
        check_java()


def test_demo_without_jars_exits_with_setup_message(tmp_path):
    cfg = tmp_path / "lakeray.yaml"
    cfg.write_text(f"profiles:\n  local:\n    spark: {{jars_dir: {tmp_path / 'nojars'}}}\n"
                   f"    storage: {{root: {tmp_path / 'lh'}}}\n")
    result = subprocess.run([LAKERAY, "--config", str(cfg), "demo", "--rows", "1000"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3
    assert "Delta jars" in result.stderr and "make setup" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "lh" / "tables").exists()


@pytest.mark.parametrize(("reported", "refused"), [('java version "1.8.0_402"', True),
                                                    ('openjdk version "11.0.22" 2024-01-16', True),
                                                    ('openjdk version "17.0.15" 2025-04-15', False),
                                                    ('openjdk version "21" 2023-09-19', False)])
def test_java_older_than_17_is_a_setup_error(tmp_path, monkeypatch, reported, refused):
    from lakeray.lakehouse.spark import check_java

    # A stand-in JDK whose `java -version` says `reported` on stderr, as real ones do.
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text(f"#!/bin/sh\necho '{reported}' >&2\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    if refused:
        with pytest.raises(SetupError, match="needs Java 17 or newer") as err:
            check_java()
        assert str(java) in err.value.headline and "JAVA_HOME" in err.value.fix
    else:
        assert check_java() == str(java)


def test_a_taken_serve_port_is_refused_before_serve_starts():
    import socket

    from lakeray.errors import ClusterError
    from lakeray.serving.deploy import _refuse_busy_port, _url_host

    with socket.socket() as other:  # any program listening there, HTTP or not
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} on 127.0.0.1 is already in use") as err:
            _refuse_busy_port("127.0.0.1", port)
        assert "LAKERAY_SERVE__PORT" in err.value.fix
    _refuse_busy_port("127.0.0.1", port)  # closed again: free, no error
    assert _url_host("::1") == "[::1]" and _url_host("127.0.0.1") == "127.0.0.1"
