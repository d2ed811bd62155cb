"""The controller's HTTP API: read-only views for the operator page and tools, and token-protected actions.

Served on 127.0.0.1 by default. Mutating calls need `Authorization: Bearer <token>` (the token is
[api] token, or one generated at start and written to <run_dir>/api_token, readable by its owner only).
A malformed request gets a 4xx with a message saying what is wrong, never a 5xx.

The token is checked before any request body is read, and bodies are capped (MAX_BODY): an unauthenticated
or oversized request is answered without the server reading what it sends. On a loopback bind, requests
whose Host header is not a loopback name are refused (DNS rebinding). The interactive docs (/docs, /redoc,
/openapi.json) are off unless asked for.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
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
from herdsman.secrets import write_private
from orchestrator.job_metrics import JobCollector

log = logging.getLogger("herdsman.api")
ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "dashboards" / "web" / "index.html"
RUNBOOKS = ROOT / "runbooks"

MAX_BODY = 64 * 1024
"""The largest request body the API accepts (its bodies are a short reason): larger gets 413 unread."""
MIN_TOKEN_CHARS = 16
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Operations(Protocol):
    """What the API needs of the controller."""

    def status(self) -> dict[str, Any]: ...
    def hosts_view(self) -> list[dict[str, Any]]: ...
    def gpus_view(self) -> dict[str, Any]: ...
    def interruptions_view(self) -> list[dict[str, Any]]: ...
    def quarantine(self, host: str, reason: str) -> None: ...
    def return_to_service(self, host: str) -> list[str]: ...
    def request_restart(self, reason: str) -> None: ...
    def request_stop(self, reason: str, drain: bool = False) -> None: ...


class Reason(BaseModel):
    reason: str = Field(min_length=1, max_length=500, description="Why, for the record")


class StopRequest(Reason):
    drain: bool = Field(False, description="Stop after a fresh checkpoint (the ranks save, then exit)")


def _check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise HerdsmanError(f"the operator token in {where} is too short ({len(token)} characters, at least "
                            f"{MIN_TOKEN_CHARS}): use a random one, e.g. "
                            "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def load_or_create_token(configured: str, run_dir: Path) -> str:
    """[api] token if set, else <run_dir>/api_token: read if it exists (a regular file only its owner can read),
    else a new random token written there atomically with mode 0600 from its creation."""
    if configured:
        return _check_token(configured, "[api] token")
    path = Path(run_dir) / "api_token"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return _create_token(path)
    except OSError as e:
        if path.is_symlink():
            raise HerdsmanError(f"{path} is a symlink: refusing to read the operator token through it; replace "
                                f"it with a regular file (chmod 600 {path}) or delete it to have a new one "
                                "generated") from None
        raise HerdsmanError(f"cannot read the operator token file {path}: {e.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise HerdsmanError(f"{path} is not a regular file: delete it to have a new operator token generated")
        if st.st_mode & 0o077:
            raise HerdsmanError(f"{path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                                f"chmod 600 {path} (and replace the token if others may have read it)")
        token = f.read().strip()
    return _check_token(token, str(path))


def _create_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


# --- the ASGI layers in front of the app: they answer before any body is read ------------------------------------

def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


def _has_body(scope: Scope) -> bool:
    cl = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (cl is not None and cl.strip() not in (b"", b"0"))


async def _answer(send: Send, status: int, detail: str, *, close: bool = False,
                  headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
    """A JSON refusal. `close` when the request's body was left unread: the server then drops the connection
    rather than go on reading (and discarding) whatever the client still sends."""
    body = json.dumps({"detail": detail, **(extra or {})}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class OperatorGate:
    """Pure ASGI (nothing buffered): for mutating methods, the bearer token is checked on the headers alone, and
    every request body is capped at `max_body`: by Content-Length up front, and by counting while it streams
    (chunked). The body of a mutating request is read here, at most `max_body` bytes, and handed on."""

    def __init__(self, app: ASGIApp, token: str, max_body: int = MAX_BODY):
        self.app = app
        self.token = token.encode("utf-8")
        self.max_body = max_body

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        auth = _header(scope, b"authorization")
        scheme, _, cred = (auth or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not cred.strip():
            return (401, "this action needs an operator token: Authorization: Bearer <token>",
                    {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.strip(), self.token):
            return 403, "the operator token is not valid", {}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        mutating = scope["method"] in MUTATING
        if mutating:
            refused = self._refusal(scope)
            if refused is not None:
                status, detail, headers = refused
                await _answer(send, status, detail, headers=headers, close=_has_body(scope))
                return
        too_big = f"the request body is larger than this API accepts ({self.max_body} bytes)"
        cl = _header(scope, b"content-length")
        if cl is not None:
            try:
                declared = int(cl)
            except ValueError:
                await _answer(send, 400, "the Content-Length header is not a number", close=True)
                return
            if declared > self.max_body:
                await _answer(send, 413, too_big, close=True)
                return
        if not mutating or not _has_body(scope):
            await self.app(scope, receive, send)  # a GET's body, if any, is never read (the server drops it)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _answer(send, 413, too_big, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class UnexpectedErrors:
    """An exception the handlers do not expect: the controller could not do it right now (e.g. an agent did not
    answer), a conflict, not a crash. What went wrong goes to the log only (exception text can hold paths, hosts,
    secrets): the caller gets an id to find it there. Answered here rather than by an exception handler for
    Exception, which Starlette re-raises after answering, making the server drop the keep-alive connection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            error_id = secrets.token_hex(4)
            log.error("API %s %s failed (error id %s)", scope.get("method"), scope.get("path"), error_id,
                      exc_info=exc)
            if started:
                raise  # part of a response is out: nothing to do but let the server drop the connection
            await _answer(send, 409, f"could not complete the request (error id {error_id}: see the "
                          "controller's log)", extra={"error_id": error_id})


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoopbackHostGuard:
    """On a loopback bind, only requests naming a loopback host are served: a web page whose DNS name an attacker
    re-points to 127.0.0.1 (DNS rebinding) sends its own name as Host and is refused."""

    def __init__(self, app: ASGIApp, bind_host: str):
        self.app = app
        bound = bind_host.lower()
        self.allowed = set(LOOPBACK_NAMES) | {f"[{bound}]" if ":" in bound else bound}

    def allows(self, host_header: bytes | None) -> bool:
        if host_header is None:
            return False
        try:
            host = host_header.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return False
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not colon:
            name, port = host, ""
        elif not (port.isdigit() and len(port) <= 5):
            return False
        return name in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(_header(scope, b"host")):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _answer(send, 421, "this API is served on a loopback address and answers only requests for "
                          "localhost, 127.0.0.1 or [::1] (Host header); use one of those names",
                          close=_has_body(scope))
            return
        await self.app(scope, receive, send)


def create_app(ops: Operations, token: str, docs: bool = False, max_body: int = MAX_BODY) -> FastAPI:
    """The API over `ops`. `docs` serves /docs, /redoc and /openapi.json ([api] docs)."""
    app = FastAPI(title="Herdsman", version="0.1.0", description=__doc__,
                  **({} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}))
    app.add_middleware(OperatorGate, token=token, max_body=max_body)
    app.add_middleware(UnexpectedErrors)  # outermost of ours: also catches what goes wrong in the gate
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
    def stop(body: StopRequest) -> dict[str, Any]:
        ops.request_stop(body.reason, body.drain)
        return {"requested": "stop"}

    return app


class ApiServer:
    """uvicorn on a thread of the controller's process. On a loopback bind the Host header is checked
    (LoopbackHostGuard); on any other bind it is not, and a warning says to put a TLS proxy in front."""

    def __init__(self, app: ASGIApp, host: str, port: int):
        self.host = host
        if is_loopback(host):
            self.app: ASGIApp = LoopbackHostGuard(app, host)
        else:
            self.app = app
            log.warning("API bound to %s without TLS: put it behind a TLS proxy; tokens travel in clear", host)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self.server.run, name="herdsman-api", daemon=True)

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread.start()
        self._thread.join(0.05)
        deadline = time.time() + timeout_s
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise HerdsmanError(f"the API server did not start on {self.host}")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
