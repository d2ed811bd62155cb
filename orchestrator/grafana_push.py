"""Provision Herdsman's Grafana dashboards (and their Prometheus datasource) to a running Grafana over its HTTP API.

The same JSON files are also provisioned from files by docker-compose (dashboards/grafana/provisioning); this is
for a Grafana that Herdsman does not deploy. Pushing is idempotent: the folder and datasource are created once,
dashboards are overwritten by uid, so re-running after editing a dashboard updates it in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException
from niquests.exceptions import RequestException

from herdsman import HerdsmanError

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "dashboards"
DATASOURCE_UID = "herdsman-prometheus"  # the uid every dashboard panel names


@dataclass(frozen=True)
class Pushed:
    uid: str
    title: str
    url: str
    version: int


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> list[dict[str, Any]]:
    """Every `*.json` dashboard in the directory, checked enough that Grafana will not reject it half-way."""
    boards = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            board = json.loads(path.read_text())
        except ValueError as e:
            raise HerdsmanError(f"dashboard {path} is not valid JSON: {e}") from None
        if not isinstance(board, dict) or not board.get("uid") or not board.get("title"):
            raise HerdsmanError(f"dashboard {path} needs a uid and a title")
        if len(board["uid"]) > 40:
            raise HerdsmanError(f"dashboard {path}: uid {board['uid']!r} is longer than Grafana's 40 characters")
        boards.append(board)
    if not boards:
        raise HerdsmanError(f"no dashboards (*.json) in {directory}")
    return boards


def _missing(e: GrafanaException) -> bool:
    return isinstance(e, GrafanaClientError) and e.status_code == 404


def push(url: str, credential: str | tuple[str, str] | None, boards: list[dict[str, Any]], *,
         folder: str = "Herdsman", folder_uid: str = "herdsman", prometheus_url: str | None = None,
         timeout_s: float = 10.0) -> list[Pushed]:
    """Push dashboards into `folder` (created if absent); with `prometheus_url`, also create or repoint the
    datasource the dashboards query. Raises HerdsmanError with Grafana's own message on any refusal."""
    api = GrafanaApi.from_url(url, credential=credential, timeout=timeout_s)
    try:
        try:
            api.folder.get_folder(folder_uid)
        except GrafanaException as e:
            if not _missing(e):
                raise
            api.folder.create_folder(folder, uid=folder_uid)
        _datasource(api, prometheus_url)
        out = []
        for board in boards:
            body = {"dashboard": {**board, "id": None}, "folderUid": folder_uid, "overwrite": True,
                    "message": "herdsman dashboards push"}
            r = api.dashboard.update_dashboard(body)
            out.append(Pushed(r["uid"], board["title"], r.get("url", ""), int(r.get("version", 0))))
        return out
    except GrafanaException as e:
        raise HerdsmanError(f"Grafana at {url} refused: HTTP {e.status_code or 'error'}: {e.message}") from None
    except RequestException as e:  # connection refused, DNS, TLS: grafana-client lets these through
        raise HerdsmanError(f"cannot reach Grafana at {url}: {e}") from None


def _datasource(api: GrafanaApi, prometheus_url: str | None) -> None:
    try:
        existing = api.datasource.get_datasource_by_uid(DATASOURCE_UID)
    except GrafanaException as e:
        if not _missing(e):
            raise
        existing = None
    if prometheus_url is None:
        if existing is None:
            raise HerdsmanError(f"Grafana has no datasource with uid {DATASOURCE_UID!r}, which every dashboard "
                                "queries: pass --prometheus-url to create it")
        return
    spec = {"name": "Herdsman Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
            "url": prometheus_url}
    if existing is None:
        api.datasource.create_datasource(spec)
    elif existing.get("url") != prometheus_url or existing.get("type") != "prometheus":
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, {**existing, **spec})
