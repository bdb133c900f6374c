"""Tests for the Neo4j Aura management API + Query API emulator (tests/emulators/aura.py).

The emulator runs as a subprocess on a free port, exactly as the end-to-end tests use it;
every request goes through urllib to 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import re
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

import pytest

from emulators.common import start_emulator, stop_emulator

CLIENT_ID, CLIENT_SECRET = "test-client-id", "test-client-secret"
INSTANCE = "2f49c2b3"
DB_USER, DB_PASSWORD = "neo4j", "db-password-ü"
NODES, RELS = 300, 600

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never use a proxy

NODES_PAGE = ("MATCH (n) WHERE elementId(n) > $after RETURN elementId(n) AS id, labels(n) AS labels, "
              "properties(n) AS props ORDER BY id LIMIT $limit")
RELS_PAGE = ("MATCH ()-[r]->() WHERE elementId(r) > $after RETURN elementId(r) AS id, type(r) AS type, "
             "elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props "
             "ORDER BY id LIMIT $limit")
COUNT_NODES = "MATCH (n) RETURN count(n) AS nodes"
COUNT_RELS = "MATCH ()-[r]->() RETURN count(r) AS relationships"
CLEANUP = "MATCH (n) WHERE n.`_ferry_id` IS NOT NULL REMOVE n.`_ferry_id`"


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def create_nodes_stmt(labels) -> str:
    target = "n" + "".join(":" + quote(label) for label in labels)
    return f"UNWIND $rows AS row CREATE ({target}) SET n = row.props, n.`_ferry_id` = row.id"


def create_rels_stmt(type_: str) -> str:
    return ("UNWIND $rows AS row MATCH (a {`_ferry_id`: row.start}), (b {`_ferry_id`: row.end}) "
            f"CREATE (a)-[r:{quote(type_)}]->(b) SET r = row.props")


# ----- process and HTTP helpers -----------------------------------------------------------------
def start(*extra):
    proc, port, line = start_emulator("aura.py", [
        "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET, "--instance", INSTANCE,
        "--db-user", DB_USER, "--db-password", DB_PASSWORD, *extra])
    if port is None:
        proc.kill()
        raise AssertionError(f"unexpected first line {line!r}")
    return proc, f"http://127.0.0.1:{port}"


def stop(proc):
    stop_emulator(proc, wait_after_kill=False)


@pytest.fixture(scope="module")
def base():
    proc, url = start("--nodes", str(NODES), "--rels", str(RELS), "--seed", "7", "--snapshot-polls", "2")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(autouse=True)
def fresh(request):
    if "base" in request.fixturenames:
        status, _, _ = call(request.getfixturevalue("base"), "POST", "/__control/reset", b"{}")
        assert status == 200


class Resp:
    def __init__(self, status, headers, body: bytes):
        self.status, self.headers, self.raw = status, headers, body

    def json(self):
        return json.loads(self.raw)


def call(base_url, method, path, body=None, headers=None, timeout=30):
    req = urllib.request.Request(base_url + path, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def http(base_url, method, path, body=None, headers=None) -> Resp:
    return Resp(*call(base_url, method, path, body, headers))


def control(base_url, **switches):
    r = http(base_url, "POST", "/__control", json.dumps(switches).encode(), {"Content-Type": "application/json"})
    assert r.status == 200, r.raw
    return r.json()


def state(base_url) -> dict:
    return http(base_url, "GET", "/__control/state").json()


def graph(base_url, db="neo4j") -> dict:
    r = http(base_url, "GET", f"/__control/graph?db={db}")
    assert r.status == 200, r.raw
    return r.json()


def basic(user, password) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def token_request(base_url, body=b"grant_type=client_credentials", auth=None, content_type=None) -> Resp:
    headers = {"Authorization": auth or basic(CLIENT_ID, CLIENT_SECRET)}
    if content_type is not False:
        headers["Content-Type"] = content_type or "application/x-www-form-urlencoded"
    return http(base_url, "POST", "/oauth/token", body, headers)


def get_token(base_url) -> str:
    r = token_request(base_url)
    assert r.status == 200, r.raw
    return r.json()["access_token"]


def api(base_url, method, path, token, body=None) -> Resp:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return http(base_url, method, path, body, headers)


def cypher(base_url, statement, parameters=None, db="neo4j", auth=None, **extra) -> Resp:
    payload = {"statement": statement}
    if parameters is not None:
        payload["parameters"] = parameters
    payload.update(extra)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if auth is not False:  # None: the database user; False: no Authorization header at all
        headers["Authorization"] = basic(DB_USER, DB_PASSWORD) if auth is None else auth
    return http(base_url, "POST", f"/db/{db}/query/v2", json.dumps(payload).encode(), headers)


def ok(resp: Resp) -> dict:
    assert resp.status == 202, (resp.status, resp.raw[:500])
    body = resp.json()
    assert "errors" not in body or not body["errors"], body
    assert isinstance(body["bookmarks"], list) and body["bookmarks"][0].startswith("FB:")
    return body["data"]


def page_all(base_url, statement, db="neo4j", batch=1000, timings=None) -> list:
    rows, after = [], ""
    while True:
        t0 = time.perf_counter()
        data = ok(cypher(base_url, statement, {"after": after, "limit": batch}, db=db))
        if timings is not None:
            timings.append(time.perf_counter() - t0)
        rows += data["values"]
        if len(data["values"]) < batch:
            return rows
        after = data["values"][-1][0]


# ----- management API: OAuth, tokens, envelope ---------------------------------------------------------
def test_token_flow_and_errors(base):
    r = token_request(base)
    assert r.status == 200
    body = r.json()
    assert set(body) == {"access_token", "expires_in", "token_type"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert body["access_token"].count(".") == 2  # JWT-shaped, opaque to clients
    assert r.headers["X-Request-Id"]

    assert token_request(base, auth=basic(CLIENT_ID, "wrong")).status == 401
    assert token_request(base, auth="Basic !!!not-base64").status == 401
    assert http(base, "POST", "/oauth/token", b"grant_type=client_credentials",
                {"Content-Type": "application/x-www-form-urlencoded"}).status == 401  # no credentials
    assert token_request(base, body=None).status == 404  # missing body
    assert token_request(base, body=b"grant_type=password").status == 403  # invalid body
    assert token_request(base, body=b"grant_type=client_credentials", content_type="application/json").status == 400
    assert http(base, "GET", "/oauth/token").status == 405
    assert state(base)["token_requests"] == 7  # the GET was not a token request
    control(base, fail_next=[{"status": 503}])
    assert token_request(base).status == 503
    assert state(base)["token_requests"] == 8  # every POST /oauth/token counts, even a failed one


def test_unknown_and_expired_tokens(base):
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", "not-a-token")
    assert r.status == 401
    assert r.json() == {"errors": [{"message": "Unauthorized", "reason": "unauthorized"}]}
    assert http(base, "GET", f"/v1/instances/{INSTANCE}").status == 401  # no Authorization at all

    token = get_token(base)
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).status == 200
    control(base, expire_tokens_now=True)
    assert state(base)["switches"]["expire_tokens_now"] is False  # one-shot
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", token)
    assert r.status == 403  # expired → 403, not 401
    assert r.json() == {"errors": [{"message": "Forbidden: token expired", "reason": "forbidden"}]}
    control(base, error_variant=True)
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", token)
    assert r.status == 403 and r.json() == {"error": "Forbidden"}

    fresh_token = get_token(base)  # tokens issued after the one-shot are valid
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", fresh_token).status == 200


def test_token_ttl_expiry(base):
    control(base, token_ttl=0.4)
    r = token_request(base)
    token = r.json()["access_token"]
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).status == 200
    time.sleep(0.5)
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).status == 403


def test_rate_limit(base):
    token = get_token(base)
    control(base, rate_limit=5)  # the token request above counted too
    statuses = [api(base, "GET", f"/v1/instances/{INSTANCE}", token).status for _ in range(4)]
    assert statuses == [200] * 4
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", token)
    assert r.status == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["X-Request-Id"]
    assert token_request(base).status == 429  # the limit is global over /oauth and /v1
    assert cypher(base, COUNT_NODES).status == 202  # the Query API host is not limited
    control(base, rate_limit=None)
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).status == 200


def test_request_id_everywhere(base):
    token = get_token(base)
    responses = [api(base, "GET", f"/v1/instances/{INSTANCE}", token), api(base, "GET", "/v1/nope", token),
                 http(base, "GET", "/nope"), cypher(base, COUNT_NODES), cypher(base, COUNT_NODES, auth="x"),
                 http(base, "GET", "/__control/state")]
    ids = [r.headers["X-Request-Id"] for r in responses]
    assert all(ids) and len(set(ids)) == len(ids)


# ----- management API: instances and snapshots ----------------------------------------------------------
def test_instances(base):
    token = get_token(base)
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", token)
    assert r.status == 200
    data = r.json()["data"]
    assert data["id"] == INSTANCE and data["status"] == "running"
    assert data["connection_url"] == f"neo4j+s://{INSTANCE}.databases.neo4j.io"
    assert {"name", "tenant_id", "cloud_provider", "region", "type", "memory", "storage"} <= set(data)
    assert re.fullmatch(r"[0-9a-f-]{36}", data["tenant_id"])

    r = api(base, "GET", "/v1/instances/deadbeef", token)
    assert r.status == 404
    assert r.json() == {"errors": [{"message": "DB not found: deadbeef", "reason": "db-not-found"}]}

    listed = api(base, "GET", "/v1/instances", token).json()["data"]
    assert [i["id"] for i in listed] == [INSTANCE]
    assert api(base, "GET", f"/v1/instances?tenantId={data['tenant_id']}", token).json()["data"] == listed
    assert api(base, "GET", "/v1/instances?tenantId=other", token).json()["data"] == []
    assert api(base, "GET", "/v1/tenants", token).json()["data"][0]["id"] == data["tenant_id"]
    assert api(base, "PUT", f"/v1/instances/{INSTANCE}", token).status == 405

    control(base, instance_status="loading failed")
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).json()["data"]["status"] == "loading failed"
    r = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token)
    assert r.status == 409 and r.json()["errors"][0]["reason"] == "ongoing-database-operation"


def test_snapshot_lifecycle(base):
    token = get_token(base)
    r = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token)
    assert r.status == 202
    sid = r.json()["data"]["snapshot_id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sid)
    seen = []
    for _ in range(4):
        r = api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token)
        assert r.status == 200
        data = r.json()["data"]
        seen.append(data["status"])
    assert seen == ["Pending", "InProgress", "Completed", "Completed"]
    assert set(data) == {"snapshot_id", "instance_id", "profile", "status", "timestamp", "exportable"}
    assert data["instance_id"] == INSTANCE and data["profile"] == "AdHoc" and data["exportable"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["timestamp"])
    assert state(base)["snapshots"] == [{"snapshot_id": sid, "instance_id": INSTANCE,
                                         "status": "Completed", "polls": 4}]

    today = data["timestamp"][:10]
    listed = api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]
    assert [s["snapshot_id"] for s in listed] == [sid]
    assert api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots?date={today}", token).json()["data"] == listed
    assert api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots?date=2001-01-01", token).json()["data"] == []
    assert api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots?date=yesterday", token).status == 400
    # "today" moves on: the default list of the next day misses the snapshot
    control(base, clock_offset=86400)
    assert api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"] == []
    assert len(api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots?date={today}", token).json()["data"]) == 1

    r = api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/00000000-0000-4000-8000-000000000000", token)
    assert r.status == 404
    assert r.json() == {"errors": [{"message": "Snapshot not found", "reason": "snapshot-not-found"}]}
    assert api(base, "POST", "/v1/instances/deadbeef/snapshots", token).status == 404


def test_snapshot_failed_and_polls_switches(base):
    token = get_token(base)
    control(base, snapshot_fail=True, snapshot_polls=1)
    sid = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]["snapshot_id"]
    seen = [api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token).json()["data"]["status"]
            for _ in range(3)]
    assert seen == ["Pending", "Failed", "Failed"]
    control(base, snapshot_fail=False, snapshot_polls=0)
    sid = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]["snapshot_id"]
    assert api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token).json()["data"]["status"] == "Completed"
    control(base, snapshot_polls=4)
    sid = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]["snapshot_id"]
    seen = [api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token).json()["data"]["status"]
            for _ in range(5)]
    assert seen == ["Pending", "InProgress", "InProgress", "InProgress", "Completed"]


def test_no_export_endpoint(base):
    token = get_token(base)
    sid = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]["snapshot_id"]
    for _ in range(3):
        api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token)
    for suffix in ("export", "download", "export/download", "file", "backup"):
        for method in ("GET", "POST"):
            r = api(base, method, f"/v1/instances/{INSTANCE}/snapshots/{sid}/{suffix}", token)
            assert r.status == 404, (method, suffix, r.status)
    for path in (f"/v1/snapshots/{sid}/export", f"/v1/instances/{INSTANCE}/export", "/v2/instances",
                 f"/v1beta5/instances/{INSTANCE}/snapshots/{sid}/export"):
        assert api(base, "GET", path, token).status == 404


def test_snapshot_restore(base):
    token = get_token(base)
    control(base, snapshot_polls=0)
    sid = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]["snapshot_id"]
    assert api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token).json()["data"]["status"] == "Completed"
    before = graph(base)
    ok(cypher(base, create_nodes_stmt(["Extra"]), {"rows": [{"id": "x", "props": {"a": 1}}]}))
    assert len(graph(base)["nodes"]) == NODES + 1
    r = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots/{sid}/restore", token)
    assert r.status == 202 and r.json()["data"]["status"] == "restoring"
    r = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token)
    assert r.status == 409
    assert r.json()["errors"][0] == {"message": "The database is current undergoing an operation: restoring",
                                     "reason": "ongoing-database-operation"}
    statuses = [api(base, "GET", f"/v1/instances/{INSTANCE}", token).json()["data"]["status"] for _ in range(3)]
    assert statuses == ["restoring", "restoring", "running"]
    assert graph(base) == before


def test_a_restore_status_that_lags_the_post_reports_running_before_restoring(base):
    """Aura's instance status may lag the restore POST: the restore has not begun while it still
    says ``running`` (statuses: aura-cli response.go)."""
    token = get_token(base)
    control(base, snapshot_polls=0, restore_lag_polls=2, restore_polls=1)
    sid = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots", token).json()["data"]["snapshot_id"]
    api(base, "GET", f"/v1/instances/{INSTANCE}/snapshots/{sid}", token)
    before = graph(base)
    ok(cypher(base, create_nodes_stmt(["Extra"]), {"rows": [{"id": "x", "props": {}}]}))
    r = api(base, "POST", f"/v1/instances/{INSTANCE}/snapshots/{sid}/restore", token)
    assert r.status == 202 and r.json()["data"]["status"] == "running"
    done = lambda: [i for i in state(base)["instances"] if i["id"] == INSTANCE][0]  # noqa: E731
    assert done()["restore_pending"] and done()["restores_done"] == 0
    statuses = [api(base, "GET", f"/v1/instances/{INSTANCE}", token).json()["data"]["status"] for _ in range(4)]
    assert statuses == ["running", "running", "restoring", "running"]
    assert done()["restores_done"] == 1 and not done()["restore_pending"]
    assert graph(base) == before


def create_body(**over) -> bytes:
    tenant = over.pop("tenant_id")
    body = {"version": "5", "region": "europe-west1", "memory": "1GB", "name": "ferry-drill-x",
            "type": "professional-db", "tenant_id": tenant, "cloud_provider": "gcp", **over}
    return json.dumps(body).encode()


def test_instances_are_created_with_their_own_query_api_listed_and_deleted(base):
    token = get_token(base)
    tenant = api(base, "GET", "/v1/tenants", token).json()["data"][0]["id"]
    control(base, create_seconds=0.4, destroy_seconds=0.3, instance_quota=2)
    for field, value in (("memory", "3GB"), ("type", "invalid-db"), ("cloud_provider", "ibm"), ("version", "6")):
        r = api(base, "POST", "/v1/instances", token, create_body(tenant_id=tenant, **{field: value}))
        assert r.status == 400 and r.json()["errors"][0]["field"] == field, r.raw
    r = api(base, "POST", "/v1/instances", token, create_body(tenant_id=tenant))
    assert r.status == 202, r.raw
    data = r.json()["data"]
    assert set(data) == {"id", "connection_url", "username", "password", "tenant_id", "cloud_provider", "region",
                         "type", "name"}
    new, password = data["id"], data["password"]
    assert re.fullmatch(r"[0-9a-f]{8}", new) and data["username"] == "neo4j" and data["name"] == "ferry-drill-x"
    assert "password" not in api(base, "GET", f"/v1/instances/{new}", token).json()["data"], "shown only once"
    host = "http://" + data["connection_url"].split("://", 1)[1]
    assert api(base, "GET", f"/v1/instances/{new}", token).json()["data"]["status"] == "creating"
    assert cypher(host, COUNT_NODES, auth=basic("neo4j", password)).status == 503, "not serving while creating"
    r = api(base, "DELETE", f"/v1/instances/{new}", token)
    assert r.status == 409 and r.json()["errors"][0]["reason"] == "ongoing-database-operation"
    r = api(base, "POST", "/v1/instances", token, create_body(tenant_id=tenant))
    assert r.status == 400 and r.json()["errors"][0]["reason"] == "instance-quota-reached", "two of two"
    time.sleep(0.5)
    assert api(base, "GET", f"/v1/instances/{new}", token).json()["data"]["status"] == "running"
    assert ok(cypher(host, COUNT_NODES, auth=basic("neo4j", password)))["values"] == [[0]], "its own, empty"
    assert cypher(host, COUNT_NODES, auth=basic(DB_USER, DB_PASSWORD)).status == 401, "its own user"
    ok(cypher(host, create_nodes_stmt(["Own"]), {"rows": [{"id": "o", "props": {}}]}, auth=basic("neo4j", password)))
    assert len(http(base, "GET", f"/__control/graph?db=neo4j&instance={new}").json()["nodes"]) == 1
    assert len(graph(base)["nodes"]) == NODES, "the source instance's database is another"
    assert http(host, "GET", "/v1/instances").status == 404, "an instance host serves no management API"
    listed = api(base, "GET", "/v1/instances", token).json()["data"]
    assert {"id": new, "name": "ferry-drill-x", "tenant_id": tenant, "cloud_provider": "gcp"} in listed
    r = api(base, "DELETE", f"/v1/instances/{new}", token)
    assert r.status == 202 and r.json()["data"]["status"] == "destroying"
    assert api(base, "DELETE", f"/v1/instances/{new}", token).status == 409
    time.sleep(0.4)
    r = api(base, "GET", f"/v1/instances/{new}", token)
    assert r.status == 404 and r.json()["errors"][0]["reason"] == "db-not-found"
    assert new not in [i["id"] for i in api(base, "GET", "/v1/instances", token).json()["data"]]
    assert state(base)["instances_gone"] == [new]


# ----- Query API ---------------------------------------------------------------------------------------
def test_query_api_auth(base):
    r = cypher(base, COUNT_NODES, auth=False)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="Neo4j"'
    assert r.json() == {"errors": [{"code": "Neo.ClientError.Security.Unauthorized",
                                    "message": "The client is unauthorized due to authentication failure."}]}
    assert cypher(base, COUNT_NODES, auth=basic(DB_USER, "wrong")).status == 401
    assert cypher(base, COUNT_NODES, auth=basic(CLIENT_ID, CLIENT_SECRET)).json()["errors"][0]["code"] == \
        "Neo.ClientError.Security.Unauthorized"  # API credentials are not database credentials
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Basic", "Token abc"):
        r = cypher(base, COUNT_NODES, auth=bad)
        assert r.status == 401, bad
        assert r.json()["errors"][0]["code"] == "Neo.ClientError.Request.InvalidFormat", bad
    r = cypher(base, COUNT_NODES, auth="")
    assert r.status == 401 and r.json()["errors"][0]["code"] == "Neo.ClientError.Security.Unauthorized"
    assert state(base)["query_count"] == 0  # unauthenticated requests never reach the database


def test_query_api_request_errors(base):
    auth = {"Authorization": basic(DB_USER, DB_PASSWORD)}
    r = http(base, "POST", "/db/neo4j/query/v2", b"{not json", {**auth, "Content-Type": "application/json"})
    assert r.status == 400 and r.json()["errors"][0]["code"] == "Neo.ClientError.Request.Invalid"
    r = http(base, "POST", "/db/neo4j/query/v2", b'{"statement":"a\nb"}', {**auth, "Content-Type": "application/json"})
    assert r.status == 400  # a literal line break inside a JSON string is invalid
    r = http(base, "POST", "/db/neo4j/query/v2", json.dumps({"statement": COUNT_NODES}).encode(),
             {**auth, "Content-Type": "text/plain"})
    assert r.status == 415
    assert http(base, "GET", "/db/neo4j/query/v2", None, auth).status == 405
    assert http(base, "POST", "/db/neo4j/query/v2/tx", b"{}", {**auth, "Content-Type": "application/json"}).status == 404


def test_counts_and_paging_cover_graph(base):
    assert ok(cypher(base, COUNT_NODES)) == {"fields": ["nodes"], "values": [[NODES]]}
    assert ok(cypher(base, COUNT_RELS)) == {"fields": ["relationships"], "values": [[RELS]]}

    data = ok(cypher(base, NODES_PAGE, {"after": "", "limit": 7}))
    assert data["fields"] == ["id", "labels", "props"] and len(data["values"]) == 7
    nodes = page_all(base, NODES_PAGE, batch=64)
    ids = [row[0] for row in nodes]
    assert len(ids) == NODES and len(set(ids)) == NODES
    assert ids == sorted(ids)  # string order, as ORDER BY id does
    assert all(re.fullmatch(r"4:[0-9a-f-]{36}:\d+", i) for i in ids)
    assert ids != sorted(ids, key=lambda x: int(x.rsplit(":", 1)[1]))  # "...:10" < "...:9"

    data = ok(cypher(base, RELS_PAGE, {"after": "", "limit": 5}))
    assert data["fields"] == ["id", "type", "start", "end", "props"]
    rels = page_all(base, RELS_PAGE, batch=100)
    rel_ids = [row[0] for row in rels]
    assert len(rel_ids) == RELS and len(set(rel_ids)) == RELS and rel_ids == sorted(rel_ids)
    node_set = set(ids)
    assert all(row[2] in node_set and row[3] in node_set for row in rels)

    # the pages equal the control dump
    dump = graph(base)
    assert [[n["id"], n["labels"], n["props"]] for n in dump["nodes"]] == nodes
    assert [[r["id"], r["type"], r["start"], r["end"], r["props"]] for r in dump["relationships"]] == rels

    # the seeded graph has the promised variety
    label_sets = Counter(tuple(row[1]) for row in nodes)
    assert label_sets[()] >= 1
    assert any(len(k) == 2 for k in label_sets)
    assert {lbl for k in label_sets for lbl in k} == {"Person", "Company", "City", "Product"}
    assert {row[1] for row in rels} == {"KNOWS", "WORKS_AT", "LIVES_IN", "BOUGHT"}
    values = [v for row in nodes for v in row[2].values()] + [v for row in rels for v in row[4].values()]
    kinds = {type(v).__name__ for v in values}
    assert kinds == {"str", "int", "float", "bool", "list"}
    assert any(isinstance(v, str) and any(ord(c) > 0xFFFF for c in v) for v in values)  # astral unicode
    assert any(isinstance(v, int) and not isinstance(v, bool) and v > 2 ** 53 for v in values)
    assert any(row[2] == row[3] for row in rels)  # a self loop

    # $after past the end, null and missing
    assert ok(cypher(base, NODES_PAGE, {"after": ids[-1], "limit": 10}))["values"] == []
    assert ok(cypher(base, NODES_PAGE, {"after": None, "limit": 10}))["values"] == []
    r = cypher(base, NODES_PAGE, {"limit": 10})
    assert r.status == 202 and r.json()["errors"][0]["code"] == "Neo.ClientError.Statement.ParameterMissing"
    r = cypher(base, NODES_PAGE, {"after": "", "limit": -1})
    assert r.json()["errors"][0]["code"] == "Neo.ClientError.Statement.ArgumentError"


def test_statement_whitespace_and_case_normalisation(base):
    messy = ("match  (n)\n WHERE elementId( n ) >$after\tRETURN elementId(n) AS id,labels(n) AS labels ,"
             " properties(n)  AS props\nORDER  BY id LIMIT $limit ;")
    data = ok(cypher(base, messy, {"after": "", "limit": 3}))
    assert data["fields"] == ["id", "labels", "props"] and len(data["values"]) == 3
    assert ok(cypher(base, "  MATCH ( n )  RETURN  count( n )  AS  nodes "))["values"] == [[NODES]]


def test_unknown_statement_errors(base):
    for statement in ("MATCH (n) RETURN n", "MATCH (n) DETACH DELETE n", "RETURN 1", "",
                      COUNT_NODES.replace("nodes", "total"), NODES_PAGE.replace("LIMIT $limit", "")):
        r = cypher(base, statement, {"after": "", "limit": 1})
        assert r.status == 202, statement
        body = r.json()
        assert body["errors"][0]["code"] == "Neo.ClientError.Statement.SyntaxError", statement
        assert body["errors"][0]["message"].startswith("Invalid input"), statement
        assert "data" not in body
    control(base, query_error_status=400)
    r = cypher(base, "MATCH (n) RETURN n")
    assert r.status == 400 and r.json()["errors"][0]["code"] == "Neo.ClientError.Statement.SyntaxError"
    assert graph(base)["nodes"].__len__() == NODES  # nothing was written


def restore_into(base_url, source: dict, db: str, batch: int = 50):
    by_labels = defaultdict(list)
    for node in source["nodes"]:
        by_labels[tuple(node["labels"])].append({"id": node["id"], "props": node["props"]})
    for labels, rows in by_labels.items():
        for i in range(0, len(rows), batch):
            ok(cypher(base_url, create_nodes_stmt(labels), {"rows": rows[i:i + batch]}, db=db))
    by_type = defaultdict(list)
    for rel in source["relationships"]:
        by_type[rel["type"]].append({"start": rel["start"], "end": rel["end"], "props": rel["props"]})
    for type_, rows in by_type.items():
        for i in range(0, len(rows), batch):
            ok(cypher(base_url, create_rels_stmt(type_), {"rows": rows[i:i + batch]}, db=db))


def assert_same_graph(source: dict, restored: dict, mapping: dict):
    """mapping: restored node id → source node id."""
    src_nodes = {n["id"]: n for n in source["nodes"]}
    assert len(restored["nodes"]) == len(source["nodes"])
    assert sorted(mapping.values()) == sorted(src_nodes)
    for node in restored["nodes"]:
        original = src_nodes[mapping[node["id"]]]
        assert sorted(node["labels"]) == sorted(original["labels"])
        assert node["props"] == original["props"]
    src_rels = Counter((r["type"], r["start"], r["end"], json.dumps(r["props"], sort_keys=True))
                       for r in source["relationships"])
    got_rels = Counter((r["type"], mapping[r["start"]], mapping[r["end"]], json.dumps(r["props"], sort_keys=True))
                       for r in restored["relationships"])
    assert got_rels == src_rels


def test_restore_round_trip(base):
    source = {"nodes": [{"id": r[0], "labels": r[1], "props": r[2]} for r in page_all(base, NODES_PAGE, batch=100)],
              "relationships": [{"id": r[0], "type": r[1], "start": r[2], "end": r[3], "props": r[4]}
                                for r in page_all(base, RELS_PAGE, batch=100)]}
    assert ok(cypher(base, COUNT_NODES, db="restored"))["values"] == [[0]]  # created empty on first use
    restore_into(base, source, "restored")
    with_ids = graph(base, "restored")
    mapping = {n["id"]: n["props"]["_ferry_id"] for n in with_ids["nodes"]}
    for node in with_ids["nodes"]:
        del node["props"]["_ferry_id"]
    assert_same_graph(source, with_ids, mapping)

    assert ok(cypher(base, CLEANUP, db="restored")) == {"fields": [], "values": []}
    restored = graph(base, "restored")
    assert not any("_ferry_id" in n["props"] for n in restored["nodes"])
    assert restored == with_ids  # cleanup touched nothing else
    assert ok(cypher(base, COUNT_RELS, db="restored"))["values"] == [[RELS]]
    assert graph(base) == source and len(source["nodes"]) == NODES  # the source is untouched
    assert "restored" in state(base)["databases"]

    control(base)
    http(base, "POST", "/__control/reset", b"{}")
    assert http(base, "GET", "/__control/graph?db=restored").status == 404  # reset drops it


def test_restore_edge_cases(base):
    db = "edge-cases"
    rows = [{"id": "a", "props": {"s": "é🚀\n\"q\"", "i": -(2 ** 63), "f": 1.5, "b": False, "l": [1, 2],
                                  "ls": [], "skip": None}},
            {"id": "b", "props": {}},
            {"id": "c"}]
    ok(cypher(base, create_nodes_stmt(["We`ird Label", "B"]), {"rows": rows}, db=db))
    ok(cypher(base, "UNWIND $rows AS row CREATE (n) SET n = row.props, n.`_ferry_id` = row.id",
              {"rows": [{"id": "d", "props": {"x": 1}}]}, db=db))
    ok(cypher(base, create_nodes_stmt(["B", "A"]), {"rows": [{"id": "e", "props": {}}]}, db=db))
    ok(cypher(base, create_rels_stmt("HAS `TICK"), {"rows": [
        {"start": "a", "end": "b", "props": {"w": 0.5}}, {"start": "a", "end": "a", "props": {}},
        {"start": "a", "end": "missing", "props": {}}]}, db=db))
    dump = graph(base, db)
    by_ferry = {n["props"].get("_ferry_id"): n for n in dump["nodes"]}
    assert by_ferry["a"]["labels"] == ["We`ird Label", "B"]
    assert by_ferry["a"]["props"] == {"s": "é🚀\n\"q\"", "i": -(2 ** 63), "f": 1.5, "b": False, "l": [1, 2],
                                      "ls": [], "_ferry_id": "a"}  # null entries are not stored
    assert by_ferry["c"]["props"] == {"_ferry_id": "c"}
    assert by_ferry["d"]["labels"] == []
    assert by_ferry["e"]["labels"] == ["B", "A"]  # label-token order, not statement order
    rels = dump["relationships"]
    # the row whose end does not match creates nothing
    assert [(r["type"], r["props"]) for r in rels] == [("HAS `TICK", {"w": 0.5}), ("HAS `TICK", {})]
    assert any(r["start"] == r["end"] for r in rels)

    # invalid property values fail the whole statement and write nothing
    for props in ({"m": {"nested": 1}}, {"l": [1, None]}, {"l": ["a", 1]}, {"l": [[1]]}):
        r = cypher(base, create_nodes_stmt(["X"]), {"rows": [{"id": "ok", "props": {"a": 1}}, {"id": "z", "props": props}]}, db=db)
        assert r.status == 202 and r.json()["errors"][0]["code"] == "Neo.ClientError.Statement.TypeError", props
    assert len(graph(base, db)["nodes"]) == 5
    # mixed ints and floats are widened to floats
    ok(cypher(base, create_nodes_stmt(["X"]), {"rows": [{"id": "w", "props": {"l": [1, 2.5]}}]}, db=db))
    assert [n["props"]["l"] for n in graph(base, db)["nodes"] if n["labels"] == ["X"]] == [[1.0, 2.5]]
    r = cypher(base, create_nodes_stmt(["X"]), {}, db=db)
    assert r.json()["errors"][0]["code"] == "Neo.ClientError.Statement.ParameterMissing"


# ----- fault switches ----------------------------------------------------------------------------------
def test_fail_next(base):
    token = get_token(base)
    control(base, fail_next=[{"status": 503, "retry_after": "1"}, {"status": 500, "body": "raw oops"},
                             {"status": 502}])
    r = token_request(base)
    assert r.status == 503 and r.headers["Retry-After"] == "1" and "errors" in r.json()
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", token)
    assert r.status == 500 and r.raw == b"raw oops" and r.headers.get("Retry-After") is None
    r = cypher(base, COUNT_NODES)
    assert r.status == 502 and r.json()["errors"][0]["code"].startswith("Neo.TransientError")
    assert state(base)["switches"]["fail_next"] == []
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).status == 200
    assert cypher(base, COUNT_NODES).status == 202


def test_malformed_next(base):
    token = get_token(base)
    control(base, malformed_next=2)
    assert token_request(base).status == 200  # /oauth is not affected
    r = api(base, "GET", f"/v1/instances/{INSTANCE}", token)
    assert r.status == 200 and r.raw == b"<html>502 Bad Gateway</html>"
    r = cypher(base, COUNT_NODES)
    assert r.status == 200 and r.raw == b"<html>502 Bad Gateway</html>"
    assert state(base)["switches"]["malformed_next"] == 0
    assert api(base, "GET", f"/v1/instances/{INSTANCE}", token).json()["data"]["id"] == INSTANCE


def test_query_error_next(base):
    control(base, query_error_next=["database is restarting",
                                    {"code": "Neo.TransientError.Transaction.DeadlockDetected", "message": "deadlock"}])
    r = cypher(base, COUNT_NODES)
    assert r.status == 202
    assert r.json() == {"errors": [{"code": "Neo.TransientError.General.DatabaseUnavailable",
                                    "message": "database is restarting"}]}
    control(base, query_error_status=503)
    r = cypher(base, create_nodes_stmt(["A"]), {"rows": [{"id": "1", "props": {}}]})
    assert r.status == 503
    assert r.json()["errors"][0] == {"code": "Neo.TransientError.Transaction.DeadlockDetected", "message": "deadlock"}
    assert len(graph(base)["nodes"]) == NODES  # the failed write did not happen
    assert ok(cypher(base, COUNT_NODES))["values"] == [[NODES]]
    assert state(base)["query_count"] == 3


def test_control_api(base):
    r = http(base, "POST", "/__control", b'{"no_such_switch": 1}', {"Content-Type": "application/json"})
    assert r.status == 400
    r = http(base, "POST", "/__control", b'{"snapshot_polls": "two"}', {"Content-Type": "application/json"})
    assert r.status == 400
    switches = state(base)["switches"]
    assert switches == {"token_ttl": 3600.0, "expire_tokens_now": False, "snapshot_polls": 2,
                        "snapshot_fail": False, "rate_limit": 125, "fail_next": [], "malformed_next": 0,
                        "query_error_next": [], "query_error_status": None, "error_variant": False,
                        "restore_polls": 2, "instance_status": None, "clock_offset": 0, "faults": [],
                        "query_reply_delay_s": 0, "restore_lag_polls": 0, "create_seconds": 1.0,
                        "destroy_seconds": 0.5, "instance_quota": None, "create_reply_delay_s": 0,
                        "explain_scan": False}
    before = graph(base)
    get_token(base)
    ok(cypher(base, create_nodes_stmt(["Tmp"]), {"rows": [{"id": "t", "props": {}}]}))
    cypher(base, COUNT_NODES, db="scratch")
    control(base, snapshot_fail=True, rate_limit=1000)
    st = state(base)
    assert st["token_requests"] == 1 and st["query_count"] == 2
    assert {"method": "POST", "path": "/oauth/token", "status": 200, "step": "token"} in \
        [{k: v for k, v in r.items() if k != "t"} for r in st["requests"]]
    assert http(base, "POST", "/__control/reset", b"{}").status == 200
    st = state(base)
    assert st["switches"] == switches and st["token_requests"] == 0 and st["snapshots"] == []
    assert st["requests"] == [] and st["query_count"] == 0 and st["databases"] == ["neo4j"]
    assert graph(base) == before  # the seeded database is regenerated identically
    assert http(base, "GET", "/__control/graph?db=nope").status == 404


# ----- performance ---------------------------------------------------------------------------------------
def test_paging_speed_on_large_graph():
    t0 = time.perf_counter()
    proc, url = start("--nodes", "10000", "--rels", "20000", "--seed", "1")
    startup = time.perf_counter() - t0
    try:
        timings = []
        t0 = time.perf_counter()
        nodes = page_all(url, NODES_PAGE, batch=1000, timings=timings)
        rels = page_all(url, RELS_PAGE, batch=1000, timings=timings)
        total = time.perf_counter() - t0
        assert len(nodes) == 10000 and len({r[0] for r in nodes}) == 10000
        assert len(rels) == 20000 and len({r[0] for r in rels}) == 20000
        print(f"\nstartup {startup:.2f}s, full paging {total:.2f}s over {len(timings)} queries, "
              f"median {statistics.median(timings) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms")
        assert statistics.median(timings) < 0.05
        assert max(timings) < 0.1
        assert total < 3
        assert startup < 5
    finally:
        stop(proc)


def test_label_and_type_counts_match_the_graph(base):
    g = graph(base)
    labels, types = Counter(), Counter()
    for n in g["nodes"]:
        labels.update(n["labels"])
    types.update(r["type"] for r in g["relationships"])
    data = ok(cypher(base, "MATCH (n) UNWIND labels(n) AS label RETURN label, count(*) AS n"))
    assert data["fields"] == ["label", "n"]
    assert {label: n for label, n in data["values"]} == dict(labels)
    data = ok(cypher(base, "MATCH ()-[r]->() RETURN type(r) AS type, count(r) AS n"))
    assert data["fields"] == ["type", "n"]
    assert {t: n for t, n in data["values"]} == dict(types)
    empty = ok(cypher(base, "MATCH (n) UNWIND labels(n) AS label RETURN label, count(*) AS n", db="nothing-here"))
    assert empty["values"] == []


def test_bounded_detach_delete_empties_a_database_batch_by_batch(base):
    db = "scratch"
    ok(cypher(base, create_nodes_stmt(["A"]), {"rows": [{"id": i, "props": {"i": i}} for i in range(7)]}, db=db))
    ok(cypher(base, create_rels_stmt("R"), {"rows": [{"start": i, "end": i + 1, "props": {}} for i in range(6)]}, db=db))
    stmt = "MATCH (n) WITH n LIMIT $limit DETACH DELETE n RETURN count(n) AS deleted"
    deleted = []
    while True:
        data = ok(cypher(base, stmt, {"limit": 3}, db=db))
        assert data["fields"] == ["deleted"]
        deleted.append(data["values"][0][0])
        if deleted[-1] == 0:
            break
        left = graph(base, db)
        ids = {n["id"] for n in left["nodes"]}
        assert all(r["start"] in ids and r["end"] in ids for r in left["relationships"]), "no dangling relationships"
    assert deleted == [3, 3, 1, 0]
    assert graph(base, db) == {"nodes": [], "relationships": []}
    # The _ferry_id index forgot the deleted nodes: new rows connect to new nodes only.
    ok(cypher(base, create_nodes_stmt(["B"]), {"rows": [{"id": 0, "props": {}}, {"id": 1, "props": {}}]}, db=db))
    ok(cypher(base, create_rels_stmt("S"), {"rows": [{"start": 0, "end": 1, "props": {}}]}, db=db))
    assert len(graph(base, db)["relationships"]) == 1


def merge_nodes_stmt(labels) -> str:
    target = "n" + "".join(":" + quote(label) for label in labels)
    return f"UNWIND $rows AS row MERGE ({target} {{`_ferry_id`: row.id}}) SET n += row.props"


def merge_rels_stmt(type_: str) -> str:
    return ("UNWIND $rows AS row MATCH (a {`_ferry_id`: row.start}), (b {`_ferry_id`: row.end}) "
            f"MERGE (a)-[r:{quote(type_)} {{`_ferry_id`: row.id}}]->(b) SET r += row.props")


CLEAN_NODES = ("MATCH (n) WHERE n.`_ferry_id` IS NOT NULL WITH n LIMIT $limit REMOVE n.`_ferry_id` "
               "RETURN count(n) AS cleaned")
CLEAN_RELS = ("MATCH ()-[r]->() WHERE r.`_ferry_id` IS NOT NULL WITH r LIMIT $limit REMOVE r.`_ferry_id` "
              "RETURN count(r) AS cleaned")


def test_merge_statements_sent_twice_change_nothing_the_second_time(base):
    db = "merged"
    nodes = [{"id": "n1", "props": {"name": "Ada", "n": 1}}, {"id": "n2", "props": {"name": "Zoë"}}]
    rels = [{"id": "r1", "start": "n1", "end": "n2", "props": {"since": 2020}},
            {"id": "r2", "start": "n1", "end": "n2", "props": {}}]  # parallel relationships stay two
    for _ in range(2):
        ok(cypher(base, merge_nodes_stmt(["Person", "Admin"]), {"rows": nodes}, db=db))
        ok(cypher(base, merge_rels_stmt("KNOWS"), {"rows": rels}, db=db))
    g = graph(base, db)
    assert [(sorted(n["labels"]), n["props"]) for n in g["nodes"]] == [
        (["Admin", "Person"], {"_ferry_id": "n1", "name": "Ada", "n": 1}),
        (["Admin", "Person"], {"_ferry_id": "n2", "name": "Zoë"})]
    assert [(r["type"], r["props"]) for r in g["relationships"]] == [
        ("KNOWS", {"_ferry_id": "r1", "since": 2020}), ("KNOWS", {"_ferry_id": "r2"})]
    assert state(base)["merge_matches"] == 4, "the second round found all four elements"


def test_merge_matches_label_subsets_type_and_endpoints_and_sets_with_plus_equals(base):
    db = "merge-semantics"
    ok(cypher(base, merge_nodes_stmt(["A", "B"]), {"rows": [{"id": 1, "props": {"x": 1, "y": 2}}]}, db=db))
    # A node with a superset of the labels matches (Cypher MERGE); += keeps _ferry_id and x, null removes y.
    ok(cypher(base, merge_nodes_stmt(["A"]), {"rows": [{"id": 1.0, "props": {"y": None, "z": "new"}}]}, db=db))
    # Another label the node lacks: a new node.
    ok(cypher(base, merge_nodes_stmt(["C"]), {"rows": [{"id": 1, "props": {}}]}, db=db))
    # Rows see the nodes earlier rows of the same statement made.
    ok(cypher(base, merge_nodes_stmt([]), {"rows": [{"id": "u", "props": {"k": 1}}, {"id": "u", "props": {"k": 2}}]},
              db=db))
    g = graph(base, db)
    assert [(n["labels"], n["props"]) for n in g["nodes"]] == [
        (["A", "B"], {"_ferry_id": 1, "x": 1, "z": "new"}), (["C"], {"_ferry_id": 1}), ([], {"_ferry_id": "u", "k": 2})]
    # Endpoints with _ferry_id 1 are two nodes: MATCH gives two starts; another type is another relationship.
    ok(cypher(base, merge_rels_stmt("R"), {"rows": [{"id": "r", "start": 1, "end": "u", "props": {}}]}, db=db))
    ok(cypher(base, merge_rels_stmt("R"), {"rows": [{"id": "r", "start": 1, "end": "u", "props": {"p": 1}}]}, db=db))
    ok(cypher(base, merge_rels_stmt("S"), {"rows": [{"id": "r", "start": 1, "end": "u", "props": {}}]}, db=db))
    ok(cypher(base, merge_rels_stmt("R"), {"rows": [{"id": "r", "start": "u", "end": 1, "props": {}}]}, db=db))
    rels = graph(base, db)["relationships"]
    assert Counter((r["type"], r["props"].get("p"), r["start"] == g["nodes"][2]["id"]) for r in rels) == Counter(
        [("R", 1, False), ("R", 1, False), ("S", None, False), ("S", None, False), ("R", None, True), ("R", None, True)])
    # Endpoints that do not exist: no rows, nothing made, and a null id is then no error.
    ok(cypher(base, merge_rels_stmt("R"), {"rows": [{"id": None, "start": "nope", "end": "u", "props": {}}]}, db=db))
    assert len(graph(base, db)["relationships"]) == 6
    # A null id where MERGE runs is Neo4j's SemanticError, and the statement changes nothing.
    before = graph(base, db)
    for stmt, rows in ((merge_nodes_stmt(["A"]), [{"id": "fresh", "props": {}}, {"id": None, "props": {}}]),
                       (merge_rels_stmt("R"), [{"id": "new", "start": 1, "end": "u", "props": {}},
                                               {"id": None, "start": 1, "end": "u", "props": {}}])):
        resp = cypher(base, stmt, {"rows": rows}, db=db)
        assert resp.json()["errors"][0]["code"] == "Neo.ClientError.Statement.SemanticError"
        assert "null property value" in resp.json()["errors"][0]["message"]
    assert graph(base, db) == before


def test_bounded_cleanup_removes_ferry_ids_from_nodes_and_relationships(base):
    db = "cleaned"
    ok(cypher(base, merge_nodes_stmt(["P"]), {"rows": [{"id": i, "props": {"i": i}} for i in range(5)]}, db=db))
    ok(cypher(base, merge_rels_stmt("K"), {"rows": [{"id": f"r{i}", "start": i, "end": i + 1, "props": {"w": i}}
                                                    for i in range(4)]}, db=db))
    counts = []
    while True:
        data = ok(cypher(base, CLEAN_NODES, {"limit": 2}, db=db))
        assert data["fields"] == ["cleaned"]
        counts.append(data["values"][0][0])
        if counts[-1] == 0:
            break
    assert counts == [2, 2, 1, 0]
    assert ok(cypher(base, CLEAN_RELS, {"limit": 3}, db=db))["values"] == [[3]]
    assert ok(cypher(base, CLEAN_RELS, {"limit": 3}, db=db))["values"] == [[1]]
    assert ok(cypher(base, CLEAN_RELS, {"limit": 3}, db=db))["values"] == [[0]]
    g = graph(base, db)
    assert sorted(n["props"]["i"] for n in g["nodes"]) == [0, 1, 2, 3, 4]
    assert all(set(n["props"]) == {"i"} for n in g["nodes"])
    assert sorted(r["props"]["w"] for r in g["relationships"]) == [0, 1, 2, 3]
    assert all(set(r["props"]) == {"w"} for r in g["relationships"])


def test_query_reply_delay_runs_the_statement_before_answering_late(base):
    control(base, query_reply_delay_s=0.5)
    started = time.time()
    done = threading.Event()
    thread = threading.Thread(target=lambda: (cypher(base, merge_nodes_stmt(["L"]), {"rows": [{"id": 1, "props": {}}]},
                                                     db="late"), done.set()))
    thread.start()
    deadline = time.time() + 5
    while time.time() < deadline and http(base, "GET", "/__control/graph?db=late").status != 200:
        time.sleep(0.02)
    assert len(graph(base, "late")["nodes"]) == 1 and not done.is_set(), "ran, not yet answered"
    thread.join(5)
    assert done.is_set() and time.time() - started >= 0.5


# ----- loads through a unique import label, and schema commands -------------------------------------
IMPORT = "_FerryImport"
CREATE_CONSTRAINT = ("CREATE CONSTRAINT `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) "
                     "REQUIRE n.`_ferry_id` IS UNIQUE")
DROP_CONSTRAINT = "DROP CONSTRAINT `ferry_import_id` IF EXISTS"
CLEAN_IMPORT = ("MATCH (n:`_FerryImport`) WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` "
                "RETURN count(n) AS cleaned")


def import_nodes_stmt(labels) -> str:
    set_labels = f"n{''.join(':' + quote(label) for label in labels)}, " if labels else ""
    return f"UNWIND $rows AS row MERGE (n:`{IMPORT}` {{`_ferry_id`: row.id}}) SET {set_labels}n += row.props"


def import_rels_stmt(type_: str) -> str:
    return (f"UNWIND $rows AS row MATCH (a:`{IMPORT}` {{`_ferry_id`: row.start}}), "
            f"(b:`{IMPORT}` {{`_ferry_id`: row.end}}) "
            f"MERGE (a)-[r:{quote(type_)} {{`_ferry_id`: row.id}}]->(b) SET r += row.props")


def database(base_url, db) -> dict:
    r = http(base_url, "GET", f"/__control/database?db={db}")
    assert r.status == 200, r.raw
    return r.json()


def error_code(resp: Resp) -> str:
    assert resp.status == 202, resp.raw
    return resp.json()["errors"][0]["code"]


def test_constraints_and_indexes_are_recorded_idempotent_with_if_not_exists_and_errors_without(base):
    db = "schema"
    ok(cypher(base, CREATE_CONSTRAINT, db=db))
    ok(cypher(base, CREATE_CONSTRAINT, db=db))  # IF NOT EXISTS: a no-op the second time
    assert database(base, db)["schema"] == [
        {"name": "ferry_import_id", "kind": "constraint", "label": IMPORT, "property": "_ferry_id"}]
    without = CREATE_CONSTRAINT.replace(" IF NOT EXISTS", "")
    assert error_code(cypher(base, without, db=db)) == "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists"
    other_name = without.replace("ferry_import_id", "another")
    assert error_code(cypher(base, other_name, db=db)) == "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists"
    # An index on the same label and property cannot sit beside the constraint, IF NOT EXISTS or not.
    index = "CREATE INDEX idx IF NOT EXISTS FOR (n:`_FerryImport`) ON (n.`_ferry_id`)"
    assert error_code(cypher(base, index, db=db)) == "Neo.ClientError.Schema.ConstraintAlreadyExists"
    # Dropping: an error for a missing rule unless IF EXISTS; a constraint is not dropped as an index.
    assert error_code(cypher(base, "DROP INDEX `ferry_import_id`", db=db)) == "Neo.DatabaseError.Schema.IndexDropFailed"
    ok(cypher(base, DROP_CONSTRAINT, db=db))
    assert database(base, db)["schema"] == []
    ok(cypher(base, DROP_CONSTRAINT, db=db))
    missing = cypher(base, "DROP CONSTRAINT `ferry_import_id`", db=db)
    assert error_code(missing) == "Neo.DatabaseError.Schema.ConstraintDropFailed"
    # Plain indexes follow the same rules.
    ok(cypher(base, index, db=db))
    ok(cypher(base, index, db=db))
    assert error_code(cypher(base, index.replace(" IF NOT EXISTS", ""), db=db)) == \
        "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists"
    assert error_code(cypher(base, CREATE_CONSTRAINT, db=db)) == "Neo.ClientError.Schema.IndexAlreadyExists"
    ok(cypher(base, "DROP INDEX idx IF EXISTS", db=db))
    assert database(base, db)["schema"] == []
    assert database(base, db)["statements"][:2] == ["create_constraint_if_not_exists"] * 2, "only what ran is logged"


def test_a_uniqueness_constraint_is_refused_over_duplicates_and_refuses_a_duplicate_create(base):
    db = "unique"
    ok(cypher(base, create_nodes_stmt([IMPORT]), {"rows": [{"id": "x", "props": {}}, {"id": "x", "props": {}}]}, db=db))
    resp = cypher(base, CREATE_CONSTRAINT, db=db)
    assert error_code(resp) == "Neo.ClientError.Schema.ConstraintCreationFailed"
    assert database(base, db)["schema"] == []
    db = "unique2"
    ok(cypher(base, CREATE_CONSTRAINT, db=db))
    ok(cypher(base, create_nodes_stmt([IMPORT]), {"rows": [{"id": "x", "props": {}}]}, db=db))
    rows = [{"id": "y", "props": {}}, {"id": "x", "props": {}}]
    resp = cypher(base, create_nodes_stmt(["Other", IMPORT]), {"rows": rows}, db=db)
    assert error_code(resp) == "Neo.ClientError.Schema.ConstraintValidationFailed"
    assert len(graph(base, db)["nodes"]) == 1, "the failing statement made nothing"


def test_a_load_through_the_import_label_merges_sets_labels_and_cleans_up_without_scanning(base):
    db = "imported"
    ok(cypher(base, CREATE_CONSTRAINT, db=db))
    nodes = [{"id": "a", "props": {"name": "Ada"}}, {"id": "b", "props": {}}]
    for _ in range(2):  # a statement sent again finds what it made
        ok(cypher(base, import_nodes_stmt(["Person", "Admin"]), {"rows": nodes}, db=db))
        ok(cypher(base, import_nodes_stmt([]), {"rows": [{"id": "c", "props": {"k": 1}}]}, db=db))
        ok(cypher(base, import_rels_stmt("KNOWS"), {"rows": [{"id": "r", "start": "a", "end": "c", "props": {"w": 1}}]},
                  db=db))
    g = graph(base, db)
    assert [(sorted(n["labels"]), n["props"]) for n in g["nodes"]] == [
        (sorted([IMPORT, "Person", "Admin"]), {"_ferry_id": "a", "name": "Ada"}),
        (sorted([IMPORT, "Person", "Admin"]), {"_ferry_id": "b"}),
        ([IMPORT], {"_ferry_id": "c", "k": 1})]
    assert [(r["type"], r["props"], r["start"], r["end"]) for r in g["relationships"]] == [
        ("KNOWS", {"_ferry_id": "r", "w": 1}, g["nodes"][0]["id"], g["nodes"][2]["id"])]
    assert state(base)["merge_matches"] == 4
    # Endpoints are matched under the label only: a node with that _ferry_id but not the label is not one.
    ok(cypher(base, create_nodes_stmt(["Stray"]), {"rows": [{"id": "s", "props": {}}]}, db=db))
    ok(cypher(base, import_rels_stmt("KNOWS"), {"rows": [{"id": "r2", "start": "a", "end": "s", "props": {}}]}, db=db))
    assert len(graph(base, db)["relationships"]) == 1
    assert database(base, db)["scans"] == 0, "every lookup was served by the constraint's index"
    counts = []
    while not counts or counts[-1]:
        counts.append(ok(cypher(base, CLEAN_IMPORT, {"limit": 2}, db=db))["values"][0][0])
    assert counts == [2, 1, 0]
    ok(cypher(base, DROP_CONSTRAINT, db=db))
    g = graph(base, db)
    assert [(sorted(n["labels"]), n["props"]) for n in g["nodes"]] == [
        (["Admin", "Person"], {"name": "Ada"}), (["Admin", "Person"], {}), ([], {"k": 1}),
        (["Stray"], {"_ferry_id": "s"})]
    assert database(base, db)["schema"] == []


def test_lookups_without_an_index_count_as_scans(base):
    db = "scanned"
    ok(cypher(base, import_nodes_stmt(["P"]), {"rows": [{"id": 1, "props": {}}, {"id": 2, "props": {}}]}, db=db))
    assert database(base, db)["scans"] == 2, "no constraint yet: each MERGE reads the label"
    ok(cypher(base, merge_rels_stmt("K"), {"rows": [{"id": "r", "start": 1, "end": 2, "props": {}}]}, db=db))
    assert database(base, db)["scans"] == 4, "unlabelled endpoints read every node"
    ok(cypher(base, "CREATE INDEX i FOR (n:`_FerryImport`) ON (n.`_ferry_id`)", db=db))
    ok(cypher(base, import_rels_stmt("K"), {"rows": [{"id": "r", "start": 1, "end": 2, "props": {}}]}, db=db))
    ok(cypher(base, merge_rels_stmt("K"), {"rows": [{"id": "r", "start": 1, "end": 2, "props": {}}]}, db=db))
    assert database(base, db)["scans"] == 6, "an index on the label serves labelled lookups only"
    assert state(base)["ferry_scans"] == 6
    assert database(base, db)["statements"] == ["merge_nodes_set_labels", "merge_rels", "create_index",
                                                "merge_labelled_rels", "merge_rels"]
    assert http(base, "GET", "/__control/database?db=nowhere").status == 404


# ----- typed JSON, id-range pages, EXPLAIN (Query API docs: "Result formats", "Profile queries") ------
TYPED = "application/vnd.neo4j.query"
NODES_BY_ID = ("MATCH (n) WHERE id(n) IN range($from, $to) RETURN elementId(n) AS id, labels(n) AS labels, "
               "properties(n) AS props")


def typed_cypher(base_url, statement, parameters, db="neo4j") -> Resp:
    headers = {"Content-Type": TYPED, "Accept": TYPED, "Authorization": basic(DB_USER, DB_PASSWORD)}
    return http(base_url, "POST", f"/db/{db}/query/v2", json.dumps({"statement": statement,
                                                                    "parameters": parameters}).encode(), headers)


def t(kind, value):
    return {"$type": kind, "_value": value}


def test_typed_json_parameters_are_all_or_nothing_and_values_come_back_with_their_types(base):
    r = typed_cypher(base, create_nodes_stmt(["T"]), {"rows": [{"id": "x", "props": {}}]}, db="typed")
    assert r.status == 400 and r.json()["errors"][0]["code"] == "Neo.ClientError.Request.Invalid", r.raw
    props = {"d": t("Date", "2015-03-26"), "z": t("ZonedDateTime", "2015-11-21T21:40:32.142Z[Antarctica/Troll]"),
             "p": t("Point", "SRID=9157;POINT Z (1 2 3)"), "b": t("Base64", "A2+/"), "f": t("Float", "NaN"),
             "i": t("Integer", "9007199254740993"), "l": t("List", [t("Duration", "P14DT16H12M")])}
    rows = t("List", [t("Map", {"id": t("String", "x"), "props": t("Map", props)})])
    ok(typed_cypher(base, create_nodes_stmt(["T"]), {"rows": rows}, db="typed"))
    r = typed_cypher(base, NODES_BY_ID, {"from": t("Integer", "0"), "to": t("Integer", "0")}, db="typed")
    assert r.headers.get("content-type", "").startswith(TYPED)
    (row,) = ok(r)["values"]
    got = row[2]["_value"]
    assert got["p"] == t("Point", "SRID=9157;POINT Z (1.0 2.0 3.0)"), "the server writes Double.toString"
    assert {k: got[k] for k in ("d", "z", "b", "f", "i", "l")} == {k: props[k] for k in ("d", "z", "b", "f", "i", "l")}
    plain = ok(cypher(base, NODES_BY_ID, {"from": 0, "to": 0}, db="typed"))["values"][0][2]
    assert plain["d"] == "2015-03-26" and plain["b"] == "A2+/" and plain["f"] == "NaN", "plain JSON: strings"
    for bad in (t("Date", "26/03/2015"), t("Point", "SRID=4326;POINT Z (1 2 3)"), t("Integer", 5), t("Float", "nan")):
        r = typed_cypher(base, create_nodes_stmt(["T"]), {"rows": t("List", [t("Map", {"id": t("String", "y"),
                                                                                      "props": t("Map", {"v": bad})})])},
                         db="typed")
        assert r.json()["errors"], bad


def test_id_range_pages_read_only_their_ids_and_element_id_pages_read_the_whole_graph(base):
    ok(cypher(base, NODES_BY_ID, {"from": 10, "to": 19}))
    assert state(base)["page_touched_max"] == 10
    ok(cypher(base, NODES_PAGE, {"after": "", "limit": 10}))
    assert state(base)["page_touched_max"] == NODES, "elementId > $after ORDER BY id scans every node"
    plan = typed_cypher(base, "EXPLAIN " + NODES_BY_ID, {"from": t("Integer", "0"), "to": t("Integer", "9")}).json()
    ops = []
    stack = [plan["queryPlan"]]
    while stack:
        node = stack.pop()
        ops.append(node["operatorType"])
        stack += node["children"]
    assert "NodeByIdSeek@neo4j" in ops and plan["data"]["values"] == []
    control(base, explain_scan=True)
    plan = typed_cypher(base, "EXPLAIN " + NODES_BY_ID, {"from": t("Integer", "0"), "to": t("Integer", "9")}).json()
    assert "AllNodesScan" in json.dumps(plan["queryPlan"])
