"""What a job takes from the project: its working dir (without what git ignores, caches, the local
lakehouse and files over a size limit; checked against Ray's upload cap before the upload), its
environment (the profile, the absolute storage root and the submitter's ``LAKERAY_*`` overrides, so the
job reads the same config and tables), its metadata (user, git commit and dirty flag, the spec file's
sha256, the command) and its entrypoint. No Ray import here except for the cap, when one is needed."""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["UploadPlan", "plan_upload", "job_metadata", "entrypoint", "runtime_env"]

_SPEC_SUFFIXES = (".yaml", ".yml", ".json", ".py", ".toml", ".sql")
# Never uploaded: version control, virtual envs and caches (a venv alone is GBs).
_ALWAYS_EXCLUDED = (".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")
# Not forwarded: they steer the submitting shell (or tag its cluster node), not the project's configuration.
_LOCAL_ONLY_ENV = {"LAKERAY_CONFIG", "LAKERAY_DEBUG", "LAKERAY_CLUSTER_NODE"}


@dataclass
class UploadPlan:
    """What goes into the job's working dir."""

    root: str
    excludes: list[str]  # gitwildmatch patterns, relative to root (Ray's runtime_env "excludes")
    files: int
    bytes: int
    large_files: list[tuple[str, int]]  # left out for their size: (path relative to root, bytes)


def _git(project: str, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", project, *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode(errors="replace") if done.returncode == 0 else None


def _size(path: str) -> int:
    if os.path.isdir(path):  # a symlinked folder: Ray uploads what it points to
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path, followlinks=True) for f in fs)
    return os.path.getsize(path)


def _candidate_files(project: str, skip_dirs: set[str]) -> tuple[list[str], list[str]]:
    """Files Ray would upload (relative paths) and folders to exclude explicitly."""
    listed = _git(project, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is not None:
        ignored = _git(project, "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory") or ""
        # Ray reads .gitignore files inside the working dir only: what a parent folder's .gitignore or
        # git's global excludes hide is excluded here explicitly.
        files = [p for p in listed.split("\0") if p and os.path.exists(os.path.join(project, p))]
        return files, [p.rstrip("/") for p in ignored.split("\0") if p]
    files = []
    for folder, dirs, names in os.walk(project):
        rel = os.path.relpath(folder, project)
        dirs[:] = [d for d in dirs if d not in _ALWAYS_EXCLUDED
                   and os.path.normpath(os.path.join(rel, d)) not in skip_dirs]
        files += [os.path.normpath(os.path.join(rel, n)) for n in names]
    return files, []


def plan_upload(settings: Settings, max_file_bytes: int = 10 * 2**20, cap_bytes: int | None = None) -> UploadPlan:
    """The project's working dir for a job; ConfigError naming the largest files when over Ray's cap."""
    project = str(settings.project_dir)
    if cap_bytes is None:
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

        cap_bytes = GCS_STORAGE_MAX_SIZE
    skip_dirs = set()
    root = settings.storage_root
    if "://" not in root and os.path.commonpath([root, project]) == project and root != project:
        skip_dirs.add(os.path.relpath(root, project))  # a local lakehouse inside the project stays home
    files, ignored_dirs = _candidate_files(project, skip_dirs)
    excludes = sorted({*_ALWAYS_EXCLUDED, *(f"/{d}" for d in [*skip_dirs, *ignored_dirs])})
    kept, large, total = 0, [], 0
    sizes = []
    for rel in files:
        parts = rel.split(os.sep)
        if any(p in _ALWAYS_EXCLUDED for p in parts) or any(rel == d or rel.startswith(d + os.sep) for d in skip_dirs):
            continue
        size = _size(os.path.join(project, rel))
        if size > max_file_bytes:
            large.append((rel, size))
            excludes.append(f"/{rel}")
            continue
        kept, total = kept + 1, total + size
        sizes.append((size, rel))
    if total >= cap_bytes:
        biggest = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for size, rel in sorted(sizes, reverse=True)[:5])
        raise ConfigError(f"the job's working dir {project} holds {total / 2**20:.1f} MiB in {kept} files, over Ray's "
                          f"upload cap of {cap_bytes / 2**20:.0f} MiB; largest: {biggest}",
                          "add them to .gitignore or .rayignore, or lower --max-file-mb to leave them out")
    return UploadPlan(project, excludes, kept, total, sorted(large, key=lambda item: -item[1]))


def _spec_file(settings: Settings, command: list[str]) -> str | None:
    """The first argument naming a spec or script file; ConfigError when the job could not find it."""
    project = str(settings.project_dir)
    for arg in command:
        if not arg.endswith(_SPEC_SUFFIXES) or arg.startswith("-"):
            continue
        path = os.path.abspath(arg)
        if not os.path.isfile(path):
            continue
        inside = os.path.commonpath([path, project]) == project
        if not inside or not os.path.isfile(os.path.join(project, arg)):
            raise ConfigError(f"{arg}: a job runs in the project folder {project}, where this path does not "
                              "point to the file", "run the command from the project folder, with paths inside it")
        return arg
    return None


def job_metadata(settings: Settings, command: list[str]) -> dict[str, str]:
    """Who ran what on which code: user, git commit (+ dirty), spec file and its sha256, the command."""
    project = str(settings.project_dir)
    commit = (_git(project, "rev-parse", "HEAD") or "").strip()
    dirty = bool((_git(project, "status", "--porcelain", "--", ".") or "").strip()) if commit else False
    meta = {"lakeray.user": getpass.getuser(), "lakeray.command": shlex.join(command),
            "lakeray.profile": settings.profile_name, "lakeray.git_commit": commit,
            "lakeray.git_dirty": str(dirty).lower(), "lakeray.submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                           time.gmtime())}
    spec = _spec_file(settings, command)
    if spec is not None:
        with open(os.path.join(project, spec), "rb") as fh:
            meta["lakeray.spec"] = spec
            meta["lakeray.spec_sha256"] = hashlib.sha256(fh.read()).hexdigest()
    return meta


def entrypoint(command: list[str]) -> str:
    """The shell command Ray runs: the command as given; a lone script path runs with python."""
    if not command:
        raise ConfigError("no command to submit", "pass one after --: lakeray jobs submit -- lakeray features run X")
    if command[0].endswith(".py") and os.path.isfile(command[0]):
        command = ["python", *command]
    return shlex.join(command)


def runtime_env(settings: Settings, upload: UploadPlan, local_cluster: bool, pip: bool = False) -> dict[str, Any]:
    """Working dir + the environment that makes the job see the submitter's config and lakehouse."""
    env = {k: v for k, v in os.environ.items() if k.startswith("LAKERAY_") and k not in _LOCAL_ONLY_ENV}
    env.update({"LAKERAY_PROFILE": settings.profile_name, "LAKERAY_STORAGE__ROOT": settings.storage_root,
                # The job's driver joins the cluster it runs on (Ray sets RAY_ADDRESS for it), whatever
                # address the profile gives clients outside the cluster.
                "LAKERAY_RAY__ADDRESS": "auto"})
    source = settings.source
    if os.path.isfile(source) and os.path.commonpath([os.path.abspath(source), upload.root]) == upload.root:
        env["LAKERAY_CONFIG"] = os.path.relpath(source, upload.root)
    if local_cluster:
        # Same machine, same venv: its bin/ first, so `lakeray` and `python` are this install's even
        # when the cluster was started without the venv activated. Ray expands ${PATH}.
        env["PATH"] = os.path.dirname(sys.executable) + ":${PATH}"
    renv: dict[str, Any] = {"working_dir": upload.root, "excludes": upload.excludes, "env_vars": env}
    if pip:
        lock = os.path.join(upload.root, "requirements.lock")
        if not os.path.isfile(lock):
            raise ConfigError(f"--pip: no requirements.lock in {upload.root}", "add the lock, or drop --pip when the "
                              "cluster's nodes already have the packages (the lakeray node image does)")
        renv["pip"] = lock
    return renv
