import click

from lakeray.cli.main import settings_from


@click.group()
def data() -> None:
    """Example data."""


@data.command("generate")
@click.option("--rows", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--table", default="transactions", show_default=True)
@click.pass_context
def generate(ctx: click.Context, rows: int, seed: int, table: str) -> None:
    """Write ROWS synthetic card transactions to a Delta table (overwrite: same seed, same rows)."""
    from lakeray.features.synthetic import generate_transactions
    from lakeray.lakehouse.delta import write_table
    from lakeray.lakehouse.spark import create_spark_session

    settings = settings_from(ctx)
    spark = create_spark_session(settings)
    try:
        version = write_table(generate_transactions(spark, rows, seed), settings.table_path(table))
    finally:
        spark.stop()
    click.echo(f"{table}@{version}: {rows} rows")
