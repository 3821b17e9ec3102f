import click

from lakeray.cli.main import settings_from


@click.group()
def features() -> None:
    """Feature jobs and tables."""


@features.command("list")
@click.pass_context
def list_jobs(ctx: click.Context) -> None:
    """List the declared feature jobs."""
    from rich.console import Console
    from rich.table import Table

    from lakeray.features.runner import discover_jobs

    table = Table("table", "inputs", "entity keys", "owner", "description")
    for job in discover_jobs(settings_from(ctx)).values():
        table.add_row(job.name, ", ".join(job.inputs), ", ".join(job.entity_keys), job.owner, job.description)
    Console().print(table)


@features.command("run")
@click.argument("name")
@click.pass_context
def run(ctx: click.Context, name: str) -> None:
    """Run feature job NAME on the latest input versions; prints the committed table version."""
    from lakeray.features.runner import run_feature_job
    from lakeray.lakehouse.spark import create_spark_session

    settings = settings_from(ctx)
    spark = create_spark_session(settings)
    try:
        result = run_feature_job(spark, settings, name)
    finally:
        spark.stop()
    inputs = ", ".join(f"{t}@{v}" for t, v in result.input_versions.items())
    click.echo(f"{result.table}@{result.version}: {result.rows} rows from {inputs} in {result.seconds:.1f} s")
