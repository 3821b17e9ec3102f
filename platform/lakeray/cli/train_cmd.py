import click

from lakeray.cli.main import settings_from


@click.command()
@click.option("--table", default="fraud_training_set", show_default=True)
@click.option("--version", type=click.IntRange(min=0), default=None, help="Table version (default: latest).")
@click.option("--label", default="is_fraud", show_default=True)
@click.option("--id-column", default="transaction_id", show_default=True, help="Column hashed for the split.")
@click.option("--exclude", multiple=True, default=("customer_id",), show_default=True,
              help="Columns that are not features.")
@click.option("--alias", default="champion", show_default=True)
@click.pass_context
def train(ctx: click.Context, table: str, version: int | None, label: str, id_column: str,
          exclude: tuple[str, ...], alias: str) -> None:
    """Train XGBoost with Ray Train on a pinned table version; register it and set ALIAS."""
    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.lakehouse.delta import read_arrow
    from lakeray.training.api import make_spec, train_and_register

    settings = settings_from(ctx)
    if version is None:
        from deltalake import DeltaTable

        read_arrow(settings.table_path(table), None, files=[])  # TableNotFoundError when absent
        version = DeltaTable(settings.table_path(table)).version()
    spec = make_spec(settings, table, version, label, id_column, exclude=exclude)
    with ray_session(settings):
        report = train_and_register(settings, spec, alias=alias)
    click.echo(f"{report.model.uri} (v{report.model.version}) from {table}@{version}: "
               f"auc {report.auc:.4f}, boosting {report.outcome.train_s:.1f} s, "
               f"start-up {report.outcome.startup_s:.1f} s (of which Delta read {report.outcome.load_s:.1f} s)")
