import click

from lakeray.cli.main import settings_from


@click.group()
def tables() -> None:
    """Delta tables: import your own data, list every table, show a table's history with its lineage."""


def _options(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        out[key.strip()] = value
    return out


@tables.command("import")
@click.argument("name")
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "json", "jdbc"]), default=None,
              help="Source format (default: from the file extensions; a JDBC URL is jdbc).")
@click.option("--mode", type=click.Choice(["overwrite", "append"]), default="overwrite", show_default=True,
              help="Replace the table, or append rows (the source must have the table's columns).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Spark reader option, repeatable: --option sep=';' (csv), --option dbtable=s.t (jdbc).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def import_cmd(ctx: click.Context, name: str, source: str, fmt: str | None, mode: str, options: tuple[str, ...],
               as_json: bool) -> None:
    """Import SOURCE (a parquet/CSV/JSON file or folder, or a JDBC URL) into the Delta table NAME.

    One commit; its history records the source, format, file count, bytes, schema and an import id.
    Bad input (a missing source, an empty folder, an unreadable file, an append whose columns differ
    from the table's) writes nothing.
    """
    from lakeray.features.imports import import_table, plan_import
    from lakeray.lakehouse.spark import spark_session

    settings = settings_from(ctx)
    reader_options = _options(options)
    plan_import(settings, name, source, fmt, mode, reader_options)  # argument errors before Spark starts
    with spark_session(settings) as spark:
        result = import_table(spark, settings, name, source, fmt, mode, reader_options)
    if as_json:
        import dataclasses
        import json

        click.echo(json.dumps(dataclasses.asdict(result)))
        return
    click.echo(f"{result.table}@{result.version}: {result.rows} rows ({result.mode}) from {result.source} "
               f"({result.format}, {result.files} file(s), {result.bytes} bytes) in {result.seconds:.1f} s "
               f"(import {result.import_id})")


@tables.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead of a table.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every Delta table under the storage root: kind (input, feature, training set), version, rows."""
    from lakeray.features.catalog import list_tables

    found = list_tables(settings_from(ctx))
    if as_json:
        import json

        click.echo(json.dumps([{"name": t.name, "kind": t.kind, "version": t.version, "rows": t.rows,
                                "last_commit": t.last_commit.isoformat() if t.last_commit else None,
                                "path": t.path} for t in found]))
        return
    from rich.console import Console
    from rich.table import Table

    out = Table("table", "kind", "version", "rows", "last commit (UTC)")
    for t in found:
        out.add_row(t.name, t.kind, "" if t.version is None else str(t.version), "" if t.rows is None else str(t.rows),
                    t.last_commit.strftime("%Y-%m-%d %H:%M:%S") if t.last_commit else "")
    Console().print(out)


@tables.command("history")
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of commits instead of a table.")
@click.pass_context
def history(ctx: click.Context, name: str, limit: int, as_json: bool) -> None:
    """Versions of NAME with their lineage: import source, feature run inputs and code, training-set inputs."""
    from lakeray.cli._history import show_history

    show_history(settings_from(ctx), name, limit, as_json)
