"""Entry point of the ``lakeray`` command.

Subcommands are imported only when invoked (``_LazyGroup``), so ``lakeray --help`` stays well under a
second and never imports pyspark, ray or torch. A LakerayError prints its headline and fix and exits
with the error's code; ``--debug`` (or LAKERAY_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from lakeray.errors import LakerayError

__all__ = ["cli", "main"]

# name → (module, attribute, one-line help shown by --help without importing the module)
_COMMANDS = {
    "demo": ("lakeray.cli.demo_cmd", "demo", "Run the whole path: data → features → train → serve → predict."),
    "setup": ("lakeray.cli.setup_cmd", "setup", "Check Java and cache the Delta jars (once, needs Maven)."),
    "init": ("lakeray.cli.init_cmd", "init", "Create a project: lakeray.yaml, an example feature job, a spec."),
    "config": ("lakeray.cli.config_cmd", "config", "Show and validate the resolved configuration."),
    "data": ("lakeray.cli.data_cmd", "data", "Generate the example transactions table."),
    "features": ("lakeray.cli.features_cmd", "features", "List and run feature jobs."),
    "tables": ("lakeray.cli.tables_cmd", "tables", "Import data into Delta tables; list tables and their history."),
    "train": ("lakeray.cli.train_cmd", "train", "Train a model from a spec (jobs/training/*.yaml) on Ray; register it."),
    "tune": ("lakeray.cli.tune_cmd", "tune", "Search hyperparameters of a train spec with Ray Tune; register the best."),
    "serve": ("lakeray.cli.serve_cmd", "serve", "Serve models with Ray Serve: deploy SPEC, list, status, delete."),
    "predict": ("lakeray.cli.predict_cmd", "predict", "Score JSON instances with a deployed app (retries on 503)."),
    "models": ("lakeray.cli.models_cmd", "models", "Registered models: list, show, lineage, promote (champion gate)."),
    "cluster": ("lakeray.cli.cluster_cmd", "cluster", "A local Ray + Spark cluster (up, status, down); validate cluster YAMLs."),
    "jobs": ("lakeray.cli.jobs_cmd", "jobs", "Ray jobs on the cluster: submit a lakeray command or script, status, logs, stop, list."),
    "schedule": ("lakeray.cli.schedule_cmd", "schedule", "Schedules from the declarations: list, show, next (starts nothing)."),
    "scheduler": ("lakeray.cli.schedule_cmd", "scheduler", "The Dagster daemon and UI for the project: start, stop, status."),
    "runs": ("lakeray.cli.runs_cmd", "runs", "Runs of scheduled and feature jobs, newest first: list, show."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Project config file (default: ./lakeray.yaml, or $LAKERAY_CONFIG).")
@click.option("--profile", default=None, help="Profile in the config (default: $LAKERAY_PROFILE or default_profile).")
@click.option("--debug", is_flag=True, default=False, help="Show tracebacks for errors.")
@click.version_option(package_name="lakeray")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, profile: str | None, debug: bool) -> None:
    """lakeray: Spark feature jobs into Delta, Ray Train/Tune, MLflow registry, Ray Serve endpoints."""
    ctx.obj = {"config_path": config_path, "profile": profile}
    if debug:
        os.environ["LAKERAY_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> None:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); errors exit with their code via SystemExit."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except LakerayError as exc:
        if os.environ.get("LAKERAY_DEBUG") == "1":
            raise
        click.secho(f"error: {exc.headline}", fg="red", err=True)
        if exc.fix:
            click.echo(f"  fix: {exc.fix}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def settings_from(ctx: click.Context):
    """The resolved Settings for this invocation (ConfigError naming file and field when invalid)."""
    from lakeray.config import load_settings

    root = ctx.find_root().obj or {}
    return load_settings(root.get("config_path"), root.get("profile"))
