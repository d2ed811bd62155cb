"""`herdsman dashboards push` through grafana-client against the recorded-API stand-in (tests/grafana_standin.py):
no Grafana server can be installed here, so this checks what is sent and how refusals read, not Grafana itself."""

import json

import pytest
from click.testing import CliRunner

from herdsman import HerdsmanError
from orchestrator.api import ApiServer
from orchestrator.cli import main
from orchestrator.grafana_push import DATASOURCE_UID, load_dashboards, push
from tests.grafana_standin import grafana_standin


@pytest.fixture
def grafana():
    app = grafana_standin(token="glsa_test")
    server = ApiServer(app, "127.0.0.1", 0)
    url = server.start()
    yield url, app.state
    server.stop()


def test_push_creates_folder_datasource_and_every_dashboard_then_updates_in_place(grafana):
    url, state = grafana
    boards = load_dashboards()
    pushed = push(url, "glsa_test", boards, prometheus_url="http://prometheus:9090")
    assert sorted(p.uid for p in pushed) == ["herdsman-fleet", "herdsman-goodput", "herdsman-thermal"]
    assert all(p.version == 1 and p.url.startswith(f"/d/{p.uid}/") for p in pushed)
    assert state.folders["herdsman"]["title"] == "Herdsman"
    assert state.datasources[DATASOURCE_UID]["url"] == "http://prometheus:9090"
    stored = state.dashboards["herdsman-fleet"]
    assert stored["folderUid"] == "herdsman" and stored["dashboard"]["panels"] == boards[0]["panels"]

    # again, with the datasource moved: nothing duplicated, dashboards bumped, datasource repointed
    n_folder_posts = sum(1 for m, p, _ in state.requests if (m, p) == ("POST", "/api/folders"))
    again = push(url, "glsa_test", boards, prometheus_url="http://prom.internal:9090")
    assert [p.version for p in again] == [2, 2, 2]
    assert sum(1 for m, p, _ in state.requests if (m, p) == ("POST", "/api/folders")) == n_folder_posts == 1
    assert state.datasources[DATASOURCE_UID]["url"] == "http://prom.internal:9090"
    sent = [json.loads(b) for m, p, b in state.requests if p == "/api/dashboards/db"]
    assert all(s["overwrite"] is True and s["dashboard"]["id"] is None for s in sent)


def test_refusals_are_one_clear_error(grafana):
    url, _ = grafana
    with pytest.raises(HerdsmanError, match="HTTP 401.*Unauthorized"):
        push(url, "wrong", load_dashboards(), prometheus_url="http://p:9090")
    with pytest.raises(HerdsmanError, match="no datasource with uid 'herdsman-prometheus'.*--prometheus-url"):
        push(url, "glsa_test", load_dashboards())
    with pytest.raises(HerdsmanError, match="cannot reach Grafana"):
        push("http://127.0.0.1:9", "glsa_test", load_dashboards(), timeout_s=2)


def test_bad_dashboard_files_are_refused_before_anything_is_sent(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(HerdsmanError, match="a.json is not valid JSON"):
        load_dashboards(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"title": "no uid"}))
    with pytest.raises(HerdsmanError, match="needs a uid and a title"):
        load_dashboards(tmp_path)


def test_cli_push_with_basic_auth(grafana):
    url, state = grafana
    r = CliRunner().invoke(main, ["dashboards", "push", "--url", url, "--user", "admin", "--password", "admin",
                                  "--prometheus-url", "http://prometheus:9090"])
    assert r.exit_code == 0, r.output
    assert r.output.count("pushed ") == 3 and f"{url}/d/herdsman-goodput/" in r.output
    r = CliRunner().invoke(main, ["dashboards", "push", "--url", url, "--token", "nope"])
    assert r.exit_code == 2 and "herdsman: error: Grafana at" in r.output and "Unauthorized" in r.output
