import json
import os
import sys

import click

from lakeray.cli.main import settings_from


@click.command()
@click.argument("app")
@click.option("--json", "json_file", required=True, type=click.File("r"),
              help="Instances as JSON: a file, or - for stdin. {\"instances\": [...]}, a list of rows, or one row.")
@click.option("--url", default=None, help="The app's base URL (default: from its spec in jobs/serving/ and serve.*).")
@click.option("--token-env", default=None,
              help="Environment variable holding the bearer token (default: the spec's auth.token_env).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds per attempt.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries on 502/503/504 and refused connections.")
@click.pass_context
def predict(ctx: click.Context, app: str, json_file, url: str | None, token_env: str | None, timeout_s: float,
            retries: int) -> None:
    """Score instances with a deployed app; prints the endpoint's JSON answer.

    The URL comes from the app's spec (jobs/serving/*.yaml: route, auth) and the profile's serve.host/port;
    `lakeray` is the app `lakeray serve` runs on /.
    """
    from lakeray.errors import ConfigError
    from lakeray.serving.client import Client, endpoint_for_app

    try:
        payload = json.load(json_file)
    except ValueError as exc:
        raise ConfigError(f"--json {json_file.name}: not valid JSON ({exc})", "pass {\"instances\": [{...}]}") from None
    if isinstance(payload, dict) and "instances" in payload:
        instances = payload["instances"]
    elif isinstance(payload, list):
        instances = payload
    elif isinstance(payload, dict):
        instances = [payload]
    else:
        raise ConfigError(f"--json {json_file.name}: expected an object or a list of rows",
                          "pass {\"instances\": [{...}]}")
    spec_token_env = None
    if url is None:
        url, spec_token_env = endpoint_for_app(settings_from(ctx), app)
    token_env = token_env or spec_token_env
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        raise ConfigError(f"the app's token variable {token_env} is not set", f"export {token_env}=<the app's token>")
    with Client(url, token=token, timeout_s=timeout_s, retries=retries) as client:
        answer = client.predict(instances)
    json.dump(answer, sys.stdout)
    sys.stdout.write("\n")
