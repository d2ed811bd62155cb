"""Property-based fuzzing of the HTTP API: random methods, paths under its routes, bodies (bytes, JSON, huge,
unicode, nested, chunked), Authorization and Host headers, sent through the same ASGI stack ApiServer serves on a
loopback bind (Host guard, operator gate, app), in-process. Whatever comes in, the answer is a 2xx/4xx with a JSON
or text body, never a 5xx, never an unexpected exception (not even one turned into a 409 with an error id), never a
traceback or an exception class name; and nothing is done without the token."""

import json
import logging
import re
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from herdsman import HerdsmanError
from orchestrator.api import MAX_BODY, ApiServer, create_app

TOKEN = "fuzz-operator-token-0123456789"
HOSTS = ["host-1", "host-2"]


class Ops:
    """A stand-in controller with every view the routes and /metrics read."""

    def __init__(self):
        self.hosts = {"host-1": "healthy", "host-2": "spare"}
        self.calls = []

    def status(self):
        return {"job": "fuzz", "state": "running", "reason": "", "attempt": 1, "step": 12, "target_step": 40,
                "loss": 2.5, "ettr": 0.8, "step_time_s": 0.1, "since_checkpoint_s": 3.0, "wall_s": 60.0,
                "productive_s": 48.0, "checkpoint_s": 2.0, "hosts": self.hosts, "verdicts": [], "decisions": []}

    def hosts_view(self):
        return [{"host": h, "state": s} for h, s in self.hosts.items()]

    def gpus_view(self):
        return {"gpus": [], "stragglers": []}

    def interruptions_view(self):
        return [{"attempt": 0, "cause": "faulty_gpu", "planned": False, "detection_s": 0.7, "restart_s": 0.1,
                 "restore_s": 1.0, "lost_work_s": 1.2}]

    def quarantine(self, host, reason):
        self.calls.append(("quarantine", host, reason))

    def return_to_service(self, host):
        self.calls.append(("return", host))
        return ["gpu0 is lost"] if host == "host-1" else []

    def request_restart(self, reason):
        self.calls.append(("restart", reason))

    def request_stop(self, reason, drain=False):
        if reason == "twice":
            raise HerdsmanError("the job has already ended")
        self.calls.append(("stop", reason))


class Unexpected(logging.Handler):
    """Collects what herdsman.api logs as an unexpected failure."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


OPS = Ops()
SERVED = ApiServer(create_app(OPS, TOKEN), "127.0.0.1", 0).app  # what a loopback bind serves; never started
UNEXPECTED = Unexpected()

# --- strategies ------------------------------------------------------------------------------------------------------

def mostly(usual, unusual, usual_in_10=6):
    """`usual` about usual_in_10 times in 10, so most requests get past the gates to the routes."""
    return st.integers(0, 9).flatmap(lambda i: usual if i < usual_in_10 else unusual)


odd_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
segment = st.one_of(st.sampled_from(["nope", "", ".", "..", "%00", "%2e%2e", "%2F", "a/b", "faulty_gpu.md",
                                     "..%2f..%2fetc%2fpasswd", ".hidden.md", "x" * 300]),
                    odd_text.map(lambda t: quote(t, safe="")))
host_name = mostly(st.sampled_from(HOSTS), segment)
views = st.sampled_from(["/", "/metrics", "/api/gpus", "/api/health", "/api/job", "/api/hosts", "/api/verdicts",
                         "/api/decisions", "/api/interruptions"])
actions = st.one_of(st.sampled_from(["/api/job/restart", "/api/job/stop"]),
                    host_name.map(lambda s: f"/api/hosts/{s}/quarantine"),
                    host_name.map(lambda s: f"/api/hosts/{s}/return"))
path = st.one_of(
    views, actions,
    st.sampled_from(["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/api", "/api/", "/api/job/stop/",
                     "/api/hosts/host-2", "/runbooks/faulty_gpu.md"]),
    segment.map(lambda s: f"/runbooks/{s}"),
    st.lists(segment, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
method = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
route = mostly(st.one_of(views.map(lambda p: ("GET", p)), actions.map(lambda p: ("POST", p))),
               st.tuples(method, path))
query = st.one_of(st.just(""), odd_text.map(lambda t: "?" + quote(t, safe="=&")))
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | odd_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(odd_text, inner, max_size=5), max_leaves=30)
body = st.one_of(
    st.none(),
    st.binary(max_size=200),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"reason": st.one_of(odd_text, json_value, st.integers(0, 600).map(lambda n: "é" * n))},
                          optional={"extra": json_value}).map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    st.sampled_from([b'{"reason": "twice"}', b'{"reason": "x"', b"\xff\xfe{", b'{"reason": "\\ud800"}',
                     b"[" * 5000 + b"]" * 5000, b'{"reason": ' + b'"' + b"x" * (MAX_BODY + 10) + b'"}']),
    st.tuples(st.integers(MAX_BODY - 64, MAX_BODY + 64), st.sampled_from([b"x", b"\x00", "\u00e9".encode()]))
    .map(lambda t: (t[1] * t[0])[:t[0]]),  # around the cap
)
auth = mostly(st.just(f"Bearer {TOKEN}"), st.one_of(st.none(), st.sampled_from([
    f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} ", "Bearer wrong", "Bearer", "Bearer ", f"Basic {TOKEN}",
    f"Token {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Digest username=x", f"{TOKEN}"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)), usual_in_10=5)
host = mostly(st.sampled_from(["127.0.0.1", "127.0.0.1:8080", "localhost", "localhost:1", "[::1]:80", "[::1]",
                               "LOCALHOST"]),
              st.one_of(st.sampled_from(["evil.example", "127.0.0.1.nip.io", "localhost.evil", "[::1", "::1", ":80",
                                         "", "127.0.0.1:99999999", "127.0.0.1:", "0.0.0.0"]),
                        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)), usual_in_10=8)
content_type = st.one_of(st.none(), st.sampled_from(["application/json", "application/json; charset=latin-1",
                                                     "text/plain", "application/x-www-form-urlencoded",
                                                     "multipart/form-data; boundary=x", "application/*+json"]))

LOOPBACK_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback|File \"")
OK_TYPES = ("application/json", "text/")


@pytest.fixture(scope="module")
def client():
    log = logging.getLogger("herdsman.api")
    log.addHandler(UNEXPECTED)
    # raise_server_exceptions: an exception that escapes the stack fails the test outright
    with TestClient(SERVED, base_url="http://127.0.0.1", raise_server_exceptions=True) as c:
        yield c
    log.removeHandler(UNEXPECTED)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(route=route, query=query, body=body, auth=auth, host=host, content_type=content_type,
       chunked=st.booleans())
def test_no_request_gets_a_5xx_a_traceback_or_an_unauthorized_action(client, route, query, body, auth, host,
                                                                       content_type, chunked):
    method, path = route
    headers = {"Host": host}
    if auth is not None:
        headers["Authorization"] = auth.encode("latin-1")
    if content_type is not None:
        headers["Content-Type"] = content_type
    content = None
    if body is not None and method not in ("GET", "HEAD"):  # TestClient would not send those anyway
        content = iter([body[i:i + 4096] for i in range(0, len(body), 4096)]) if chunked else body
    before = len(OPS.calls)
    UNEXPECTED.records.clear()

    r = client.request(method, path + query, content=content, headers=headers)

    event(f"{r.status_code}")
    assert 200 <= r.status_code < 500 and r.status_code not in range(300, 400), (r.status_code, r.text[:500])
    assert not UNEXPECTED.records, UNEXPECTED.records[0].getMessage()
    kind = r.headers.get("content-type", "")
    if method != "HEAD" and r.content:
        assert kind.startswith(OK_TYPES), r.headers
    if kind.startswith("application/json") and method != "HEAD":
        answer = r.json()
        if r.status_code >= 400:
            assert isinstance(answer, dict) and (answer.get("detail") or answer.get("problems")), answer
    if r.status_code >= 400 or kind.startswith("application/json"):
        assert not EXCEPTION_NAME.search(r.text), r.text[:500]
    authorized = auth is not None and _bearer(auth) == TOKEN
    loopback = LOOPBACK_HOST.fullmatch(host) is not None
    if not loopback:
        assert r.status_code == 421, (host, r.status_code)
    elif method in ("POST", "PUT", "PATCH", "DELETE") and not authorized:
        assert r.status_code in (401, 403), (auth, r.status_code, r.text[:200])
    if len(OPS.calls) > before:
        assert authorized and loopback and method == "POST", (method, auth, host)


def _bearer(auth):
    scheme, _, cred = auth.encode("latin-1").strip().partition(b" ")
    return cred.strip().decode("latin-1") if scheme.lower() == b"bearer" else None
