"""A stand-in for Grafana's HTTP API (the legacy /api endpoints grafana-client 5 calls), used because no Grafana
server can be installed on this machine (not in Debian's archive, not on PyPI, no container engine).

Status codes and bodies follow Grafana 11's documented responses (docs: http_api/dashboard, folder,
data_source): Bearer or basic auth or 401 {"message": "Unauthorized"}; 404 {"message": ..., "status":
"not-found"}; 409 for a duplicate folder uid; 412 "version-mismatch" when a dashboard uid exists and overwrite is
false; 400 when a dashboard has no title. Every request is recorded so tests can assert what was sent.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def grafana_standin(token: str = "glsa_test", basic: tuple[str, str] = ("admin", "admin")) -> FastAPI:
    app = FastAPI()
    app.state.requests = []
    app.state.folders, app.state.dashboards, app.state.datasources = {}, {}, {}
    ids = iter(range(1, 10_000))
    ok_basic = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()

    @app.middleware("http")
    async def auth_and_record(request: Request, call_next):
        body = await request.body()
        app.state.requests.append((request.method, request.url.path, body))
        if request.headers.get("authorization") not in (f"Bearer {token}", ok_basic):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        return await call_next(request)

    def not_found(what: str) -> JSONResponse:
        return JSONResponse({"message": f"{what} not found", "status": "not-found"}, status_code=404)

    @app.get("/api/folders/{uid}")
    def get_folder(uid: str):
        return app.state.folders.get(uid) or not_found("folder")

    @app.post("/api/folders")
    async def create_folder(request: Request):
        body = await request.json()
        uid = body.get("uid") or f"f{next(ids)}"
        if uid in app.state.folders:
            return JSONResponse({"message": "a folder with the same uid already exists"}, status_code=409)
        f = {"id": next(ids), "uid": uid, "title": body["title"], "url": f"/dashboards/f/{uid}/{_slug(body['title'])}",
             "hasAcl": False, "canSave": True, "canEdit": True, "canAdmin": True, "version": 1}
        app.state.folders[uid] = f
        return f

    @app.get("/api/datasources/uid/{uid}")
    def get_datasource(uid: str):
        return app.state.datasources.get(uid) or JSONResponse({"message": "Data source not found"}, status_code=404)

    @app.post("/api/datasources")
    async def create_datasource(request: Request):
        body = await request.json()
        ds = {"id": next(ids), "orgId": 1, "isDefault": False, "jsonData": {}, "readOnly": False, **body}
        app.state.datasources[ds["uid"]] = ds
        return {"datasource": ds, "id": ds["id"], "message": "Datasource added", "name": ds["name"]}

    @app.put("/api/datasources/uid/{uid}")
    async def update_datasource(uid: str, request: Request):
        if uid not in app.state.datasources:
            return JSONResponse({"message": "Data source not found"}, status_code=404)
        app.state.datasources[uid] = {**app.state.datasources[uid], **await request.json()}
        return {"datasource": app.state.datasources[uid], "id": app.state.datasources[uid]["id"],
                "message": "Datasource updated", "name": app.state.datasources[uid]["name"]}

    @app.post("/api/dashboards/db")
    async def save_dashboard(request: Request):
        body: dict[str, Any] = await request.json()
        d = body.get("dashboard") or {}
        if not d.get("title"):
            return JSONResponse({"message": "Dashboard title cannot be empty"}, status_code=400)
        folder = body.get("folderUid")
        if folder and folder not in app.state.folders:
            return JSONResponse({"message": "folder not found", "status": "not-found"}, status_code=400)
        uid = d.get("uid") or f"d{next(ids)}"
        old = app.state.dashboards.get(uid)
        if old and not body.get("overwrite"):
            return JSONResponse({"message": "The dashboard has been changed by someone else",
                                 "status": "version-mismatch"}, status_code=412)
        version = old["version"] + 1 if old else 1
        app.state.dashboards[uid] = {"dashboard": d, "folderUid": folder, "version": version}
        return {"id": next(ids), "uid": uid, "url": f"/d/{uid}/{_slug(d['title'])}", "status": "success",
                "version": version, "slug": _slug(d["title"])}

    return app
