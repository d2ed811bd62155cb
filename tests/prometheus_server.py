"""A real Prometheus server (Debian's `prometheus`) on loopback, scraping the given targets, for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from tests.trainer_runs import free_port


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("HERDSMAN_REQUIRE_PROMTOOL"):  # CI installs the package (promtool comes with it)
            pytest.fail("prometheus is required (Debian package prometheus)")
        pytest.skip("prometheus not installed")
    return path


@contextmanager
def prometheus(workdir: Path, jobs: dict[str, list[str]], honor_labels: tuple[str, ...] = ()):
    """jobs: scrape job name -> metrics URLs. Yields a query function: PromQL -> list of (labels, value)."""
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    scrape = []
    for name, urls in jobs.items():
        parts = [urlparse(u) for u in urls]
        scrape.append({"job_name": name, "scrape_interval": "1s", "metrics_path": parts[0].path or "/metrics",
                       "honor_labels": name in honor_labels, "static_configs": [{"targets": [p.netloc for p in parts]}]})
    (workdir / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"},
                                                            "scrape_configs": scrape}))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "prometheus.log", "w"))
    base = f"http://127.0.0.1:{port}"

    def query(promql: str) -> list[tuple[dict[str, str], float]]:
        r = httpx.get(base + "/api/v1/query", params={"query": promql}, timeout=10).json()
        assert r["status"] == "success", r
        return [(x["metric"], float(x["value"][1])) for x in r["data"]["result"]]

    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(base + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError("prometheus did not start: " + (workdir / "prometheus.log").read_text()[-2000:])
            time.sleep(0.2)
        yield query
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def wait_for(query, promql: str, ok, timeout_s: float = 30.0):
    deadline = time.time() + timeout_s
    while True:
        got = query(promql)
        if ok(got):
            return got
        if time.time() > deadline:
            raise AssertionError(f"{promql}: {got}")
        time.sleep(0.5)
