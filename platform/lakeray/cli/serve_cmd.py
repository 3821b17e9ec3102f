import click

from lakeray.cli.main import settings_from


@click.command()
@click.option("--model-uri", default=None, help="models:/<name>@<alias> (default: the profile's model @champion).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Override serve.port.")
@click.pass_context
def serve(ctx: click.Context, model_uri: str | None, port: int | None) -> None:
    """Serve a registered model until Ctrl-C: POST /predict, GET /healthz."""
    import signal
    import time

    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.serving.deploy import deploy_model

    settings = settings_from(ctx)
    if port is not None:
        settings.profile.serve.port = port
    model_uri = model_uri or f"models:/{settings.profile.mlflow.model_name}@champion"
    with ray_session(settings):
        # Stopping is the normal end of a server: Ctrl-C, or SIGTERM from a supervisor (and from a shell that
        # started this in the background, where SIGINT arrives ignored), shut Ray down and exit 0. Set after
        # ray.init, whose own SIGTERM handler exits without a word.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        endpoint = deploy_model(settings, model_uri)
        click.echo(f"serving {endpoint.model} v{endpoint.model_version} at {endpoint.url}/predict (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("stopping the endpoint and Ray")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
