import click

from lakeray.cli.main import settings_from


@click.group()
def config() -> None:
    """Show and validate the resolved configuration."""


@config.command("show")
@click.pass_context
def show(ctx: click.Context) -> None:
    """Print the resolved profile as YAML (after file and LAKERAY_* overrides)."""
    import yaml

    settings = settings_from(ctx)
    click.echo(f"# profile {settings.profile_name} from {settings.source}")
    click.echo(yaml.safe_dump(settings.profile.model_dump(mode="json"), sort_keys=False).rstrip())


@config.command("validate")
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Exit 0 when the config is valid; otherwise print the field that is not."""
    settings = settings_from(ctx)
    click.echo(f"ok: profile {settings.profile_name} from {settings.source}")
