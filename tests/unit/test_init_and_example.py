"""`lakeray init` and the example project that ships inside the package (one copy, also the checkout's jobs/)."""

import ast
import filecmp
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import yaml

from lakeray.demo import example_project

REPO = Path(__file__).resolve().parents[2]
LAKERAY = str(Path(sys.executable).parent / "lakeray")
EXAMPLE_FILES = ["README.md", "lakeray.yaml", "jobs/training_set.yaml", "jobs/features/customer_aggregates.py",
                 "jobs/training/fraud_xgboost.yaml", "jobs/training/fraud_torch.yaml",
                 "jobs/training/fraud_sequence.yaml", "jobs/training/sequence_model.py",
                 "jobs/training/fraud_tune.yaml", "jobs/serving/fraud.yaml", "jobs/schedules.yaml"]


def init(*args, cwd=None):
    return subprocess.run([LAKERAY, "init", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_the_example_project_ships_as_package_data():
    root = example_project()
    assert files_under(root) == sorted(EXAMPLE_FILES)
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lakeray"]
    for name in EXAMPLE_FILES:
        assert any(fnmatch(f"examples/project/{name}", pattern) for pattern in patterns), name


def test_the_checkout_jobs_are_the_packaged_files_not_a_second_copy():
    for name in ["jobs/features/customer_aggregates.py", "jobs/training_set.yaml",
                 *[f"jobs/{folder}/{p.name}" for folder in ("training", "serving")
                   for p in (example_project() / "jobs" / folder).iterdir() if p.name != "__pycache__"]]:
        in_repo, packaged = REPO / name, example_project() / name
        assert in_repo.resolve() == packaged.resolve(), f"{name} must link to {packaged}"


def test_the_training_set_spec_takes_every_feature_the_job_writes():
    job = ast.parse((example_project() / "jobs/features/customer_aggregates.py").read_text())
    declared = next(ast.literal_eval(node.value) for node in job.body
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FEATURE_COLUMNS")
    spec = yaml.safe_load((example_project() / "jobs/training_set.yaml").read_text())
    assert spec["name"] == "fraud_training_set" and spec["labels"] == "fraud_labels"
    assert spec["features"] == [{"table": "customer_aggregates", "columns": declared}]


def test_init_creates_a_project_and_says_what_next(tmp_path):
    target = tmp_path / "new" / "proj"
    result = init(target)
    assert result.returncode == 0, result.stderr
    assert files_under(target) == sorted(EXAMPLE_FILES)
    for name in EXAMPLE_FILES:
        assert filecmp.cmp(target / name, example_project() / name, shallow=False)
    assert f"cd {target}" in result.stdout and "lakeray demo" in result.stdout
    # The project's own config loads, and its job folder is found relative to it.
    from lakeray.config import load_settings

    settings = load_settings(target / "lakeray.yaml", environ={})
    assert settings.resolve(settings.profile.feature_paths[0]) == str((target / "jobs" / "features").resolve())


def test_init_in_the_current_folder_needs_no_cd(tmp_path):
    result = init(".", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lakeray.yaml").is_file() and "cd " not in result.stdout


def test_init_refuses_an_existing_project_and_never_overwrites_other_files(tmp_path):
    assert init(tmp_path).returncode == 0
    (tmp_path / "lakeray.yaml").write_text("default_profile: local\n# mine\n")
    (tmp_path / "jobs" / "training_set.yaml").write_text("# my own spec\n")
    (tmp_path / "notes.txt").write_text("keep me\n")

    refused = init(tmp_path)
    assert refused.returncode == 2 and "already holds a lakeray project" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "lakeray.yaml").read_text().endswith("# mine\n")

    forced = init(tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert filecmp.cmp(tmp_path / "lakeray.yaml", example_project() / "lakeray.yaml", shallow=False)
    assert (tmp_path / "jobs" / "training_set.yaml").read_text() == "# my own spec\n"
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert "kept" in forced.stdout and "training_set.yaml" in forced.stdout


def test_init_adds_the_project_to_a_folder_without_one(tmp_path):
    (tmp_path / "README.md").write_text("my readme\n")
    result = init(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "README.md").read_text() == "my readme\n"
    assert (tmp_path / "lakeray.yaml").is_file() and (tmp_path / "jobs/features/customer_aggregates.py").is_file()


def test_init_refuses_a_file_as_the_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    result = init(tmp_path / "f")
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_the_demo_falls_back_to_the_packaged_job_only_without_one_of_its_own(tmp_path, monkeypatch):
    from lakeray.config import load_settings
    from lakeray.demo import _with_feature_job

    # An empty folder, built-in defaults: feature_paths (jobs/features) does not exist there.
    monkeypatch.chdir(tmp_path)
    bare = load_settings(None, environ={})
    settings, source, note = _with_feature_job(bare)
    assert Path(source) == example_project() / "jobs/features/customer_aggregates.py"
    assert note and "shipped with lakeray" in note and "jobs/features" in note
    assert settings.profile.feature_paths == [str(example_project() / "jobs" / "features")]

    # A project of its own (here: from init) runs its own copy, without a note.
    project = tmp_path / "proj"
    assert init(project).returncode == 0
    own = load_settings(project / "lakeray.yaml", environ={})
    settings, source, note = _with_feature_job(own)
    assert note is None and Path(source) == project / "jobs/features/customer_aggregates.py"
    assert settings.profile.feature_paths == own.profile.feature_paths
