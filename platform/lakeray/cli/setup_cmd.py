from pathlib import Path

import click

from lakeray.cli.main import settings_from

# Where lakeray kept the jars before they were cached per user: reused when the user cache is empty, so an
# older checkout's `make setup` stays offline.
_LEGACY_PROJECT_JARS = ".cache/delta-jars"


@click.command()
@click.option("--object-store", is_flag=True,
              help="Also cache hadoop-aws and its AWS SDK bundle (~690 MB), for s3:// / s3a:// storage roots.")
@click.pass_context
def setup(ctx: click.Context, object_store: bool) -> None:
    """Check Java and cache the Delta jars once per user (idempotent; a no-op when cached)."""
    from lakeray.lakehouse.spark import check_java, delta_jars_dir, resolve_delta_jars

    settings = settings_from(ctx)
    java = check_java()
    jars_dir = delta_jars_dir(settings)
    jars = resolve_delta_jars(jars_dir, seeds=(Path(settings.resolve(_LEGACY_PROJECT_JARS)),))
    click.echo(f"java: {java}\ndelta jars: {len(jars)} in {jars_dir}")
    if object_store or settings.profile.storage.is_object_store:
        from lakeray.lakehouse.spark import object_store_jars_dir, resolve_object_store_jars

        store_dir = object_store_jars_dir(settings)
        store_jars = resolve_object_store_jars(store_dir)
        click.echo(f"object-store jars: {len(store_jars)} in {store_dir}")
