"""The controller's HTTP API: read-only views for the operator page and tools, and token-protected actions.

Served on 127.0.0.1 by default. Mutating calls need `Authorization: Bearer <token>` (the token is
[api] token, or one generated at start and written to <run_dir>/api_token, readable by its owner only).
A malformed request gets a 4xx with a message saying what is wrong, never a 5xx.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field

from herdsman import HerdsmanError
from orchestrator.job_metrics import JobCollector

log = logging.getLogger("herdsman.api")
ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "dashboards" / "web" / "index.html"
RUNBOOKS = ROOT / "runbooks"


class Operations(Protocol):
    """What the API needs of the controller."""

    def status(self) -> dict[str, Any]: ...
    def hosts_view(self) -> list[dict[str, Any]]: ...
    def gpus_view(self) -> dict[str, Any]: ...
    def interruptions_view(self) -> list[dict[str, Any]]: ...
    def quarantine(self, host: str, reason: str) -> None: ...
    def return_to_service(self, host: str) -> list[str]: ...
    def request_restart(self, reason: str) -> None: ...
    def request_stop(self, reason: str) -> None: ...


class Reason(BaseModel):
    reason: str = Field(min_length=1, max_length=500, description="Why, for the record")


def load_or_create_token(configured: str, run_dir: Path) -> str:
    if configured:
        return configured
    path = Path(run_dir) / "api_token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def create_app(ops: Operations, token: str) -> FastAPI:
    app = FastAPI(title="Herdsman", version="0.1.0", description=__doc__)
    bearer = HTTPBearer(auto_error=False)

    def operator(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(401, "this action needs an operator token: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(403, "the operator token is not valid")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"malformed request: {problems}"}, status_code=422)

    @app.exception_handler(HerdsmanError)
    async def refused(request: Request, exc: HerdsmanError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the controller could not do it right now (e.g. an agent did not answer): a conflict, not a crash
        log.exception("API request failed")
        return JSONResponse({"detail": f"could not complete the request: {type(exc).__name__}: {exc}"},
                            status_code=409)

    def known_host(host: str) -> None:
        if host not in {h["host"] for h in ops.hosts_view()}:
            raise HTTPException(404, f"no host named {host!r}")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The operator page: a static file that polls the views below."""
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/runbooks/{name}", include_in_schema=False)
    def runbook(name: str) -> PlainTextResponse:
        path = RUNBOOKS / name
        if not name.endswith(".md") or "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404, f"no runbook named {name!r}")
        return PlainTextResponse(path.read_text(), media_type="text/markdown; charset=utf-8")

    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(ops))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """The job-level series for Prometheus (the agents export the per-node ones)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/gpus")
    def gpus() -> dict[str, Any]:
        return ops.gpus_view()

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/api/job")
    def job() -> dict[str, Any]:
        st = ops.status()
        return {k: v for k, v in st.items() if k not in ("hosts", "verdicts", "decisions")}

    @app.get("/api/hosts")
    def hosts() -> list[dict[str, Any]]:
        return ops.hosts_view()

    @app.get("/api/verdicts")
    def verdicts() -> list[dict[str, Any]]:
        return ops.status()["verdicts"]

    @app.get("/api/decisions")
    def decisions() -> list[str]:
        return ops.status()["decisions"]

    @app.get("/api/interruptions")
    def interruptions() -> list[dict[str, Any]]:
        return ops.interruptions_view()

    @app.post("/api/hosts/{host}/quarantine", dependencies=[Depends(operator)])
    def quarantine(host: str, body: Reason) -> dict[str, Any]:
        known_host(host)
        ops.quarantine(host, body.reason)
        return {"host": host, "state": "quarantined"}

    @app.post("/api/hosts/{host}/return", dependencies=[Depends(operator)])
    def return_to_service(host: str) -> JSONResponse:
        known_host(host)
        problems = ops.return_to_service(host)
        if problems:
            return JSONResponse({"host": host, "returned": False, "problems": problems}, status_code=409)
        return JSONResponse({"host": host, "returned": True, "problems": []})

    @app.post("/api/job/restart", dependencies=[Depends(operator)])
    def restart(body: Reason) -> dict[str, Any]:
        ops.request_restart(body.reason)
        return {"requested": "restart"}

    @app.post("/api/job/stop", dependencies=[Depends(operator)])
    def stop(body: Reason) -> dict[str, Any]:
        ops.request_stop(body.reason)
        return {"requested": "stop"}

    return app


class ApiServer:
    """uvicorn on a thread of the controller's process."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="herdsman-api", daemon=True)

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread.start()
        self._thread.join(0.05)
        import time

        deadline = time.time() + timeout_s
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise HerdsmanError(f"the API server did not start on {self.host}")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
