"""A small client for lakeray endpoints: timeouts on every call, retries (with backoff) on 502/503/504
and on connections that fail before a reply (a replica restarting, a rolling update, Serve's
back-pressure); any other answer is returned or raised at once.

    with Client("http://127.0.0.1:8000/fraud", token=os.environ["FRAUD_TOKEN"]) as client:
        client.predict([{"amount": 12.5, ...}])["predictions"]

Only ``httpx`` is imported: the client needs neither Ray nor MLflow.
"""

from __future__ import annotations

import glob
import os
import time
from typing import TYPE_CHECKING, Any

from lakeray.errors import ConfigError, LakerayError

if TYPE_CHECKING:
    from lakeray.config import Settings

__all__ = ["Client", "EndpointError", "endpoint_for_app"]

_RETRY_STATUS = {502, 503, 504}


class EndpointError(LakerayError):
    """The endpoint refused the request (4xx/5xx) or could not be reached within the retries."""

    def __init__(self, headline: str, fix: str | None = None, status: int | None = None, detail: Any = None):
        super().__init__(headline, fix)
        self.status, self.detail = status, detail

    def __reduce__(self):
        return (type(self), (self.headline, self.fix, self.status, self.detail))


class Client:
    """``url`` is the app's base URL (``http://host:port/<route>``)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 10.0, retries: int = 3,
                 backoff_s: float = 0.2) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def predict(self, instances: list[dict[str, Any]], request_id: str | None = None) -> dict[str, Any]:
        """``{"predictions", "model", "model_version", "request_id"}``; EndpointError for a refusal."""
        headers = {"x-request-id": request_id} if request_id else {}
        return self._call("POST", "/predict", json={"instances": instances}, headers=headers)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        url = f"{self.url}{path}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._http.request(method, url, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                last = str(exc) or type(exc).__name__
                continue
            except httpx.TimeoutException as exc:
                raise EndpointError(f"{url} did not answer within the timeout ({type(exc).__name__})",
                                    "raise the client's timeout, or check the app with `lakeray serve status`"
                                    ) from None
            if reply.status_code in _RETRY_STATUS:
                last = f"HTTP {reply.status_code}"
                continue
            body = _json(reply)
            if reply.status_code >= 400:
                raise EndpointError(f"{url} answered HTTP {reply.status_code}: {_summary(body)}",
                                    _fix(reply.status_code), reply.status_code, body)
            return body
        raise EndpointError(f"{url} is unavailable after {self.retries + 1} attempts ({last})",
                            "check the app with `lakeray serve status APP`")


def _json(reply: Any) -> Any:
    try:
        return reply.json()
    except ValueError:
        return {"detail": reply.text[:500]}


def _summary(body: Any) -> str:
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        more = f" (+{len(detail) - 1} more)" if len(detail) > 1 else ""
        return f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg')}{more}"
    return str(detail)[:300]


def _fix(status: int) -> str:
    return {401: "pass the app's bearer token (the variable its spec names in auth.token_env)",
            413: "send fewer instances per request",
            422: "fix the field named above; GET <url>/docs shows the request schema",
            404: "check the app's route (`lakeray serve list`)"}.get(status, "see the endpoint's logs")


def endpoint_for_app(settings: Settings, app: str) -> tuple[str, str | None]:
    """The base URL of ``app`` and the token env variable its spec names, from ``jobs/serving/*.yaml``
    (``lakeray`` without a spec: the app `lakeray serve` runs on /). No cluster connection needed."""
    from lakeray.serving.spec import load_serve_spec

    route, token_env = None, None
    for path in sorted(glob.glob(os.path.join(str(settings.project_dir), "jobs", "serving", "*.yaml"))):
        spec = load_serve_spec(path)
        if spec.name == app:
            route, token_env = spec.route, spec.auth.token_env if spec.auth else None
            break
    if route is None:
        if app != "lakeray":
            raise ConfigError(f"no serve spec in jobs/serving/ names app {app!r}",
                              "pass --url http://host:port/<route>, or the name of a spec's app")
        route = "/"
    cfg = settings.profile.serve
    host = cfg.host
    if host in ("0.0.0.0", "::", ""):
        address = settings.profile.ray.address or ""
        remote = address.removeprefix("ray://").rsplit(":", 1)[0] if "://" in address else ""
        host = remote or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.port}{route.rstrip('/')}", token_env
