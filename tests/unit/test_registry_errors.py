"""resolve_alias tells a model that is not registered apart from a tracking server that is down or
refuses the credentials, and a down server fails in seconds, not after minutes of retries."""

import http.server
import socket
import threading
import time

import pytest

from lakeray.config import load_settings
from lakeray.errors import ModelRegistryError
from lakeray.registry import resolve_alias
from tests.conftest import REPO


def _settings(tmp_path, tracking_uri: str | None = None):
    environ = {"LAKERAY_STORAGE__ROOT": str(tmp_path / "lakehouse")}
    if tracking_uri:
        environ["LAKERAY_MLFLOW__TRACKING_URI"] = tracking_uri
    return load_settings(REPO / "lakeray.yaml", "local", environ=environ)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def answering(request):
    """A real HTTP server on 127.0.0.1 that answers every request with the given status."""
    status = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = b"<html>denied</html>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield status, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_model_that_is_not_registered_is_named_as_such(tmp_path):
    with pytest.raises(ModelRegistryError, match="not in the registry") as err:
        resolve_alias(_settings(tmp_path), "models:/never_trained@champion")
    assert "train" in err.value.fix


def test_a_server_that_is_down_is_not_reported_as_a_missing_model_and_fails_fast(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.perf_counter()
    with pytest.raises(ModelRegistryError) as err:
        resolve_alias(_settings(tmp_path, uri), "models:/fraud@champion")
    assert time.perf_counter() - started < 30
    headline = err.value.headline
    assert "not in the registry" not in headline
    assert f"cannot reach the MLflow server at {uri}" in headline and "connection refused" in headline
    assert "mlflow.tracking_uri" in err.value.fix


@pytest.mark.parametrize("answering", [401, 403], indirect=True)
def test_refused_credentials_are_named(tmp_path, answering):
    status, uri = answering
    with pytest.raises(ModelRegistryError) as err:
        resolve_alias(_settings(tmp_path, uri), "models:/fraud@champion")
    headline = err.value.headline
    assert "not in the registry" not in headline
    assert uri in headline and str(status) in headline and "credentials" in headline
    assert "MLFLOW_TRACKING_TOKEN" in err.value.fix
