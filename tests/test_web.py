"""The operator page in a real headless Chromium (Playwright) against the real API server over a stand-in
controller: it renders the fleet, the job, GPUs and stragglers and the interruptions, updates without a reload,
and its actions send the operator token."""

import os
import shutil
import time
from contextlib import contextmanager

import httpx
import pytest

from herdsman.events import TIME_SPLIT
from orchestrator.api import ApiServer, create_app
from tests.conftest import artifacts_dir

TOKEN = "page-token"
ARTIFACTS = artifacts_dir()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Ops:
    def __init__(self):
        self.hosts = {"host-1": "healthy", "host-2": "quarantined", "host-3": "spare"}
        self.step = 12
        self.calls = []
        self.its = [{"attempt": 0, "cause": "faulty_gpu", "planned": False, "detection_s": 0.9, "restart_s": 0.1,
                     "restore_s": 1.0, "lost_work_s": 1.2, "last_step": 10, "resumed_step": 5,
                     "runbook": "runbooks/faulty_gpu.md",
                     "verdict": {"cause": "faulty_gpu", "confidence": 0.95, "hosts": ["host-2"], "ranks": [1],
                                 "evidence": ["[host-2 gpu0] gpu_xid: Xid 79: GPU has fallen off the bus <b>"],
                                 "action": "evict", "reason": "hardware evidence on host-2"}}]

    def status(self):
        return {"job": "llama3", "state": "running", "reason": "", "attempt": 1, "step": self.step, "target_step": 40, "loss": 2.5,
                "ettr": 0.81, "step_time_s": 0.12, "since_checkpoint_s": 3.0, "hosts": self.hosts,
                "verdicts": [], "decisions": [],
                "split": {"productive": 40.5, "checkpoint": 1.0, "startup": 5.0, "lost_work": 1.2, "unexplained": 0.3}}

    def hosts_view(self):
        return [{"host": h, "state": s, "since": time.time() - 5, "reason": "faulty_gpu: Xid 79" if s ==
                 "quarantined" else "", "latest_evidence": "[host-2 gpu0] gpu_lost: GPU is lost"
                 if h == "host-2" else "", "gpus": 2, "lost_gpus": int(h == "host-2"), "in_job": s == "healthy"}
                for h, s in self.hosts.items()]

    def gpus_view(self):
        return {"gpus": [{"host": "host-1", "index": 0, "temperature_c": 91.5, "sm_clock_mhz": 1200.0,
                          "max_sm_clock_mhz": 1980.0, "throttle_reasons": ["hw_slowdown", "hw_thermal"],
                          "utilization_pct": 90.0}],
                "stragglers": ["[host-1 gpu0 rank0] straggler: rank 0 straggling (thermal): 1.52x"]}

    def interruptions_view(self):
        return self.its

    def quarantine(self, host, reason):
        self.calls.append(("quarantine", host, reason))
        self.hosts[host] = "quarantined"

    def return_to_service(self, host):
        self.calls.append(("return", host))
        self.hosts[host] = "spare"
        return []

    def request_restart(self, reason):
        self.calls.append(("restart", reason))

    def request_stop(self, reason, drain=False):
        self.calls.append(("stop", reason))


@contextmanager
def chromium_page():
    """A page in Debian's Chromium driven by Playwright (the tests need no browser download)."""
    if CHROMIUM is None:
        if os.environ.get("HERDSMAN_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required (Debian package chromium)")
        pytest.skip("no Chromium on this machine")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda d: d.accept("bad fan" if d.type == "prompt" else None))
            yield page
        finally:
            browser.close()


def save_screenshot(page, name: str) -> str:
    """Under $HERDSMAN_ARTIFACTS (default test-artifacts/); the test summary lists every file written there."""
    path = ARTIFACTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real render, not a blank page
    return str(path)


@pytest.fixture
def page_and_ops():
    ops = Ops()
    server = ApiServer(create_app(ops, TOKEN), "127.0.0.1", 0)
    url = server.start()
    try:
        with chromium_page() as page:
            page.goto(url + "/")
            yield page, ops, url
    finally:
        server.stop()


def test_the_page_shows_fleet_job_gpus_and_interruptions(page_and_ops):
    page, ops, url = page_and_ops
    page.wait_for_selector("#hosts tr[data-host='host-2']")
    assert page.inner_text("#hosts tr[data-host='host-2'] .state") == "quarantined"
    assert "gpu_lost: GPU is lost" in page.inner_text("#hosts tr[data-host='host-2']")
    assert page.inner_text("[data-kpi='ETTR so far']") == "81.0%"
    assert page.inner_text("[data-kpi='step']") == "12 / 40"
    assert "hw_thermal" in page.inner_text("#gpus") and "straggling (thermal)" in page.inner_text("#stragglers")
    text = page.inner_text("#interruptions")
    assert "faulty_gpu" in text and "Xid 79: GPU has fallen off the bus <b>" in text  # escaped, shown as text
    assert page.get_attribute("#interruptions a", "href") == "/runbooks/faulty_gpu.md"
    r = httpx.get(url + "/runbooks/faulty_gpu.md")  # the link works
    assert r.status_code == 200 and "Xid 79" in r.text
    save_screenshot(page, "operator-page-standin.png")


def test_the_page_updates_without_a_reload(page_and_ops):
    page, ops, _ = page_and_ops
    page.wait_for_selector("#hosts tr[data-host='host-3']")
    page.evaluate("window.marker = 42")  # lost on a reload
    ops.step = 33
    ops.hosts["host-3"] = "unreachable"
    page.wait_for_function("document.querySelector(\"[data-kpi='step']\").textContent === '33 / 40'", timeout=10000)
    page.wait_for_function("document.querySelector(\"#hosts tr[data-host='host-3'] .state\").textContent "
                           "=== 'unreachable'", timeout=10000)
    assert page.evaluate("window.marker") == 42


def test_actions_need_the_token_and_send_it(page_and_ops):
    page, ops, _ = page_and_ops
    page.wait_for_selector("#hosts tr[data-host='host-1'] button")
    page.click("#hosts tr[data-host='host-1'] button")  # no token yet
    assert "operator token" in page.inner_text("#message") and ops.calls == []
    page.fill("#token", "wrong")
    page.click("#hosts tr[data-host='host-1'] button")
    page.wait_for_function("document.getElementById('message').textContent.includes('403')", timeout=10000)
    assert ops.calls == []
    page.fill("#token", TOKEN)
    page.click("#hosts tr[data-host='host-1'] button")
    page.wait_for_function("document.getElementById('message').className === 'ok'", timeout=10000)
    assert ops.calls == [("quarantine", "host-1", "bad fan")]
    page.wait_for_selector("#hosts tr[data-host='host-1'] button[data-action='return']", timeout=10000)
    page.click("#hosts tr[data-host='host-1'] button[data-action='return']")
    page.wait_for_function("document.querySelector(\"#hosts tr[data-host='host-1'] .state\").textContent "
                           "=== 'spare'", timeout=10000)
    page.click("#restart")
    page.wait_for_function("document.getElementById('message').textContent.includes('/api/job/restart')")
    assert ("restart", "bad fan") in ops.calls


def test_controller_metrics_share_the_vocabulary_of_the_page():
    """/metrics on the API: the job, its time split, interruptions by root cause, host states."""
    from prometheus_client.parser import text_string_to_metric_families

    ops = Ops()
    server = ApiServer(create_app(ops, TOKEN), "127.0.0.1", 0)
    url = server.start()
    try:
        body = httpx.get(url + "/metrics", timeout=10).text
    finally:
        server.stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    job = (("job", "llama3"),)
    assert samples[("herdsman_job_step", job)] == 12 and samples[("herdsman_job_ettr", job)] == 0.81
    assert samples[("herdsman_interruptions_total", (("category", "GPU"), ("cause", "faulty_gpu"),
                                                     ("component", "Faulty GPU"), ("job", "llama3"),
                                                     ("planned", "false")))] == 1
    assert samples[("herdsman_host_state", (("host", "host-2"), ("state", "quarantined")))] == 1
    assert samples[("herdsman_host_state", (("host", "host-2"), ("state", "healthy")))] == 0
    split = {dict(l)["kind"]: v for (n, l), v in samples.items() if n == "herdsman_job_time_seconds_total"}
    assert set(split) == set(TIME_SPLIT)  # every bucket, the ones with nothing in them at 0
    assert (split["lost_work"], split["unexplained"], split["restart"]) == (1.2, 0.3, 0.0)
