"""``lakeray init DIR``: a new project from the example that ships inside the package."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import click

from lakeray.config import CONFIG_FILE_NAME
from lakeray.errors import ConfigError


def _example_files(root: Path) -> list[Path]:
    """The example project's files, relative to ``root`` (no byte-code a Python run left there)."""
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _jars_cached(config: Path) -> bool:
    """Whether the new project's profile finds the Delta jars already (no Java, no network)."""
    from lakeray.config import load_settings
    from lakeray.errors import LakerayError
    from lakeray.lakehouse.spark import delta_jars, delta_jars_dir

    try:
        delta_jars(delta_jars_dir(load_settings(config)))
    except LakerayError:
        return False
    return True


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True,
              help=f"Initialise a non-empty DIR that already has a {CONFIG_FILE_NAME} (it is replaced; other "
                   "existing files are still kept).")
def init(directory: Path, force: bool) -> None:
    """Create a project in DIRECTORY: lakeray.yaml, an example feature job, a training-set spec, a README.

    Existing files are never overwritten, except lakeray.yaml with --force.
    """
    from lakeray.demo import example_project

    source = example_project()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a folder", "pick another path for the project")
    config = directory / CONFIG_FILE_NAME
    if config.exists() and not force:
        raise ConfigError(f"{directory} already holds a lakeray project ({config})",
                          "pick an empty or new folder, or pass --force to replace its lakeray.yaml "
                          "(other files are kept)")
    directory.mkdir(parents=True, exist_ok=True)
    written, kept = [], []
    for relative in _example_files(source):
        target = directory / relative
        if target.exists() and not (force and relative == Path(CONFIG_FILE_NAME)):
            kept.append(relative)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target)
        written.append(relative)
    for relative in written:
        click.echo(f"  wrote {directory / relative}")
    for relative in kept:
        click.echo(f"  kept  {directory / relative} (exists)")
    cached = _jars_cached(config)
    steps = ([] if directory.resolve() == Path.cwd().resolve() else [f"cd {shlex.quote(str(directory))}"]) \
        + ([] if cached else ["lakeray setup"]) + ["lakeray demo"]
    click.echo(f"\nproject ready in {directory}. Next:\n  {' && '.join(steps)}")
    if not cached:
        click.echo("  (`lakeray setup` runs once per user: it checks Java and caches the Delta jars, from Maven "
                   "Central, in ~/.cache/lakeray or $LAKERAY_CACHE)")
