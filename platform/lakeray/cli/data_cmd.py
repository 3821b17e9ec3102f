import click

from lakeray.cli.main import settings_from


@click.group()
def data() -> None:
    """Example data."""


@data.command("generate")
@click.option("--rows", type=click.IntRange(min=1), default=200_000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--table", default="transactions", show_default=True)
@click.option("--labels-table", default="fraud_labels", show_default=True,
              help="Also split the labels (transaction_id, customer_id, event_time, is_fraud) off into this "
                   "table, as the demo does; '' skips it.")
@click.pass_context
def generate(ctx: click.Context, rows: int, seed: int, table: str, labels_table: str) -> None:
    """Write ROWS synthetic card transactions to a Delta table (overwrite: same seed, same rows), and their labels."""
    from lakeray.demo import write_labels
    from lakeray.features.synthetic import generate_transactions
    from lakeray.lakehouse.delta import write_table
    from lakeray.lakehouse.spark import create_spark_session

    settings = settings_from(ctx)
    spark = create_spark_session(settings)
    try:
        version = write_table(generate_transactions(spark, rows, seed), settings.table_path(table))
        labels_version = write_labels(spark, settings, table, version, labels_table) if labels_table else None
    finally:
        spark.stop()
    click.echo(f"{table}@{version}: {rows} rows")
    if labels_version is not None:
        click.echo(f"{labels_table}@{labels_version}: the labels of {table}@{version}")
