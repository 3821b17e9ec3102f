"""ServeSpec: validation errors name the file and field; a spec compiles to a config Ray's own
ServeDeploySchema accepts (what `serve deploy` and KubeRay read), with no token in it."""

from __future__ import annotations

import pytest
import yaml

from lakeray.errors import ConfigError
from lakeray.serving.spec import ServeSpec, compile_app, deploy_config, load_serve_spec
from tests.conftest import REPO

PINNED = "models:/lakeray_fraud_xgb/3"


def _spec(**changes):
    data = {"name": "fraud", "route": "/fraud", "model": "lakeray_fraud_xgb@champion", **changes}
    return ServeSpec.parse(data, "jobs/serving/test.yaml")


def test_the_shipped_spec_compiles_to_a_serve_deploy_schema(settings):
    from ray.serve.schema import ServeDeploySchema

    spec = load_serve_spec(REPO / "jobs" / "serving" / "fraud.yaml")
    config = deploy_config([compile_app(spec, settings, PINNED)], settings)
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True))
    again = ServeDeploySchema.model_validate(yaml.safe_load(text))  # what `serve deploy FILE` does with it
    app = again.applications[0]
    assert (app.name, app.route_prefix, app.import_path) == ("fraud", "/fraud", "lakeray.serving.app:build_app")
    assert app.args["model_uri"] == PINNED and app.args["log_table_uri"].endswith("/tables/prediction_log")
    deployment = app.deployments[0]
    assert deployment.autoscaling_config["min_replicas"] == 1 and deployment.autoscaling_config["max_replicas"] == 2
    assert deployment.ray_actor_options.num_cpus == 0.5
    assert again.http_options.port == settings.profile.serve.port


def test_the_import_path_builds_an_application_from_the_args(settings):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from lakeray.serving.app import build_app

    app = compile_app(_spec(), settings, PINNED)
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, app.args), Application)


def test_auth_puts_only_the_tokens_digest_in_the_config(settings):
    spec = _spec(auth={"token_env": "FRAUD_TOKEN"})
    app = compile_app(spec, settings, PINNED, environ={"FRAUD_TOKEN": "very-secret"})
    text = yaml.safe_dump(app.model_dump(mode="json", exclude_unset=True))
    assert "very-secret" not in text and len(app.args["token_sha256"]) == 64
    with pytest.raises(ConfigError, match="auth.token_env: the environment variable FRAUD_TOKEN is not set"):
        compile_app(spec, settings, PINNED, environ={})


@pytest.mark.parametrize(("changes", "message"), [
    ({"replicas": 2}, "jobs/serving/test.yaml: replicas: unknown key"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling: min_replicas (3) is above max_replicas"),
    ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}}, "autoscaling: initial_replicas"),
    ({"autoscaling": {"target_ongoing_requests": 0}}, "autoscaling.target_ongoing_requests: Input should be greater"),
    ({"resources": {"cpus": 0}}, "resources.cpus: Input should be greater than 0"),
    ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
    ({"model": "lakeray_fraud_xgb"}, "model: 'lakeray_fraud_xgb': write name@alias"),
    ({"route": "fraud/"}, "route: 'fraud/': a path such as /fraud"),
    ({"name": "has space"}, "name: 'has space'"),
    ({"auth": {"token_env": "not a name"}}, "auth.token_env: 'not a name' is not an environment variable name"),
    ({"auth": {"token": "abc"}}, "auth.token: unknown key"),
])
def test_bad_specs_name_the_file_and_field(changes, message):
    with pytest.raises(ConfigError) as err:
        _spec(**changes)
    assert message in err.value.headline


def test_two_apps_on_one_route_are_refused_by_rays_schema(settings):
    first = compile_app(_spec(), settings, PINNED)
    second = compile_app(_spec(name="fraud-uat"), settings, PINNED)
    with pytest.raises(ConfigError, match='Ray Serve refuses the combined config: .*route prefix "/fraud"'):
        deploy_config([first, second], settings)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_serve_spec(bad)
