"""Prometheus config and alert rules: valid for promtool, unit-tested alerts, a runbook for every alert."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from herdsman.taxonomy import RootCause

DASH = Path(__file__).resolve().parent.parent / "dashboards"
RUNBOOKS = DASH.parent / "runbooks"


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("HERDSMAN_REQUIRE_PROMTOOL"):  # CI installs it: there a missing promtool is a failure
            pytest.fail("promtool is required (Debian package prometheus)")
        pytest.skip("promtool not installed")
    return path


def test_promtool_accepts_the_rules_and_the_config(promtool):
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        r = subprocess.run([promtool, *args], cwd=DASH, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_fire_as_their_unit_tests_expect(promtool):
    r = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=DASH, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def alert_rules():
    doc = yaml.safe_load((DASH / "alerts.yml").read_text())
    return [rule for g in doc["groups"] for rule in g["rules"] if "alert" in rule]


def test_every_alert_names_a_root_cause_and_links_its_runbook():
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        cause = RootCause(rule["labels"]["root_cause"])
        url = rule["annotations"]["runbook_url"]
        assert url.endswith("/" + cause.runbook), rule["alert"]
        assert (RUNBOOKS / cause.runbook).is_file()
        assert rule["labels"]["severity"] in ("critical", "warning")


def test_alert_expressions_use_exported_metric_names():
    """A metric renamed in agents/metrics.py breaks this test, not the alerts in production."""
    source = (DASH.parent / "agents" / "metrics.py").read_text()
    exported = set(re.findall(r'"(herdsman_[a-z_]+)"', source))
    for rule in alert_rules():
        for name in re.findall(r"herdsman_[a-z_]+", rule["expr"]):
            assert name.removesuffix("_total") in exported, (rule["alert"], name)


def exported_names() -> set[str]:
    names = set()
    for module in ("agents/metrics.py", "orchestrator/job_metrics.py"):
        names |= set(re.findall(r'"(herdsman_[a-z_]+)"', (DASH.parent / module).read_text()))
    return names


def test_every_grafana_dashboard_queries_exported_metrics_through_the_provisioned_datasource():
    import json

    ds = yaml.safe_load((DASH / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    boards = [json.loads(p.read_text()) for p in sorted(DASH.glob("*.json"))]
    assert {b["uid"] for b in boards} == {"herdsman-fleet", "herdsman-goodput", "herdsman-thermal"}
    exported = exported_names()
    for b in boards:
        ids = [p["id"] for p in b["panels"]]
        assert len(ids) == len(set(ids)), b["uid"]
        for panel in b["panels"]:
            assert panel["datasource"]["uid"] in uids
            for t in panel["targets"]:
                for name in re.findall(r"herdsman_[a-z_]+", t["expr"]):
                    assert name.removesuffix("_total") in exported, (b["uid"], panel["title"], name)


def test_docker_compose_file_validates():
    """`docker-compose config` (Debian's docker-compose 1.29; no engine is needed, none exists here)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("HERDSMAN_REQUIRE_COMPOSE"):
            pytest.fail("docker-compose is required (Debian package docker-compose)")
        pytest.skip("docker-compose not installed")
    compose = DASH.parent / "docker-compose.yml"
    env = {**os.environ, "RAY_AUTH_TOKEN": "test-secret"}
    r = subprocess.run([exe, "-f", str(compose), "config"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert set(cfg["services"]) == {"prometheus", "grafana", "ray-head", "ray-worker"}
    assert cfg["services"]["ray-head"]["environment"]["RAY_AUTH_TOKEN"] == "test-secret"
    # the shared Ray token is mandatory: no cluster starts with auth silently off
    env.pop("RAY_AUTH_TOKEN")
    r = subprocess.run([exe, "-f", str(compose), "config", "-q"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "set RAY_AUTH_TOKEN" in r.stderr
