"""The HTTP API over a stand-in controller: real uvicorn on loopback, real HTTP requests."""

import logging
import os
import re
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from herdsman import HerdsmanError
from orchestrator.api import MAX_BODY, ApiServer, create_app, is_loopback, load_or_create_token

TOKEN = "s3cret-operator-token"


class FakeOps:
    def __init__(self):
        self.hosts = {"host-1": "healthy", "host-2": "spare"}
        self.calls = []

    def status(self):
        return {"state": "running", "step": 12, "hosts": self.hosts, "verdicts": [{"cause": "faulty_gpu"}],
                "decisions": ["12:00:00 attempt 0: starting"]}

    def hosts_view(self):
        return [{"host": h, "state": s} for h, s in self.hosts.items()]

    def interruptions_view(self):
        return [{"attempt": 0, "cause": "faulty_gpu", "detection_s": 0.7}]

    def quarantine(self, host, reason):
        self.calls.append(("quarantine", host, reason))
        self.hosts[host] = "quarantined"

    def return_to_service(self, host):
        self.calls.append(("return", host))
        if host == "host-1":
            return ["gpu0 (GPU-x) is lost"]
        self.hosts[host] = "spare"
        return []

    def request_restart(self, reason):
        if reason == "boom":
            raise RuntimeError("could not reach postgresql://herdsman:hunter2@db.internal/herdsman")
        self.calls.append(("restart", reason))

    def request_stop(self, reason, drain=False):
        if reason == "twice":
            raise HerdsmanError("the job has already ended")
        self.calls.append(("stop-drain" if drain else "stop", reason))


@pytest.fixture
def api():
    ops = FakeOps()
    server = ApiServer(create_app(ops, TOKEN), "127.0.0.1", 0)
    url = server.start()
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client, ops
    server.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_read_only_views_need_no_token(api):
    client, _ = api
    assert client.get("/api/health").json() == {"ok": True}
    assert client.get("/api/job").json() == {"state": "running", "step": 12}
    assert client.get("/api/hosts").json()[0] == {"host": "host-1", "state": "healthy"}
    assert client.get("/api/verdicts").json() == [{"cause": "faulty_gpu"}]
    assert client.get("/api/interruptions").json()[0]["detection_s"] == 0.7


@pytest.mark.parametrize("path, body", [("/api/hosts/host-2/quarantine", {"reason": "reseat cable"}),
                                        ("/api/hosts/host-2/return", None), ("/api/job/restart", {"reason": "x"}),
                                        ("/api/job/stop", {"reason": "x"})])
def test_actions_without_or_with_a_wrong_token_are_refused(api, path, body):
    client, ops = api
    r = client.post(path, json=body)
    assert r.status_code == 401 and "operator token" in r.json()["detail"]
    r = client.post(path, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert ops.calls == []  # nothing was done


def test_operator_actions(api):
    client, ops = api
    r = client.post("/api/hosts/host-2/quarantine", json={"reason": "reseat cable"}, headers=AUTH)
    assert r.status_code == 200 and ops.hosts["host-2"] == "quarantined"
    r = client.post("/api/hosts/host-2/return", headers=AUTH)
    assert r.status_code == 200 and r.json()["returned"] and ops.hosts["host-2"] == "spare"
    r = client.post("/api/hosts/host-1/return", headers=AUTH)
    assert r.status_code == 409 and r.json()["problems"] == ["gpu0 (GPU-x) is lost"]
    assert client.post("/api/job/restart", json={"reason": "new config"}, headers=AUTH).status_code == 200
    assert ("restart", "new config") in ops.calls


@pytest.mark.parametrize("method, path, kwargs, status, text", [
    ("post", "/api/hosts/nope/quarantine", {"json": {"reason": "x"}}, 404, "no host named 'nope'"),
    ("post", "/api/hosts/host-1/quarantine", {"json": {}}, 422, "body.reason"),
    ("post", "/api/hosts/host-1/quarantine", {"json": {"reason": ""}}, 422, "at least 1 character"),
    ("post", "/api/hosts/host-1/quarantine", {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
     422, "malformed request"),
    ("post", "/api/job/stop", {"json": {"reason": "twice"}}, 409, "already ended"),
    ("get", "/api/nothing", {}, 404, "Not Found"),
    ("delete", "/api/job", {}, 405, "Method Not Allowed"),
])
def test_malformed_requests_get_a_clear_4xx(api, method, path, kwargs, status, text):
    client, _ = api
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = getattr(client, method)(path, headers=headers, **kwargs)
    assert r.status_code == status and text in r.text


def test_token_is_generated_once_and_private(tmp_path):
    t = load_or_create_token("", tmp_path)
    assert len(t) > 30 and load_or_create_token("", tmp_path) == t
    assert (tmp_path / "api_token").stat().st_mode & 0o077 == 0
    assert load_or_create_token("given-and-long-enough", tmp_path) == "given-and-long-enough"


# --- the token is checked before the body is read; bodies are capped ------------------------------------------------

@pytest.fixture
def raw():
    """Opens raw sockets to a real server on loopback: for requests httpx would not send as they are."""
    server = ApiServer(create_app(FakeOps(), TOKEN), "127.0.0.1", 0)
    port = int(server.start().rsplit(":", 1)[1])
    socks = []

    def connect():
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
        return s

    yield connect
    for s in socks:
        s.close()
    server.stop()


def _head(path, *lines):
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *lines,
                        "", ""]).encode()


def _response(s):
    """Status, head (lowercased) and body of the response; socket.timeout if the server waits instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head = head.decode("latin-1").lower()
    length = int(re.search(r"content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, body
        body += chunk
    return int(head.split()[1]), head, body


def _send_until_refused(s, total):
    """Send up to `total` bytes of body; how many went before the server dropped the connection."""
    sent = 0
    block = b"x" * 65536
    try:
        while sent < total:
            s.sendall(block)
            sent += len(block)
    except OSError:  # reset or broken pipe: the server closed instead of reading on
        pass
    return sent


def test_an_unauthenticated_large_body_is_refused_before_it_is_read(raw):
    s = raw()
    s.sendall(_head("/api/job/stop", "Content-Length: 200000000"))  # the headers only: not one byte of the body
    status, head, rest = _response(s)
    assert status == 401 and b"operator token" in rest and "www-authenticate: bearer" in head
    assert "connection: close" in head
    # the server does not go on reading: the connection is dropped long before 200 MB are through
    assert _send_until_refused(s, 200_000_000) < 100_000_000


def test_a_wrong_token_is_refused_before_the_body_too(raw):
    s = raw()
    s.sendall(_head("/api/job/stop", "Authorization: Bearer wrong", "Content-Length: 200000000"))
    assert _response(s)[0] == 403


def test_a_body_over_the_cap_is_refused_by_its_length_up_front(raw):
    s = raw()
    t0 = time.monotonic()
    s.sendall(_head("/api/job/stop", f"Authorization: Bearer {TOKEN}", "Content-Length: 200000000"))
    status, head, rest = _response(s)
    assert status == 413 and b"larger than this API accepts" in rest and "connection: close" in head
    assert time.monotonic() - t0 < 2


def test_a_chunked_body_over_the_cap_is_refused_while_it_streams(raw):
    s = raw()
    s.sendall(_head("/api/job/stop", f"Authorization: Bearer {TOKEN}", "Transfer-Encoding: chunked"))
    piece = b"x" * 16384
    for _ in range(MAX_BODY // len(piece) + 2):  # past the cap, and never the terminating chunk
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    status, _, rest = _response(s)
    assert status == 413 and b"larger than this API accepts" in rest


def test_a_chunked_body_under_the_cap_is_served(raw):
    s = raw()
    s.sendall(_head("/api/job/restart", f"Authorization: Bearer {TOKEN}", "Transfer-Encoding: chunked"))
    for part in (b'{"reason": ', b'"chunked"}'):
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    s.sendall(b"0\r\n\r\n")
    status, _, rest = _response(s)
    assert status == 200 and b"restart" in rest


def test_malformed_json_without_a_token_gets_401_not_422(api):
    client, ops = api
    r = client.post("/api/job/stop", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and "operator token" in r.json()["detail"]
    r = client.post("/api/job/stop", content=b"{not json", headers={"Authorization": "Basic Zm9vOmJhcg==",
                                                                       "Content-Type": "application/json"})
    assert r.status_code == 401
    r = client.delete("/api/job")
    assert r.status_code == 401 and ops.calls == []


def test_bodies_at_the_cap_still_reach_validation(api):
    client, _ = api
    r = client.post("/api/job/stop", json={"reason": "x" * (MAX_BODY - 20)}, headers=AUTH)
    assert r.status_code == 422 and "at most 500 characters" in r.text
    r = client.post("/api/job/stop", json={"reason": "x" * MAX_BODY}, headers=AUTH)
    assert r.status_code == 413


# --- Host header on a loopback bind (DNS rebinding); a loud warning on any other bind --------------------------------

LOOPBACK_HOSTS = ["127.0.0.1", "127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]", "[::1]:8080"]
OTHER_HOSTS = ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.evil.example", "127.0.0.1:80x",
               "::1", "", "0.0.0.0", "[::1]x"]


def test_a_loopback_bind_serves_only_loopback_host_names(api):
    client, ops = api
    for host in LOOPBACK_HOSTS:
        assert client.get("/api/hosts", headers={"Host": host}).status_code == 200, host
    for host in OTHER_HOSTS:  # what a page served from a rebound DNS name would send
        r = client.get("/api/hosts", headers={"Host": host})
        assert r.status_code == 421 and "loopback" in r.json()["detail"] and "Host" in r.json()["detail"], host
        r = client.post("/api/job/stop", json={"reason": "x"}, headers={**AUTH, "Host": host})
        assert r.status_code == 421, host
    assert ops.calls == []


def test_a_request_without_a_host_header_is_refused_on_loopback(raw):
    s = raw()
    s.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
    assert _response(s)[0] == 421


def test_a_bind_on_another_loopback_address_accepts_its_own_name():
    from orchestrator.api import LoopbackHostGuard

    guard = LoopbackHostGuard(create_app(FakeOps(), TOKEN), "127.0.0.2")
    assert guard.allows(b"127.0.0.2:9000") and guard.allows(b"localhost") and not guard.allows(b"10.0.0.1")
    assert is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost") and is_loopback("127.9.9.9")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")


def test_a_non_loopback_bind_warns_loudly_and_accepts_any_host(caplog):
    caplog.set_level(logging.WARNING, logger="herdsman.api")
    server = ApiServer(create_app(FakeOps(), TOKEN), "0.0.0.0", 0)  # never started: nothing listens on 0.0.0.0
    assert "API bound to 0.0.0.0 without TLS: put it behind a TLS proxy; tokens travel in clear" in caplog.text
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    with TestClient(server.app, base_url="http://controller.example") as c:
        assert c.get("/api/health").json() == {"ok": True}
    caplog.clear()
    ApiServer(create_app(FakeOps(), TOKEN), "127.0.0.1", 0)
    assert "without TLS" not in caplog.text


# --- the interactive docs are off unless configured ------------------------------------------------------------------

def test_docs_are_not_served_unless_asked_for(api):
    client, _ = api
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    with TestClient(create_app(FakeOps(), TOKEN, docs=True)) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/redoc").status_code == 200


# --- no exception text in a response -------------------------------------------------------------------------------

def test_an_unexpected_error_returns_an_id_not_its_text(api, caplog):
    client, _ = api
    caplog.set_level(logging.ERROR)
    r = client.post("/api/job/restart", json={"reason": "boom"}, headers=AUTH)
    assert r.status_code == 409
    assert "RuntimeError" not in r.text and "hunter2" not in r.text and "postgresql" not in r.text
    error_id = r.json()["error_id"]
    assert re.fullmatch(r"[0-9a-f]{8}", error_id) and error_id in r.json()["detail"]
    deadline = time.time() + 5
    while not any(error_id in rec.getMessage() for rec in caplog.records) and time.time() < deadline:
        time.sleep(0.02)
    logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
    assert logged and logged[0].exc_info and "could not reach" in caplog.text  # the log has it (passwords hidden)
    # our own errors, written for operators, are still returned as they are
    assert client.post("/api/job/stop", json={"reason": "twice"}, headers=AUTH).json()["detail"] == \
        "the job has already ended"


# --- the token file --------------------------------------------------------------------------------------------------

def test_a_token_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "api_token"
    path.write_text("a-token-long-enough-to-pass\n")
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(HerdsmanError, match="chmod 600"):
            load_or_create_token("", tmp_path)
    path.chmod(0o600)
    assert load_or_create_token("", tmp_path) == "a-token-long-enough-to-pass"


def test_a_symlinked_token_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("a-token-long-enough-to-pass\n")
    target.chmod(0o600)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "api_token").symlink_to(target)
    with pytest.raises(HerdsmanError, match="symlink"):
        load_or_create_token("", tmp_path / "run")


def test_short_tokens_are_refused(tmp_path):
    with pytest.raises(HerdsmanError, match="too short"):
        load_or_create_token("short-token", tmp_path)
    path = tmp_path / "api_token"
    path.write_text("tiny\n")
    path.chmod(0o600)
    with pytest.raises(HerdsmanError, match="too short"):
        load_or_create_token("", tmp_path)


def test_the_token_file_is_private_from_creation_and_never_half_written(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        t = load_or_create_token("", tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "api_token").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_token"] and len(t) > 30

    other = tmp_path / "other"
    other.mkdir()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        load_or_create_token("", other)
    assert list(other.iterdir()) == []  # neither a partial api_token nor a temporary file is left


def test_a_stop_can_wait_for_a_fresh_checkpoint(api):
    client, ops = api
    assert client.post("/api/job/stop", json={"reason": "end", "drain": True}, headers=AUTH).status_code == 200
    assert ops.calls[-1] == ("stop-drain", "end")
    assert client.post("/api/job/stop", json={"reason": "x", "drain": "soon"}, headers=AUTH).status_code == 422


def test_metrics_say_what_each_cause_cost(api):
    client, _ = api
    body = client.get("/metrics").text
    assert 'herdsman_job_badput_seconds_total{cause="faulty_gpu",job=' in body
    line = next(ln for ln in body.splitlines() if ln.startswith("herdsman_job_badput_seconds_total"))
    assert float(line.rsplit(" ", 1)[1]) == 0.7  # detection only: the restart is not known yet
