"""Tests for the ``faults`` switch every emulator takes (tests/emulators/common.py, "Injected
faults"): one fault at one provider step, once, N times or every time, in each provider's shape.

Each emulator runs as a subprocess on a free port (through the harness, as the end-to-end tests
use it); requests go through http.client so cut bodies, hung and closed connections are visible.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import sqlite3
import time
from urllib.parse import urlsplit

import pytest

from harness import (AURA_ID, AURA_INSTANCE, AURA_SECRET, D1_TOKEN, DGRAPH_KEY, DXP_USER_TOKEN, NEO4J_PASSWORD,
                     AuraEmulator, D1Emulator, DgraphEmulator, DxpEmulator)

NODES_PAGE = ("MATCH (n) WHERE elementId(n) > $after RETURN elementId(n) AS id, labels(n) AS labels, "
              "properties(n) AS props ORDER BY id LIMIT $limit")


def raw(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    """(status, headers, body, complete); status None when the connection closed without an answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=headers or {})
        try:
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, {}, b"", False
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        try:
            return resp.status, hdrs, resp.read(), True
        except http.client.IncompleteRead as exc:
            return resp.status, hdrs, exc.partial, False
    finally:
        conn.close()


# ----- one flow per provider: every step as one call -----------------------------------------------
class D1Flow:
    steps = ("export", "poll", "download")

    def __init__(self, emu: D1Emulator):
        self.emu = emu
        self.url = f"{emu.api_base}/accounts/{emu.account}/d1/database/db-uuid/export"
        self.bookmark = self.signed = None

    def call(self, step: str):
        auth = {"Authorization": f"Bearer {D1_TOKEN}", "Content-Type": "application/json"}
        if step == "export":
            return raw(self.url, "POST", b'{"output_format":"polling"}', auth)
        if step == "poll":
            if self.bookmark is None:
                self.bookmark = json.loads(self.call("export")[2])["result"]["at_bookmark"]
            body = json.dumps({"output_format": "polling", "current_bookmark": self.bookmark}).encode()
            return raw(self.url, "POST", body, auth)
        if self.signed is None:
            for _ in range(5):
                answer = self.call("poll")
                result = json.loads(answer[2])["result"]
                if result.get("status") == "complete":
                    self.signed = result["result"]["signed_url"]
                    break
        return raw(self.signed)

    def expected(self, step):
        return self.emu.state()["tasks"][-1]["dump_size"] if step == "download" else None


class DgraphFlow:
    steps = ("export", "status", "download")
    EXPORT = b'{"query": "mutation { export(format: \\"json\\") { response { code message } exportId taskId } }"}'

    def __init__(self, emu: DgraphEmulator):
        self.emu = emu
        self.ids = self.urls = None

    def gql(self, body: bytes):
        return raw(f"{self.emu.url}/admin/slash", "POST", body,
                   {"X-Auth-Token": DGRAPH_KEY, "Content-Type": "application/json"})

    def status_body(self) -> bytes:
        export_id, task_id = self.ids
        query = ('query { exportStatus(exportId: "%s", taskId: "%s") { kind lastUpdated signedUrls status } }'
                 % (export_id, task_id))
        return json.dumps({"query": query}).encode()

    def call(self, step: str):
        if step == "export":
            return self.gql(self.EXPORT)
        if self.ids is None:
            data = json.loads(self.call("export")[2])["data"]["export"]
            self.ids = (data["exportId"], data["taskId"])
        if step == "status":
            return self.gql(self.status_body())
        if self.urls is None:
            for _ in range(5):
                status = json.loads(self.call("status")[2])["data"]["exportStatus"]
                if status["status"] == "Success":
                    self.urls = status["signedUrls"]
                    break
        return raw(self.urls[0])


class AuraFlow:
    steps = ("token", "snapshot", "snapshot_status", "query")

    def __init__(self, emu: AuraEmulator):
        self.emu = emu
        self.token = self.snapshot = None

    def call(self, step: str):
        base = self.emu.url
        if step == "token":
            basic = base64.b64encode(f"{AURA_ID}:{AURA_SECRET}".encode()).decode()
            return raw(f"{base}/oauth/token", "POST", b"grant_type=client_credentials",
                       {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
        if step == "query":
            basic = base64.b64encode(f"neo4j:{NEO4J_PASSWORD}".encode()).decode()
            body = json.dumps({"statement": NODES_PAGE, "parameters": {"after": "", "limit": 5}}).encode()
            return raw(f"{base}/db/neo4j/query/v2", "POST", body,
                       {"Authorization": f"Basic {basic}", "Content-Type": "application/json"})
        if self.token is None:
            self.token = json.loads(self.call("token")[2])["access_token"]
        bearer = {"Authorization": f"Bearer {self.token}"}
        snapshots = f"{base}/v1/instances/{AURA_INSTANCE}/snapshots"
        if step == "snapshot":
            return raw(snapshots, "POST", b"", bearer)
        if self.snapshot is None:
            self.snapshot = json.loads(self.call("snapshot")[2])["data"]["snapshot_id"]
        return raw(f"{snapshots}/{self.snapshot}", "GET", None, bearer)


class DxpFlow:
    steps = ("list", "download")

    def __init__(self, emu: DxpEmulator):
        self.emu = emu

    def call(self, step: str):
        auth = {"dxpcloud-authorization": f"Bearer {DXP_USER_TOKEN}"}
        if step == "list":
            return raw(f"{self.emu.url}/backup/list", "GET", None, auth)
        backup = self.emu.backup(-1)["backupId"]
        return raw(f"{self.emu.url}/backup/download/database/{backup}", "GET", None, auth)


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    db = work / "db.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
                       + "".join(f"INSERT INTO t (v) VALUES ('{'x' * 200}{i}');" for i in range(200)))
    conn.commit()
    conn.close()
    emus = {
        "d1": D1Emulator(work, {"db-uuid": db}, active_polls=1),
        "dgraph": DgraphEmulator(work),
        "aura": AuraEmulator(work, nodes=40, rels=60, snapshot_polls=1),
        "dxp": DxpEmulator(work, volume_mib=0.1, backups=2, database_kib=16),
    }
    yield emus
    for emu in emus.values():
        emu.stop()


FLOWS = {"d1": D1Flow, "dgraph": DgraphFlow, "aura": AuraFlow, "dxp": DxpFlow}
EVERY_STEP = [(p, s) for p, flow in FLOWS.items() for s in flow.steps]


@pytest.fixture
def flow(request, emulators):
    provider = request.param
    emu = emulators[provider]
    emu.reset()
    if provider == "dgraph":
        emu.control(status_sequence=["Running", "Success"])
    return FLOWS[provider](emu)


def inject(flow, **spec):
    flow.emu.control(faults=[spec])


def normal(flow, step):
    status, _, body, complete = flow.call(step)
    assert status in (200, 202) and complete, (step, status, body[:200])
    return body


@pytest.mark.parametrize("flow, step", EVERY_STEP, indirect=["flow"])
def test_a_5xx_is_answered_once_then_the_step_works(flow, step):
    normal(flow, step)  # prepares the step (tokens, export, URLs)
    inject(flow, step=step, fault="5xx", status=502, retry_after=3)
    status, headers, body, complete = flow.call(step)
    assert status == 502 and complete and headers.get("retry-after") == "3", (status, headers, body)
    normal(flow, step)
    state = flow.emu.state()
    assert [(f["step"], f["fault"]) for f in state["faults_injected"]] == [(step, "5xx")]
    assert state["switches"]["faults"][0]["times"] == 0
    assert any(r.get("step") == step for r in state["requests"]), "the request log names the step"


@pytest.mark.parametrize("flow, step", EVERY_STEP, indirect=["flow"])
def test_a_429_carries_retry_after_and_times_counts_down(flow, step):
    normal(flow, step)
    inject(flow, step=step, fault="429", times=2)
    for _ in range(2):
        status, headers, _, _ = flow.call(step)
        assert status == 429 and headers.get("retry-after") == "1", (status, headers)
    normal(flow, step)


@pytest.mark.parametrize("flow, step", EVERY_STEP, indirect=["flow"])
def test_truncate_cuts_the_body_with_content_length_and_with_chunks(flow, step):
    whole = normal(flow, step)
    for fault in ("truncate", "truncate_chunked"):
        inject(flow, step=step, fault=fault)
        status, headers, body, complete = flow.call(step)
        assert status in (200, 202) and not complete, (fault, status, complete)
        if fault == "truncate":
            assert int(headers["content-length"]) > len(body) and "transfer-encoding" not in headers
        else:
            assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
        if step in ("download", "list"):  # the same bytes every time: the cut is a prefix
            assert 0 < len(body) < len(whole) and whole.startswith(body), (fault, len(body), len(whole))
            if fault == "truncate":
                assert int(headers["content-length"]) == len(whole)
    normal(flow, step)


@pytest.mark.parametrize("flow, step", EVERY_STEP, indirect=["flow"])
def test_hang_never_answers_and_delay_answers_late(flow, step):
    normal(flow, step)
    inject(flow, step=step, fault="hang", hang_s=0.5)
    started = time.monotonic()
    status, _, _, _ = flow.call(step)
    assert status is None and time.monotonic() - started >= 0.45
    inject(flow, step=step, fault="delay", delay_s=0.5)
    started = time.monotonic()
    normal(flow, step)
    assert time.monotonic() - started >= 0.45


@pytest.mark.parametrize("flow, step", EVERY_STEP, indirect=["flow"])
def test_redirect_html_sends_the_client_to_a_login_page_on_another_origin(flow, step):
    normal(flow, step)
    inject(flow, step=step, fault="redirect_html")
    status, headers, _, _ = flow.call(step)
    assert status == 302, status
    location = headers["location"]
    assert urlsplit(location).port != urlsplit(flow.emu.url).port
    status, headers, page, complete = raw(location, headers={"Authorization": "Bearer leaked"})
    assert status == 200 and complete and headers["content-type"].startswith("text/html")
    assert page.startswith(b"<!DOCTYPE html>")
    seen = flow.emu.state()["login_requests"]
    assert seen and "authorization" in seen[-1]["headers"], "the login origin records header names"
    normal(flow, step)


@pytest.mark.parametrize("flow, step", [("d1", "download"), ("dgraph", "download")], indirect=["flow"])
def test_expire_refuses_a_signed_url_as_s3_does(flow, step):
    normal(flow, step)
    inject(flow, step=step, fault="expire")
    status, headers, body, _ = flow.call(step)
    assert status == 403 and headers["content-type"] == "application/xml"
    assert b"<Code>AccessDenied</Code>" in body and b"Request has expired" in body
    normal(flow, step)


@pytest.mark.parametrize("flow, step", [("d1", "download"), ("dgraph", "download"), ("dxp", "download")],
                         indirect=["flow"])
def test_content_encoding_gzip_serves_the_file_gzip_encoded_once_more(flow, step):
    whole = normal(flow, step)
    inject(flow, step=step, fault="content_encoding_gzip")
    status, headers, body, complete = flow.call(step)
    assert status == 200 and complete and headers.get("content-encoding") == "gzip"
    assert int(headers["content-length"]) == len(body) and gzip.decompress(body) == whole


@pytest.mark.parametrize("flow, step, check", [
    ("d1", "export", lambda s, b: s == 400 and b["success"] is False and "being imported" in b["errors"][0]["message"]),
    ("d1", "poll", lambda s, b: s == 200 and b["result"]["status"] == "error" and "Virtual Tables" in b["result"]["error"]),
    ("dgraph", "export", lambda s, b: s == 200 and b["data"]["export"] is None and "already running" in b["errors"][0]["message"]),
    ("dgraph", "status", lambda s, b: s == 200 and b["data"]["exportStatus"]["status"] == "Failed"),
    ("aura", "token", lambda s, b: s == 401 and b["errors"][0]["message"] == "Invalid credentials"),
    ("aura", "snapshot", lambda s, b: s == 409 and b["errors"][0]["reason"] == "ongoing-database-operation"),
    ("aura", "snapshot_status", lambda s, b: s == 200 and b["data"]["status"] == "Failed"),
    ("aura", "query", lambda s, b: s == 202 and b["errors"][0]["code"] == "Neo.ClientError.Security.Forbidden"),
    ("dxp", "list", lambda s, b: s == 200 and {x["status"] for x in b["backups"]} == {"failed"}),
    ("dxp", "download", lambda s, b: s == 401 and b["message"] == "Token expired"),
], indirect=["flow"])
def test_provider_error_answers_the_providers_documented_failure(flow, step, check):
    inject(flow, step=step, fault="provider_error")
    status, _, body, _ = flow.call(step)  # earlier steps it needs run first, unfaulted
    assert check(status, json.loads(body)), (status, body[:300])
    assert flow.emu.state()["switches"]["faults"][0]["message"], "the completed spec shows the message"


@pytest.mark.parametrize("flow, step", [("d1", "poll"), ("dgraph", "status"), ("aura", "snapshot_status")],
                         indirect=["flow"])
def test_stuck_keeps_the_export_running_until_the_fault_is_removed(flow, step):
    def status_of(body: dict) -> str:
        return {"poll": lambda: body["result"]["status"], "status": lambda: body["data"]["exportStatus"]["status"],
                "snapshot_status": lambda: body["data"]["status"]}[step]()

    inject(flow, step=step, fault="stuck")
    for _ in range(4):
        body = json.loads(flow.call(step)[2])
        assert status_of(body) in ("active", "Running", "InProgress"), body
    flow.emu.control(faults=[])
    for _ in range(3):
        body = json.loads(flow.call(step)[2])
    assert status_of(body) in ("complete", "Success", "Completed"), body


@pytest.mark.parametrize("flow", list(FLOWS), indirect=True)
def test_faults_are_validated_every_time_is_null_and_reset_clears_them(flow):
    emu = flow.emu
    bad = [
        {"step": "nope", "fault": "5xx"},
        {"step": flow.steps[0], "fault": "nope"},
        {"step": flow.steps[0], "fault": "5xx", "times": 0},
        {"step": flow.steps[0], "fault": "5xx", "status": 404},
        {"step": flow.steps[0], "fault": "5xx", "extra": 1},
        {"step": flow.steps[0], "fault": "expire"},  # never the first step
    ]
    for spec in bad:
        status, _, body = emu.http.request("POST", "/__control", json.dumps({"faults": [spec]}).encode(),
                                           {"content-type": "application/json"})
        assert status == 400, (spec, body)
    if emu.script == "dxp.py":
        status, _, body = emu.http.request("POST", "/__control", b'{"faults":[{"step":"list","fault":"stuck"}]}')
        assert status == 400 and b"does not take stuck" in body, body
    step = flow.steps[0]
    normal(flow, step)
    inject(flow, step=step, fault="5xx", times=None)
    for _ in range(3):
        assert flow.call(step)[0] == 503
    assert emu.state()["switches"]["faults"][0]["times"] is None
    emu.reset()
    assert emu.state()["switches"]["faults"] == [] and emu.state()["faults_injected"] == []
    normal(flow, step)
