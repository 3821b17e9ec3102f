import click

from lakeray.cli.main import settings_from


@click.group()
def features() -> None:
    """Feature jobs and tables: list, describe, run, backfill, history, show, training sets, vacuum."""


@features.command("list")
@click.pass_context
def list_jobs(ctx: click.Context) -> None:
    """List the declared feature jobs."""
    from rich.console import Console
    from rich.table import Table

    from lakeray.features.runner import discover_jobs

    table = Table("table", "inputs", "entity keys", "write mode", "owner", "description")
    for job in discover_jobs(settings_from(ctx)).values():
        table.add_row(job.name, ", ".join(job.inputs), ", ".join(job.entity_keys), job.write_mode, job.owner,
                      job.description)
    Console().print(table)


@features.command("describe")
@click.argument("name")
@click.pass_context
def describe(ctx: click.Context, name: str) -> None:
    """Show one feature job's declaration (keys, event time, expectations, code version)."""
    import yaml

    from lakeray.features.runner import find_job

    job = find_job(settings_from(ctx), name)
    data = job.model_dump(mode="json", exclude={"expectations"})
    data["expectations"] = [f"{e.name} ({e.severity})" for e in job.expectations]
    data["code_version"] = job.code_version
    click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@features.command("run")
@click.argument("name")
@click.option("--start", default=None, help="First date of the range (partitions jobs), e.g. 2026-01-01.")
@click.option("--end", default=None, help="Day after the last date of the range (exclusive).")
@click.pass_context
def run(ctx: click.Context, name: str, start: str | None, end: str | None) -> None:
    """Run feature job NAME on the latest input versions; prints the committed table version."""
    from lakeray.features.runner import run_feature_job
    from lakeray.lakehouse.spark import spark_session

    settings = settings_from(ctx)
    with spark_session(settings) as spark:
        result = run_feature_job(spark, settings, name, start=start, end=end)
    inputs = ", ".join(f"{t}@{v}" for t, v in result.input_versions.items())
    click.echo(f"{result.table}@{result.version}: {result.rows} rows from {inputs} in {result.seconds:.1f} s "
               f"(run {result.run_id}, code {result.code_version})")
    for check in result.expectations:
        if not check["passed"]:
            click.secho(f"  warn: {check['name']}: {check['detail']}", fg="yellow")


@features.command("backfill")
@click.argument("name")
@click.option("--start", required=True, help="First date, e.g. 2026-01-01.")
@click.option("--end", required=True, help="Day after the last date (exclusive).")
@click.option("--step-days", type=click.IntRange(min=1), default=1, show_default=True, help="Days per commit.")
@click.option("--force", is_flag=True, help="Rerun chunks already committed by the same code version.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per chunk instead of a bar.")
@click.pass_context
def backfill_cmd(ctx: click.Context, name: str, start: str, end: str, step_days: int, force: bool,
                 as_json: bool) -> None:
    """Run partitions job NAME over [START, END), one commit per chunk; resumable.

    Chunks already committed by the same code version are skipped, so rerunning an interrupted
    backfill picks up where it stopped.
    """
    import dataclasses
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lakeray.features.backfill import backfill, plan_chunks
    from lakeray.lakehouse.spark import spark_session

    settings = settings_from(ctx)
    total = len(plan_chunks(start, end, step_days))  # validates the range before Spark starts
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=as_json)
    with spark_session(settings) as spark:
        with progress:
            task = progress.add_task(f"backfill {name}", total=total)

            def report(chunk) -> None:
                if as_json:
                    click.echo(json.dumps(dataclasses.asdict(chunk)))
                else:
                    note = f"v{chunk.version} {chunk.rows} rows" if chunk.status == "committed" else chunk.reason
                    progress.console.print(f"{chunk.start}..{chunk.end} {chunk.status}: {note}")
                progress.advance(task)

            results = backfill(spark, settings, name, start, end, step_days, force, on_chunk=report)
    done = sum(r.status == "committed" for r in results)
    if not as_json:
        click.echo(f"{name}: {done} chunk(s) committed, {len(results) - done} skipped")


@features.command("history")
@click.argument("table")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of commits instead of a table.")
@click.pass_context
def history(ctx: click.Context, table: str, limit: int, as_json: bool) -> None:
    """Versions of TABLE: operation, rows, run id, input versions, code version."""
    from lakeray.cli._history import show_history

    show_history(settings_from(ctx), table, limit, as_json)


@features.command("show")
@click.argument("table")
@click.option("--version", type=click.IntRange(min=0), default=None, help="Table version (default: latest).")
@click.option("--as-of", "as_of", default=None, help="Timestamp: the version current at that time.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_context
def show(ctx: click.Context, table: str, version: int | None, as_of: str | None, limit: int) -> None:
    """Rows of TABLE at a version or timestamp (time travel), without a JVM."""
    from rich.console import Console
    from rich.table import Table

    from lakeray.lakehouse.delta import head_arrow, version_at

    settings = settings_from(ctx)
    path = settings.table_path(table)
    if as_of is not None:
        if version is not None:
            raise click.UsageError("--version and --as-of exclude each other")
        version = version_at(path, as_of)
    data = head_arrow(path, version, limit)  # reads no file beyond the rows it prints
    out = Table(*data.column_names, title=f"{table}@{'latest' if version is None else version}")
    for row in data.to_pylist():
        out.add_row(*(str(v) for v in row.values()))
    Console().print(out)


_ENGINE = click.option("--engine", type=click.Choice(["auto", "duckdb", "spark"]), default=None,
                       help="Join engine (default: the spec's, else the profile's training_sets.engine).")


def _engine_session(settings, spec):
    """The engine a build of ``spec`` uses, and a Spark session only when that engine is spark: the
    duckdb engine starts no JVM."""
    import contextlib

    from lakeray.features.training_sets import choose_engine
    from lakeray.lakehouse.spark import spark_session

    engine, why = choose_engine(settings, spec)
    return engine, why, (spark_session(settings) if engine == "spark" else contextlib.nullcontext(None))


@features.command("training-set")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False))
@_ENGINE
@click.pass_context
def training_set(ctx: click.Context, spec_file: str, engine: str | None) -> None:
    """Build the point-in-time training set described by SPEC_FILE (YAML); writes table + manifest."""
    import yaml

    from lakeray.features.training_sets import TrainingSetSpec, build_training_set

    settings = settings_from(ctx)
    spec = TrainingSetSpec.parse(yaml.safe_load(open(spec_file)) or {}, spec_file)
    if engine:
        spec = spec.model_copy(update={"engine": engine})
    chosen, why, session = _engine_session(settings, spec)
    with session as spark:
        result = build_training_set(spark, settings, spec.model_copy(update={"engine": chosen}))
    inputs = ", ".join(f"{t}@{v}" for t, v in result.inputs.items())
    click.echo(f"{result.table}@{result.version}: {result.rows} rows from {inputs}; hash {result.content_hash}; "
               f"engine {result.engine} ({why}); manifest {result.manifest_path}")


@features.command("rebuild")
@click.argument("name")
@click.option("--version", type=click.IntRange(min=0), default=None, help="Manifest version (default: latest).")
@click.option("--into", default=None, help="Write into another table (default: a new version of NAME).")
@_ENGINE
@click.pass_context
def rebuild(ctx: click.Context, name: str, version: int | None, into: str | None, engine: str | None) -> None:
    """Rebuild a training set from its manifest; commit it only if the content hash matches.

    Identical rows become a new version of NAME (or of --into). Different rows fail (exit 1) and NAME
    is left as it was; with --into they are written there so they can be compared. Either engine
    gives the same content hash, whichever built the original.
    """
    from lakeray.features.training_sets import load_manifest, rebuild_spec, rebuild_training_set

    settings = settings_from(ctx)
    manifest = load_manifest(settings, name, version)
    chosen, _, session = _engine_session(settings, rebuild_spec(manifest, into, engine))
    with session as spark:
        result = rebuild_training_set(spark, settings, manifest, into, chosen)
    click.echo(f"{result.table}@{result.version}: identical to {name}@{manifest['version']} ({result.rows} rows, "
               f"engine {result.engine})")


@features.command("vacuum")
@click.argument("tables", nargs=-1)
@click.option("--retain-hours", type=click.FloatRange(min=0), default=168.0, show_default=True,
              help="Keep files any version newer than this needs (Delta's default: 7 days).")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.pass_context
def vacuum_cmd(ctx: click.Context, tables: tuple[str, ...], retain_hours: float, dry_run: bool) -> None:
    """Delete old data files of TABLES (default: all), never those of a version still referenced.

    Versions pinned by a training-set manifest or by a registered model's training run are kept,
    however old; the output says which versions were kept and why.
    """
    from lakeray.features.retention import vacuum
    from lakeray.lakehouse.spark import spark_session

    settings = settings_from(ctx)
    with spark_session(settings) as spark:
        results = vacuum(spark, settings, list(tables) or None, retain_hours, dry_run)
    verb = "would delete" if dry_run else "deleted"
    for r in results:
        click.echo(f"{r.table}@{r.latest_version}: {verb} {len(r.deleted_files)} file(s); retention "
                   f"{r.retain_hours:.1f} h")
        for version, why in r.kept.items():
            click.echo(f"  kept v{version}: {'; '.join(why)}")
        if r.log_retention_days:
            click.echo(f"  raised delta.logRetentionDuration to {r.log_retention_days} days to keep v{min(r.kept)}")
