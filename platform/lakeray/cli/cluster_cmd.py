"""``lakeray cluster``: cluster definitions and (later) the clusters themselves.

A group, so ``up``/``down``/``status``/``join`` can join ``validate`` as subcommands; each subcommand
imports what it needs when it runs (``lakeray --help`` imports no ray).
"""

from __future__ import annotations

import sys

import click

__all__ = ["cluster"]


@click.group()
def cluster() -> None:
    """Ray clusters: validate launcher YAMLs and KubeRay manifests (cluster/)."""


@cluster.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--quiet", "-q", is_flag=True, default=False, help="Print problems only, no line per valid file.")
def validate(files: tuple[str, ...], quiet: bool) -> None:
    """Validate cluster FILES offline: launcher YAMLs (ray up) against Ray's ray-schema.json and the
    launcher's config preparation, KubeRay manifests against the vendored CRD schemas.

    Exit code 0 when every file is valid, 2 when any is not (each problem names the file and the path
    inside it).
    """
    from lakeray.cluster.validate import check_file

    invalid = 0
    for path in files:
        report = check_file(path)
        if report.ok:
            if not quiet:
                click.echo(f"ok  {path}  ({', '.join(report.documents)})")
            continue
        invalid += 1
        for problem in report.problems:
            click.secho(f"error: {problem}", fg="red", err=True)
    if invalid:
        click.echo(f"{invalid} of {len(files)} file(s) invalid", err=True)
        sys.exit(2)
