"""The HTTP API over a stand-in controller: real uvicorn on loopback, real HTTP requests."""

import httpx
import pytest

from herdsman import HerdsmanError
from orchestrator.api import ApiServer, create_app, load_or_create_token

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
        self.calls.append(("restart", reason))

    def request_stop(self, reason):
        if reason == "twice":
            raise HerdsmanError("the job has already ended")
        self.calls.append(("stop", reason))


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
    assert client.get("/openapi.json").status_code == 200


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
    assert load_or_create_token("given", tmp_path) == "given"
