import click

from lakeray.cli.main import settings_from


@click.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Check Java and cache the Delta jars inside the project (idempotent)."""
    from lakeray.lakehouse.spark import check_java, resolve_delta_jars

    settings = settings_from(ctx)
    java = check_java()
    jars = resolve_delta_jars(settings.jars_dir)
    click.echo(f"java: {java}\ndelta jars: {len(jars)} in {settings.jars_dir}")
