"""The Delta jars are cached once per user, resolved atomically, and an explicit spark.jars_dir still wins."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lakeray.config import load_settings
from lakeray.errors import SetupError
from lakeray.lakehouse.spark import DELTA_PACKAGE, delta_jars, delta_jars_dir, resolve_delta_jars, user_cache_dir

REPO = Path(__file__).resolve().parents[2]


def fake_jar_set(folder: Path, jars: int = 3) -> Path:
    """A complete cached set as `lakeray setup` leaves it: jars plus the RESOLVED marker."""
    folder.mkdir(parents=True)
    for i in range(jars):
        (folder / f"dep-{i}.jar").write_bytes(b"PK" + bytes([i]) * 1000)
    (folder / "RESOLVED").write_text(DELTA_PACKAGE + "\n")
    return folder


def test_default_is_the_user_cache_named_after_the_coordinate(tmp_path, monkeypatch):
    monkeypatch.delenv("LAKERAY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    projects = []
    for name in ("p1", "p2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lakeray.yaml").write_text("default_profile: local\n")
        projects.append(delta_jars_dir(load_settings(tmp_path / name / "lakeray.yaml", environ={})))
    one, two = projects
    assert one == two == tmp_path / "home" / ".cache" / "lakeray" / "jars" / "io.delta_delta-spark_4.2_2.13_4.4.0"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "lakeray"
    monkeypatch.setenv("LAKERAY_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    # LAKERAY_CACHE steers the cache; it is not read as a profile override (which would be refused).
    settings = load_settings(None, environ={"LAKERAY_CACHE": str(tmp_path / "mine")})
    assert delta_jars_dir(settings).parent == tmp_path / "mine" / "jars"


def test_an_explicit_jars_dir_is_relative_to_the_project(tmp_path):
    config = tmp_path / "lakeray.yaml"
    config.write_text("profiles:\n  local:\n    spark: {jars_dir: vendor/jars}\n")
    assert delta_jars_dir(load_settings(config, environ={})) == tmp_path.resolve() / "vendor" / "jars"
    env = {"LAKERAY_SPARK__JARS_DIR": str(tmp_path / "elsewhere")}
    assert delta_jars_dir(load_settings(config, environ=env)) == tmp_path / "elsewhere"


def test_missing_or_foreign_sets_are_a_setup_error(tmp_path):
    with pytest.raises(SetupError, match="not cached") as err:
        delta_jars(tmp_path / "absent")
    assert "lakeray setup" in err.value.fix
    other = fake_jar_set(tmp_path / "other")
    (other / "RESOLVED").write_text("io.delta:delta-spark_4.0_2.13:4.0.0\n")
    with pytest.raises(SetupError):
        delta_jars(other)


def test_resolve_takes_a_seed_and_replaces_an_incomplete_folder(tmp_path):
    seed = fake_jar_set(tmp_path / "legacy")
    target = tmp_path / "cache" / "jars" / "delta"
    target.mkdir(parents=True)
    (target / "half-written.jar").write_bytes(b"PK")  # no RESOLVED marker: an interrupted older resolve
    jars = resolve_delta_jars(target, seeds=(tmp_path / "missing", seed))
    assert sorted(Path(j).name for j in jars) == ["dep-0.jar", "dep-1.jar", "dep-2.jar"]
    assert (target / "RESOLVED").read_text().strip() == DELTA_PACKAGE
    assert sorted(p.name for p in target.parent.iterdir()) == ["delta"]  # no staging or stale folders left
    # Cached: a no-op that does not look at the seeds again.
    assert resolve_delta_jars(target, seeds=()) == jars


def test_two_processes_resolving_at_once_both_succeed(tmp_path):
    seed = fake_jar_set(tmp_path / "legacy", jars=40)
    target = tmp_path / "cache" / "jars" / "delta"
    code = textwrap.dedent(f"""
        from pathlib import Path
        from lakeray.lakehouse.spark import resolve_delta_jars
        jars = resolve_delta_jars(Path({str(target)!r}), seeds=(Path({str(seed)!r}),))
        print(len(jars))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["40"] * 4
    assert len(delta_jars(target)) == 40
    assert sorted(p.name for p in target.parent.iterdir()) == ["delta"]


def test_makefile_setup_always_asks_lakeray_and_distclean_keeps_the_user_cache():
    setup = subprocess.run(["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ".venv/bin/lakeray setup" in setup.stdout
    distclean = subprocess.run(["make", "-n", "distclean"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert distclean.returncode == 0
    removals = [line for line in distclean.stdout.splitlines() if line.startswith("rm ")]
    assert removals and not any("lakeray/jars" in line or "HOME" in line or "~" in line for line in removals)
