"""Tests for the Dgraph Cloud admin API / Cerebro emulator (tests/emulators/dgraph.py).

Each emulator runs as a subprocess on a free port, exactly as the end-to-end tests use it;
every request goes through urllib to 127.0.0.1.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest

from emulators.common import get_tolerating_cutoff, start_emulator, stop_emulator

ADMIN_KEY = "admin-key-plain-0123"
ACL_KEY = "admin-key-acl-4567"
ACL_PASSWORD = "s3cret-pw"
CEREBRO_EMAIL = "ops@example.com"
CEREBRO_PASSWORD = "cerebro-pw"

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never use a proxy

LOGIN = ("mutation login($userId: String, $password: String, $namespace: Int, $refreshToken: String) "
         "{ login(userId: $userId, password: $password, namespace: $namespace, refreshToken: $refreshToken) "
         "{ response { accessJWT refreshJWT } } }")
EXPORT = ("mutation($format: String, $namespace: Int) { export(format: $format, namespace: $namespace) "
          "{ response { code message } exportId taskId } }")
STATUS = ("query($exportId: String!, $taskId: String!) { exportStatus(exportId: $exportId, taskId: $taskId) "
          "{ kind lastUpdated signedUrls status } }")
CEREBRO_LOGIN = "query Login($email: String!, $password: String!) { login(email: $email, password: $password) { token } }"
DEPLOYMENTS = "{ deployments { uid name zone url owner jwtToken deploymentMode deploymentType lambdaScript } }"


def start(args):
    proc, port, line = start_emulator("dgraph.py", args)
    if port is None:
        proc.kill()
        raise AssertionError(f"unexpected first line {line!r}")
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def plain():
    """No ACL, one group, Cerebro with two deployments."""
    proc, addr = start(["--admin-key", ADMIN_KEY, "--cerebro-email", CEREBRO_EMAIL,
                        "--cerebro-password", CEREBRO_PASSWORD, "--deployments", "alpha,beta"])
    yield addr
    stop_emulator(proc)


@pytest.fixture(scope="session")
def acl():
    """ACL on, two groups."""
    proc, addr = start(["--admin-key", ACL_KEY, "--acl", "--user-id", "groot", "--password", ACL_PASSWORD,
                        "--groups", "2", "--access-ttl", "21600"])
    yield addr
    stop_emulator(proc)


@pytest.fixture(autouse=True)
def fresh(request):
    for name in ("plain", "acl"):
        if name in request.fixturenames:
            control(request.getfixturevalue(name), "/__control/reset")


# ----- HTTP helpers ----------------------------------------------------------------------------
class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(url, method="GET", body=None, headers=None) -> Resp:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(req, timeout=10) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


def control(server, path="/__control", body=None, expect=200):
    method = "GET" if path.endswith("/state") else "POST"
    resp = request(f"http://{server}{path}", method, body if body is not None else ({} if method == "POST" else None))
    assert resp.status == expect, resp.body
    return resp.json()


def gql(server, path, query, variables=None, key=ADMIN_KEY, token=None, headers=None) -> Resp:
    h = dict(headers or {})
    if key is not None:
        h["X-Auth-Token"] = key
    if token is not None:
        h["X-Dgraph-AccessToken"] = token
    return request(f"http://{server}{path}", "POST", {"query": query, "variables": variables or {}}, h)


def export(server, fmt="json", namespace=None, base="", key=ADMIN_KEY, token=None) -> Resp:
    variables = {"format": fmt}
    if namespace is not None:
        variables["namespace"] = namespace
    return gql(server, f"{base}/admin/slash", EXPORT, variables, key=key, token=token)


def status(server, export_id, task_id, base="", key=ADMIN_KEY, token=None) -> dict:
    resp = gql(server, f"{base}/admin/slash", STATUS, {"exportId": export_id, "taskId": task_id},
               key=key, token=token)
    assert resp.status == 200, resp.body
    body = resp.json()
    assert "errors" not in body, body
    return body["data"]["exportStatus"]


def started(resp: Resp) -> tuple[str, str]:
    assert resp.status == 200, resp.body
    body = resp.json()
    assert "errors" not in body, body
    data = body["data"]["export"]
    return data["exportId"], data["taskId"]


def run_to_end(server, fmt="json", namespace=None, base="", key=ADMIN_KEY, token=None, max_polls=10):
    export_id, task_id = started(export(server, fmt, namespace, base, key, token))
    seen = []
    while True:
        st = status(server, export_id, task_id, base, key, token)
        seen.append(st)
        if st["status"] in ("Success", "Failed") or len(seen) >= max_polls:
            return task_id, seen


def login(server, **variables) -> Resp:
    return gql(server, "/admin", LOGIN, variables, key=ACL_KEY)


def tokens(server, namespace=0) -> dict:
    resp = login(server, userId="groot", password=ACL_PASSWORD, namespace=namespace)
    body = resp.json()
    assert resp.status == 200 and "errors" not in body, body
    return body["data"]["login"]["response"]


def jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def error_messages(resp: Resp) -> list:
    return [e["message"] for e in resp.json().get("errors") or []]


def file_name(url: str) -> str:
    """The file a signed URL serves: its last path segment (the query is the signature)."""
    return urlsplit(url).path.rsplit("/", 1)[1]


def token_of(url: str) -> str:
    return urlsplit(url).path.split("/")[2]


# ----- export protocol -----------------------------------------------------------------------------
def test_export_then_status_moves_one_step_per_poll(plain):
    resp = export(plain)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    data = resp.json()["data"]["export"]
    assert "errors" not in resp.json()
    assert re.fullmatch(r"0x[0-9a-f]+", data["taskId"])
    assert data["response"] == {"code": "Success", "message": f"Export queued with ID {data['taskId']}"}
    assert re.fullmatch(r"exports/\d{4}-\d{2}-\d{2}/0x[0-9a-f]+-\d+", data["exportId"])

    polls = [status(plain, data["exportId"], data["taskId"]) for _ in range(5)]
    assert [p["status"] for p in polls] == ["Queued", "Running", "Success", "Success", "Success"]
    for p in polls:
        assert p["kind"] == "Export"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", p["lastUpdated"])
    assert polls[0]["signedUrls"] == [] and polls[1]["signedUrls"] == []
    urls = polls[2]["signedUrls"]
    pattern = (rf"http://{re.escape(plain)}/__signed/[A-Za-z0-9_-]+/dgraph\.r\d+\.u\d{{4}}\.\d{{4}}/([^?]+)"
               r"\?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=[^&]+&X-Amz-Date=\d{8}T\d{6}Z"
               r"&X-Amz-Expires=172800&X-Amz-SignedHeaders=host&X-Amz-Signature=[0-9a-f]{64}")
    names = [re.fullmatch(pattern, u).group(1) for u in urls]
    assert names == ["g01.json.gz", "g01.schema.gz", "g01.gql_schema.gz"]
    # Every Success poll signs the same files anew: fresh tokens, same paths after the token.
    later = [polls[3]["signedUrls"], polls[4]["signedUrls"]]
    assert all([file_name(u) for u in us] == names for us in later)
    assert len({token_of(us[0]) for us in [urls, *later]}) == 3
    assert request(urls[0]).body == request(later[-1][0]).body

    state = control(plain, "/__control/state")
    [summary] = state["exports"]
    assert summary["backend"] == "default" and summary["taskId"] == data["taskId"]
    assert summary["exportId"] == data["exportId"] and summary["format"] == "json"
    assert summary["namespace"] == 0 and summary["status"] == "Success" and summary["polls"] == 5
    assert [f["name"] for f in summary["files"]] == names
    assert [r["op"] for r in state["requests"]][:2] == ["export", "exportStatus"]


def test_downloads_are_stored_gzip_bytes_in_dgraph_formats(plain):
    task_id, seen = run_to_end(plain)
    urls = seen[-1]["signedUrls"]
    files = {}
    for url in urls:
        name = file_name(url)
        resp = request(url, headers={"Accept-Encoding": "gzip"})
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert int(resp.headers["Content-Length"]) == len(resp.body)
        assert resp.headers.get("Content-Encoding") is None
        raw = request(f"http://{plain}/__control/file/{task_id}/{name}")
        assert raw.status == 200 and raw.body == resp.body
        assert resp.body[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # Go's gzip header
        files[name] = gzip.decompress(resp.body).decode()
    state = control(plain, "/__control/state")
    assert state["downloads"] == 3
    for f in state["exports"][0]["files"]:
        stored = request(f"http://{plain}/__control/file/{task_id}/{f['name']}").body
        assert f["size"] == len(stored) and f["sha256"] == hashlib.sha256(stored).hexdigest()

    data_text = files["g01.json.gz"]
    assert data_text.startswith("[\n  {") and data_text.endswith("}\n]\n")
    rows = json.loads(data_text)
    assert isinstance(rows, list) and rows
    assert all(set(r) >= {"uid", "namespace"} and len(r) == 3 for r in rows)
    assert {"uid": "0x1", "namespace": "0x0", "name": "Alice"} in rows
    assert {"uid": "0x1", "namespace": "0x0", "name@es": "Alicia"} in rows
    assert {"uid": "0x1", "namespace": "0x0", "age": 30} in rows
    assert {"uid": "0x1", "namespace": "0x0", "active": "true"} in rows   # only numbers are bare
    assert {"uid": "0x1", "namespace": "0x0",
            "friend": [{"uid": "0x2", "friend|close": "true", "friend|since": "2006-01-02T15:04:05Z"}]} in rows
    lines = data_text.split(",\n")
    assert lines.index('  {"uid":"0x1","namespace":"0x0","name@es":"Alicia"}') + 1 == \
        lines.index('  {"uid":"0x1","namespace":"0x0","name":"Alice"}')
    assert "\\u003cb\\u003e\\u0026" in data_text           # Go's HTML-safe escaping
    assert not any(k.startswith(("dgraph.graphql", "dgraph.drop")) for r in rows for k in r)
    assert {"uid": "0x4", "namespace": "0x0", "dgraph.type": "dgraph.graphql"} not in rows

    schema = files["g01.schema.gz"]
    pred_lines = [line for line in schema.split("\n") if line.startswith("[0x0] <")]
    assert pred_lines and all(line.endswith(" . ") for line in pred_lines)
    assert "[0x0] <name>:string @index(exact,term) @lang . \n" in schema
    assert "[0x0] <friend>:[uid] @reverse @count . \n" in schema
    assert "[0x0] type <Person> {\n\tname\n" in schema and "\t<~friend>\n}\n" in schema

    gql_schema = files["g01.gql_schema.gz"]
    assert gql_schema.startswith("[\n{") and gql_schema.endswith("}\n]\n")
    entries = json.loads(gql_schema)
    assert [set(e) for e in entries] == [{"Namespace", "Schema"}]
    assert entries[0]["Namespace"] == 0 and "type Person" in entries[0]["Schema"]


def test_rdf_export_and_inline_literal_arguments(plain):
    query = 'mutation { export(format: "rdf", namespace: 0) { response { code message } exportId taskId } }'
    export_id, task_id = started(gql(plain, "/admin/slash", query))
    for _ in range(3):
        st = status(plain, export_id, task_id)
    assert st["status"] == "Success"
    names = [file_name(u) for u in st["signedUrls"]]
    assert names == ["g01.rdf.gz", "g01.schema.gz", "g01.gql_schema.gz"]
    text = gzip.decompress(request(st["signedUrls"][0]).body).decode()
    lines = text.splitlines()
    nquad = re.compile(r'<0x[0-9a-f]+> <[^>]+> (<0x[0-9a-f]+>|"(?:[^"\\]|\\.)*"(@\w+|\^\^<[\w:]+>)?) <0x0>( \(.*\))? \.')
    assert lines and all(nquad.fullmatch(line) for line in lines), lines
    assert '<0x1> <name> "Alicia"@es <0x0> .' in lines
    assert '<0x1> <name> "Alice"^^<xs:string> <0x0> .' in lines
    assert '<0x1> <age> "30"^^<xs:int> <0x0> .' in lines
    assert '<0x1> <nickname> "Ali" <0x0> .' in lines                   # untyped default: no suffix
    assert '<0x1> <friend> <0x2> <0x0> (close=true,since=2006-01-02T15:04:05Z) .' in lines
    assert '<0x1> <friend> <0x3> <0x0> (note="met at \\"work\\"",weight=0.25) .' in lines
    assert control(plain, "/__control/state")["exports"][0]["format"] == "rdf"


def test_invalid_format_and_unknown_ids(plain):
    resp = export(plain, fmt="csv")
    assert resp.status == 200
    assert resp.json() == {"data": {"export": None}, "errors": [{"message": "invalid export format: csv"}]}
    st = status(plain, "exports/2024-01-01/0x1-1", "0xdeadbeef")
    assert st["status"] == "Unknown" and st["signedUrls"] == []
    export_id, task_id = started(export(plain))
    assert status(plain, "exports/wrong", task_id)["status"] == "Unknown"
    assert status(plain, export_id, task_id)["status"] == "Queued"


def test_each_export_gets_fresh_files_and_urls(plain):
    _, first = run_to_end(plain)
    _, second = run_to_end(plain)
    a, b = first[-1]["signedUrls"], second[-1]["signedUrls"]
    assert a[0].split("/")[4] != b[0].split("/")[4]          # token
    assert a[0].split("/")[5] != b[0].split("/")[5]          # dgraph.r<readTs>... folder
    assert request(a[0]).body == request(b[0]).body           # same data, same bytes


def test_signed_urls_expire(plain):
    control(plain, body={"url_ttl": 1})
    _, seen = run_to_end(plain)
    url = seen[-1]["signedUrls"][0]
    assert request(url).status == 200
    time.sleep(1.2)
    resp = request(url)
    assert resp.status == 403
    assert b"<Code>AccessDenied</Code><Message>Request has expired</Message>" in resp.body
    assert request(url.rsplit("/", 1)[0] + "/g09.json.gz").status in (403, 404)


def test_download_fail_status_switch(plain):
    _, seen = run_to_end(plain)
    control(plain, body={"download_fail_status": 500})
    assert request(seen[-1]["signedUrls"][0]).status == 500
    control(plain, body={"download_fail_status": None})
    assert request(seen[-1]["signedUrls"][0]).status == 200


def test_auth_errors(plain):
    for key in (None, "wrong-key"):
        resp = export(plain, key=key)
        assert resp.status == 200
        assert error_messages(resp) == ["Invalid X-Auth-Token"] and resp.json()["data"] is None
    resp = gql(plain, "/admin/slash", EXPORT, {"format": "json"}, key=None, headers={"Dg-Auth": ADMIN_KEY})
    started(resp)
    control(plain, body={"auth_error_status": 401})
    resp = export(plain, key="wrong-key")
    assert resp.status == 401 and error_messages(resp) == ["Invalid X-Auth-Token"]
    assert status(plain, "x", "y")["status"] == "Unknown"      # a good key still works
    # The deployments' keys are not valid on the default backend and vice versa.
    control(plain, body={"auth_error_status": 200})
    assert error_messages(export(plain, base="/backends/alpha")) == ["Invalid X-Auth-Token"]


def test_fail_next_statuses_are_consumed_in_order(plain):
    control(plain, body={"fail_next": [{"status": 503}, {"status": 429, "retry_after": "2"},
                                       {"status": 503, "body": '{"errors":[{"message":"upstream"}]}'}]})
    first = export(plain)
    assert first.status == 503 and first.headers.get("Retry-After") is None
    second = export(plain)
    assert second.status == 429 and second.headers["Retry-After"] == "2"
    third = gql(plain, "/admin", LOGIN, {"userId": "groot"})      # /admin consumes too
    assert third.status == 503 and third.json() == {"errors": [{"message": "upstream"}]}
    assert third.headers["Content-Type"] == "application/json"
    started(export(plain))
    assert control(plain, "/__control/state")["switches"]["fail_next"] == []


def test_graphql_error_next_and_malformed_next(plain):
    control(plain, body={"graphql_error_next": ["Dgraph is busy, please retry"], "malformed_next": 2})
    for _ in range(2):
        resp = export(plain)
        assert resp.status == 200 and resp.body == b"<html>502 Bad Gateway</html>"
        with pytest.raises(ValueError):
            resp.json()
    resp = export(plain)
    assert resp.status == 200
    assert resp.json() == {"data": None, "errors": [{"message": "Dgraph is busy, please retry"}]}
    export_id, task_id = started(export(plain))
    assert status(plain, export_id, task_id)["status"] == "Queued"


def test_graphql_error_next_is_not_used_by_admin_login(acl):
    control(acl, body={"graphql_error_next": ["boom"]})
    access = tokens(acl)["accessJWT"]
    resp = export(acl, key=ACL_KEY, token=access)
    assert error_messages(resp) == ["boom"]


def test_failed_and_unknown_status_values(plain):
    control(plain, body={"status_sequence": ["Queued", "Running", "Failed"]})
    task_id, seen = run_to_end(plain)
    assert [s["status"] for s in seen] == ["Queued", "Running", "Failed"]
    assert seen[-1]["signedUrls"] == []
    assert control(plain, "/__control/state")["exports"][0]["files"] == []
    assert request(f"http://{plain}/__control/file/{task_id}/g01.json.gz").status == 404

    control(plain, body={"status_sequence": ["Queued", "Paused", "Running", "Success"]})
    _, seen = run_to_end(plain)
    assert [s["status"] for s in seen] == ["Queued", "Paused", "Running", "Success"]
    assert len(seen[-1]["signedUrls"]) == 3


def test_export_answer_forms_follow_the_selection_the_docs_example_or_neither(plain):
    control(plain, body={"export_answer_form": "docs_example"})
    data = export(plain).json()["data"]
    # Dgraph Cloud's docs: data.export is the export id, response and taskID sit beside it.
    assert set(data) == {"export", "response", "taskID"} and isinstance(data["export"], str)
    assert data["response"]["message"] == f"Export queued with ID {data['taskID']}"
    assert status(plain, data["export"], data["taskID"])["status"] == "Queued"
    control(plain, body={"export_answer_form": "unrecognised"})
    answer = export(plain).json()["data"]["export"]
    assert list(answer) == ["response"] and answer["response"]["code"] == "Success"
    assert re.fullmatch(r"Export queued with ID 0x[0-9a-f]+", answer["response"]["message"])
    assert len(control(plain, "/__control/state")["exports"]) == 2, "queued even when unrecognised"
    control(plain, body={"export_answer_form": "gateway_timeout"})
    answer = export(plain)
    assert answer.status == 504 and b"Gateway Time-out" in answer.body
    assert len(control(plain, "/__control/state")["exports"]) == 3, "queued behind the gateway's 504"
    control(plain, body={"export_answer_form": "other"}, expect=400)


def test_legacy_synchronous_export(plain):
    resp = gql(plain, "/admin/slash", "mutation { export { signedUrls } }")
    urls = resp.json()["data"]["export"]["signedUrls"]
    assert [file_name(u) for u in urls] == ["g01.json.gz", "g01.schema.gz", "g01.gql_schema.gz"]
    assert request(urls[0]).status == 200


def test_control_validation_and_reset(plain):
    control(plain, body={"no_such_switch": 1}, expect=400)
    control(plain, body={"status_sequence": []}, expect=400)
    control(plain, body={"malformed_next": 1})
    control(plain, "/__control/reset")
    state = control(plain, "/__control/state")
    assert state["switches"]["malformed_next"] == 0 and state["exports"] == []
    assert state["switches"]["status_sequence"] == ["Queued", "Running", "Success"]
    assert state["switches"]["url_ttl"] == 172800 and state["switches"]["access_ttl"] == 21600


def test_extra_people_makes_bigger_exports(plain):
    control(plain, body={"extra_people": 2000, "signed_url_query": True})
    _, seen = run_to_end(plain)
    url = seen[-1]["signedUrls"][0]
    assert "?X-Amz-Algorithm=" in url and url.split("?")[0].endswith("/g01.json.gz")
    body = request(url).body
    assert len(body) > 100_000
    assert len(json.loads(gzip.decompress(body))) > 10_000


# ----- ACL ---------------------------------------------------------------------------------------
def test_acl_login_and_token_errors(acl):
    bad = login(acl, userId="groot", password="nope", namespace=0)
    assert bad.json() == {"data": {"login": None}, "errors": [{"message": "invalid username or password"}]}
    assert error_messages(gql(acl, "/admin", LOGIN, {"userId": "groot", "password": ACL_PASSWORD},
                              key="wrong")) == ["Invalid X-Auth-Token"]
    pair = tokens(acl)
    claims = jwt_claims(pair["accessJWT"])
    assert claims["userid"] == "groot" and claims["namespace"] == 0 and claims["exp"] > time.time() + 21000

    resp = export(acl, key=ACL_KEY)
    assert resp.json() == {"data": {"export": None}, "errors": [{"message": "no accessJwt available"}]}
    export_id, task_id = started(export(acl, key=ACL_KEY, token=pair["accessJWT"]))
    assert status(acl, export_id, task_id, key=ACL_KEY, token=pair["accessJWT"])["status"] == "Queued"

    control(acl, body={"expire_tokens_now": True})
    assert control(acl, "/__control/state")["switches"]["expire_tokens_now"] is False
    resp = gql(acl, "/admin/slash", STATUS, {"exportId": export_id, "taskId": task_id},
               key=ACL_KEY, token=pair["accessJWT"])
    assert error_messages(resp) == ["Token is expired"]

    refreshed = login(acl, refreshToken=pair["refreshJWT"]).json()["data"]["login"]["response"]
    assert refreshed["accessJWT"] != pair["accessJWT"]
    st = status(acl, export_id, task_id, key=ACL_KEY, token=refreshed["accessJWT"])
    assert st["status"] == "Running"
    bad_refresh = login(acl, refreshToken="not-a-token")
    assert bad_refresh.json() == {"data": {"login": None}, "errors": [{"message": "invalid refresh token"}]}


def test_a_redirect_307_fault_sends_the_login_with_its_body_to_another_origin(acl):
    control(acl, body={"faults": [{"step": "login", "fault": "redirect_307"}]})
    moved = login(acl, userId="groot", password=ACL_PASSWORD, namespace=0)
    assert moved.status == 307
    location = moved.headers["Location"]
    assert urlsplit(location).port != int(acl.rsplit(":", 1)[1])
    # A client that follows it as RFC 9110 says re-sends the POST and its body there.
    request(location, "POST", {"variables": {"password": ACL_PASSWORD}})
    (seen,) = control(acl, "/__control/state")["login_requests"]
    assert seen["method"] == "POST" and seen["body_bytes"] > 0
    assert login(acl, userId="groot", password=ACL_PASSWORD, namespace=0).status == 200, "once, then normal"


def test_acl_access_ttl_expiry(acl):
    control(acl, body={"access_ttl": 1})
    access = tokens(acl)["accessJWT"]
    started(export(acl, key=ACL_KEY, token=access))
    time.sleep(1.2)
    assert error_messages(export(acl, key=ACL_KEY, token=access)) == ["Token is expired"]


def test_acl_namespace_guard_and_groups(acl):
    galaxy = tokens(acl, namespace=0)["accessJWT"]
    task_id, seen = run_to_end(acl, namespace=-1, key=ACL_KEY, token=galaxy)
    names = [file_name(u) for u in seen[-1]["signedUrls"]]
    assert names == ["g01.json.gz", "g01.schema.gz", "g01.gql_schema.gz",
                     "g02.json.gz", "g02.schema.gz", "g02.gql_schema.gz"]
    rows = json.loads(gzip.decompress(request(seen[-1]["signedUrls"][0]).body))
    assert {r["namespace"] for r in rows} == {"0x0", "0x1"}
    assert {"uid": "0x2", "namespace": "0x0", "dgraph.xid": "groot"} in rows   # ACL data is exported
    assert control(acl, "/__control/state")["exports"][0]["namespace"] == -1
    gql_g2 = gzip.decompress(request(seen[-1]["signedUrls"][5]).body)
    assert gql_g2 == b"[\n\n]\n"

    tenant = tokens(acl, namespace=1)["accessJWT"]
    resp = export(acl, namespace=-1, key=ACL_KEY, token=tenant)
    assert resp.json() == {"data": {"export": None},
                           "errors": [{"message": "Only guardian of galaxy can export all namespaces"}]}
    assert error_messages(export(acl, namespace=0, key=ACL_KEY, token=tenant)) == \
        ["not allowed to export namespace 0x0"]
    _, seen = run_to_end(acl, key=ACL_KEY, token=tenant)      # namespace omitted: the caller's own
    rows = json.loads(gzip.decompress(request(seen[-1]["signedUrls"][0]).body))
    assert rows and {r["namespace"] for r in rows} == {"0x1"}
    assert login(acl, userId="groot", password=ACL_PASSWORD, namespace=7).json()["data"] == {"login": None}


# ----- Cerebro and multiple backends -------------------------------------------------------------
def cerebro(server, query, variables=None, bearer=None) -> Resp:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return request(f"http://{server}/cerebro/graphql", "POST", {"query": query, "variables": variables or {}}, headers)


def test_cerebro_login_deployments_and_per_backend_exports(plain):
    bad = cerebro(plain, CEREBRO_LOGIN, {"email": CEREBRO_EMAIL, "password": "wrong"})
    assert bad.status == 200 and bad.json() == {"data": {"login": None}}
    token = cerebro(plain, CEREBRO_LOGIN, {"email": CEREBRO_EMAIL, "password": CEREBRO_PASSWORD}
                    ).json()["data"]["login"]["token"]
    for bearer in (None, "bogus"):
        resp = cerebro(plain, DEPLOYMENTS, bearer=bearer)
        assert resp.status == 200 and error_messages(resp) == ["unauthorized"]
    deployments = cerebro(plain, DEPLOYMENTS, bearer=token).json()["data"]["deployments"]
    assert [d["name"] for d in deployments] == ["alpha", "beta"]
    for d in deployments:
        assert set(d) == {"uid", "name", "zone", "url", "owner", "jwtToken", "deploymentMode",
                          "deploymentType", "lambdaScript"}
        assert d["url"] == f"http://{plain}/backends/{d['name']}"
        assert re.fullmatch(r"0x[0-9a-f]+", d["uid"])
    alpha, beta = deployments
    assert alpha["jwtToken"] != beta["jwtToken"]

    base = "/backends/alpha"
    assert error_messages(export(plain, base=base, key=ADMIN_KEY)) == ["Invalid X-Auth-Token"]
    assert error_messages(export(plain, base=base, key=beta["jwtToken"])) == ["Invalid X-Auth-Token"]
    task_id, seen = run_to_end(plain, base=base, key=alpha["jwtToken"])
    assert seen[-1]["status"] == "Success"
    url = seen[-1]["signedUrls"][0]
    assert url.startswith(f"http://{plain}/__signed/")
    assert request(url).status == 200
    # Exports are per backend: alpha's ids are unknown on beta and on the default backend.
    export_id = control(plain, "/__control/state")["exports"][0]["exportId"]
    assert status(plain, export_id, task_id, base="/backends/beta", key=beta["jwtToken"])["status"] == "Unknown"
    assert status(plain, export_id, task_id)["status"] == "Unknown"

    control(plain, body={"failing_backends": ["beta"]})
    _, seen = run_to_end(plain, base="/backends/beta", key=beta["jwtToken"])
    assert [s["status"] for s in seen] == ["Queued", "Running", "Failed"]
    _, seen = run_to_end(plain, base=base, key=alpha["jwtToken"])
    assert seen[-1]["status"] == "Success"
    backends = [e["backend"] for e in control(plain, "/__control/state")["exports"]]
    assert backends == ["alpha", "beta", "alpha"]


def test_cerebro_token_expiry(plain):
    control(plain, body={"cerebro_ttl": 1})
    token = cerebro(plain, CEREBRO_LOGIN, {"email": CEREBRO_EMAIL, "password": CEREBRO_PASSWORD}
                    ).json()["data"]["login"]["token"]
    assert "errors" not in cerebro(plain, DEPLOYMENTS, bearer=token).json()
    time.sleep(1.2)
    assert error_messages(cerebro(plain, DEPLOYMENTS, bearer=token)) == ["unauthorized"]


def test_expired_urls_are_renewed_by_the_next_status_poll_and_serve_ranges(plain):
    control(plain, body={"url_ttl": 1})
    export_id, task_id = started(export(plain))
    st = status(plain, export_id, task_id)
    while st["status"] != "Success":
        st = status(plain, export_id, task_id)
    url = st["signedUrls"][0]
    whole = request(url)
    etag, size = whole.headers["ETag"], len(whole.body)
    part = request(url, headers={"Range": "bytes=3-", "If-Range": etag})
    assert part.status == 206 and part.body == whole.body[3:]
    assert part.headers["Content-Range"] == f"bytes 3-{size - 1}/{size}"
    time.sleep(1.2)
    assert request(url).status == 403
    fresh = status(plain, export_id, task_id)["signedUrls"][0]
    assert fresh != url and request(url).status == 403, "the old URL stays expired"
    resumed = request(fresh, headers={"Range": "bytes=3-", "If-Range": etag})
    assert resumed.status == 206 and resumed.body == whole.body[3:], "same object, same validators"
    control(plain, body={"ignore_range": True})
    assert request(fresh, headers={"Range": "bytes=3-"}).status == 200
    log = [r for r in control(plain, "/__control/state")["requests"] if r["path"].startswith("/__signed/")]
    assert log[1]["range"] == "bytes=3-" and log[1]["served_start"] == 3 and log[1]["status"] == 206


# ----- signed URLs as an object store serves them ---------------------------------------------------
def big_data_url(server) -> tuple[str, str, str]:
    """An export with 500 extra people; returns (data file URL, exportId, taskId)."""
    control(server, body={"extra_people": 500})
    export_id, task_id = started(export(server))
    st = status(server, export_id, task_id)
    while st["status"] != "Success":
        st = status(server, export_id, task_id)
    return st["signedUrls"][0], export_id, task_id


def signed_downloads(server) -> list:
    return [r for r in control(server, "/__control/state")["requests"] if r["path"].startswith("/__signed/")]


def raw_get(url, headers):
    return get_tolerating_cutoff(url, headers)


def test_a_mid_file_range_gets_206_with_content_range_and_the_validators(plain):
    url, _, _ = big_data_url(plain)
    whole = request(url)
    body, size = whole.body, len(whole.body)
    assert size > 20_000
    assert re.fullmatch(r'"[0-9a-f]{32}"', whole.headers["ETag"]) and whole.headers["Last-Modified"]
    assert whole.headers["Accept-Ranges"] == "bytes" and whole.headers["Content-Length"] == str(size)
    mid = size // 2 + 3
    part = request(url, headers={"Range": f"bytes={mid}-"})
    assert part.status == 206 and part.body == body[mid:]
    assert part.headers["Content-Range"] == f"bytes {mid}-{size - 1}/{size}"
    assert part.headers["Content-Length"] == str(size - mid)
    assert part.headers["ETag"] == whole.headers["ETag"] and part.headers.get("Content-Encoding") is None
    bounded = request(url, headers={"Range": f"bytes={mid}-{mid + 9}"})
    assert bounded.status == 206 and bounded.body == body[mid:mid + 10]
    assert bounded.headers["Content-Range"] == f"bytes {mid}-{mid + 9}/{size}"
    assert request(url, headers={"Range": "bytes=0-1,4-5"}).body == body, "multi-range is ignored"


def test_a_range_past_the_end_is_416_with_the_total(plain):
    url, _, _ = big_data_url(plain)
    size = len(request(url).body)
    resp = request(url, headers={"Range": f"bytes={size}-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{size}"


def test_if_range_matches_until_etag_generation_changes_then_the_whole_file_comes(plain):
    url, _, _ = big_data_url(plain)
    whole = request(url)
    etag = whole.headers["ETag"]
    assert request(url, headers={"Range": "bytes=7-", "If-Range": etag}).status == 206
    assert request(url, headers={"Range": "bytes=7-", "If-Range": whole.headers["Last-Modified"]}).status == 206
    control(plain, body={"etag_generation": 3})
    replaced = request(url, headers={"Range": "bytes=7-", "If-Range": etag})
    assert replaced.status == 200 and replaced.body == whole.body and replaced.headers["ETag"] != etag


def test_ignore_range_serves_the_whole_file(plain):
    url, _, _ = big_data_url(plain)
    body = request(url).body
    control(plain, body={"ignore_range": True})
    resp = request(url, headers={"Range": "bytes=7-"})
    assert resp.status == 200 and resp.body == body and resp.headers.get("Content-Range") is None


def test_truncate_after_bytes_cuts_a_range_from_its_start_and_throttle_paces(plain):
    url, _, _ = big_data_url(plain)
    body = request(url).body
    control(plain, body={"truncate_after_bytes": 500})
    resp, got, complete = raw_get(url, {"Range": "bytes=1000-"})
    assert resp.status == 206 and resp.getheader("Content-Length") == str(len(body) - 1000)
    assert not complete and got == body[1000:1500]
    assert signed_downloads(plain)[-1]["sent"] == 500
    control(plain, body={"truncate_after_bytes": 0, "throttle_kib_per_s": 64})
    began = time.monotonic()
    assert request(url, headers={"Range": "bytes=1000-"}).body == body[1000:]
    assert time.monotonic() - began >= (len(body) - 1000) / (64 * 1024) * 0.8


def test_an_expired_url_is_403_xml_and_the_next_success_poll_signs_fresh_ones(plain):
    control(plain, body={"signed_url_ttl_s": 0.5})
    assert control(plain, "/__control/state")["switches"]["url_ttl"] == 0.5
    url, export_id, task_id = big_data_url(plain)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["1"] and re.fullmatch(r"\d{8}T\d{6}Z", query["X-Amz-Date"][0])
    whole = request(url)
    time.sleep(0.7)
    expired = request(url, headers={"Range": "bytes=100-"})
    assert expired.status == 403 and expired.headers["Content-Type"] == "application/xml"
    assert b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>" in expired.body
    control(plain, body={"signed_url_ttl_s": 60})
    st = status(plain, export_id, task_id)
    assert st["status"] == "Success"
    fresh = st["signedUrls"][0]
    assert fresh != url and file_name(fresh) == file_name(url) and token_of(fresh) != token_of(url)
    resumed = request(fresh, headers={"Range": "bytes=100-", "If-Range": whole.headers["ETag"]})
    assert resumed.status == 206 and resumed.body == whole.body[100:]
    log = signed_downloads(plain)
    assert (log[-2]["status"], log[-2]["range"], log[-2]["served_start"]) == (403, "bytes=100-", None)


def test_an_altered_url_is_refused_and_signed_url_query_false_gives_bare_urls(plain):
    url, _, _ = big_data_url(plain)
    tampered = request(url.replace("X-Amz-Expires=172800", "X-Amz-Expires=604800"))
    assert tampered.status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in tampered.body
    control(plain, body={"signed_url_query": False})
    bare = big_data_url(plain)[0]
    assert "?" not in bare and request(bare).status == 200


def test_request_log_records_range_if_range_served_span_and_sent(plain):
    url, _, _ = big_data_url(plain)
    whole = request(url, headers={"Accept-Encoding": "gzip"})
    size, etag = len(whole.body), whole.headers["ETag"]
    request(url, headers={"Range": "bytes=40-", "If-Range": etag})
    request(url, headers={"Range": f"bytes={size + 1}-"})
    log = signed_downloads(plain)
    assert [(r["method"], r["status"], r["op"], r["range"], r["if_range"], r["served_start"], r["served_end"],
             r["sent"]) for r in log] == [
        ("GET", 200, "download", None, None, 0, size, size),
        ("GET", 206, "download", "bytes=40-", etag, 40, size, size - 40),
        ("GET", 416, "download", f"bytes={size + 1}-", None, None, None, 0)]
    assert log[0]["accept_encoding"] == "gzip" and log[0]["path"] == urlsplit(url).path


# ----- Dgraph's own backups and restores (dedicated backends) -----------------------------------
LIST_BACKUPS = "query { listBackups { response { type backupNum folder timestamp } errors { message } } }"
RESTORE = ("mutation($uid: String!, $backupFolder: String, $backupNum: Int) { restore(uid: $uid, "
           "backupFolder: $backupFolder, backupNum: $backupNum) { response { code message restoreId } "
           "errors { message } } }")
RESTORE_STATUS = "query($restoreId: Int!) { restoreStatus(restoreId: $restoreId) { response { status errors } } }"


def backend_info(server, name="default") -> dict:
    return next(b for b in control(server, "/__control/state")["backends"] if b["name"] == name)


def data_file(server) -> bytes:
    task_id, seen = run_to_end(server)
    assert seen[-1]["status"] == "Success"
    return request(f"http://{server}/__control/file/{task_id}/g01.json.gz").body


def restore_via_api(server, uid, folder, num) -> dict:
    resp = gql(server, "/admin/slash", RESTORE, {"uid": uid, "backupFolder": folder, "backupNum": num})
    assert resp.status == 200, resp.body
    return resp.json()["data"]["restore"]


def test_backups_are_listed_as_nested_series_of_snapshots(plain):
    full = control(plain, "/__control/backup", {"type": "full", "timestamp": "2026-11-16T00:00:00+0000"})
    control(plain, "/__control/data", {"extra_people": 3})
    inc = control(plain, "/__control/backup", {"timestamp": "2026-11-16T04:00:00+0000"})
    assert (full["type"], full["backupNum"], inc["type"], inc["backupNum"]) == ("full", 1, "incremental", 2)
    assert inc["folder"] == full["folder"]
    second = control(plain, "/__control/backup", {"type": "full"})
    resp = gql(plain, "/admin/slash", LIST_BACKUPS).json()
    listed = resp["data"]["listBackups"]
    assert listed["errors"] == []
    assert listed["response"] == [
        [{"type": "full", "backupNum": 1, "folder": full["folder"], "timestamp": "2026-11-16T00:00:00+0000"},
         {"type": "incremental", "backupNum": 2, "folder": full["folder"], "timestamp": "2026-11-16T04:00:00+0000"}],
        [{"type": "full", "backupNum": 1, "folder": second["folder"], "timestamp": second["timestamp"]}]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0000", second["timestamp"])
    control(plain, "/__control/backup", {"type": "weekly"}, expect=400)


def test_restore_puts_the_backups_data_back_once_status_reports_ok(plain):
    before = data_file(plain)
    backup = control(plain, "/__control/backup", {"type": "full"})
    control(plain, "/__control/data", {"extra_people": 5})
    changed = data_file(plain)
    assert changed != before
    uid = backend_info(plain)["uid"]
    started_ = restore_via_api(plain, uid, backup["folder"], backup["backupNum"])
    assert started_["errors"] is None
    assert started_["response"]["code"] == "Success"
    assert started_["response"]["message"] == "Restore operation started."
    rid = started_["response"]["restoreId"]
    assert isinstance(rid, int)
    first = gql(plain, "/admin/slash", RESTORE_STATUS, {"restoreId": rid}).json()["data"]["restoreStatus"]
    assert first["response"] == {"status": "InProgress", "errors": []}
    assert data_file(plain) == changed, "the data changes only once the restore is done"
    second = gql(plain, "/admin/slash", RESTORE_STATUS, {"restoreId": rid}).json()["data"]["restoreStatus"]
    assert second["response"] == {"status": "OK", "errors": []}
    assert data_file(plain) == before, "an export after the restore shows the backup's data"
    (entry,) = control(plain, "/__control/state")["restores"]
    assert (entry["uid"], entry["backupFolder"], entry["status"], entry["polls"]) == (uid, backup["folder"], "OK", 2)


def test_restore_of_a_deployments_backup_into_another_backend_and_the_latest_by_default(plain):
    alpha, beta = backend_info(plain, "alpha"), backend_info(plain, "beta")
    control(plain, "/__control/data", {"backend": "alpha", "extra_people": 2})
    control(plain, "/__control/backup", {"backend": "alpha", "type": "full"})
    resp = gql(plain, "/backends/beta/admin/slash", RESTORE, {"uid": alpha["uid"], "backupFolder": "", "backupNum": 0},
               key=beta["adminKey"]).json()["data"]["restore"]
    rid = resp["response"]["restoreId"]
    for _ in range(2):
        gql(plain, "/backends/beta/admin/slash", RESTORE_STATUS, {"restoreId": rid}, key=beta["adminKey"])
    assert backend_info(plain, "beta")["people"] == 2
    assert backend_info(plain, "alpha")["people"] == 2


def test_restore_refusals_and_status_errors(plain):
    uid = backend_info(plain)["uid"]
    assert restore_via_api(plain, "0x1", "", 0)["errors"] == [{"message": "no deployment with uid 0x1"}]
    assert "has no backups" in restore_via_api(plain, uid, "", 0)["errors"][0]["message"]
    backup = control(plain, "/__control/backup", {})
    assert "not found" in restore_via_api(plain, uid, backup["folder"], 7)["errors"][0]["message"]
    control(plain, body={"restore_errors": ["disk full"], "restore_status_sequence": ["OK"]})
    control(plain, "/__control/data", {"extra_people": 4})
    rid = restore_via_api(plain, uid, backup["folder"], 1)["response"]["restoreId"]
    st = gql(plain, "/admin/slash", RESTORE_STATUS, {"restoreId": rid}).json()["data"]["restoreStatus"]
    assert st["response"] == {"status": "ERR", "errors": ["disk full"]}
    assert backend_info(plain)["people"] == 4, "a failed restore leaves the data"
    control(plain, body={"restore_status_sequence": []}, expect=400)


def test_non_dedicated_backends_reject_backup_operations(plain):
    control(plain, body={"non_dedicated_backends": ["default", "beta"]})
    assert backend_info(plain)["deploymentType"] == "shared"
    listed = gql(plain, "/admin/slash", LIST_BACKUPS).json()
    assert listed["data"]["listBackups"]["errors"][0]["message"].endswith("dedicated backends")
    restored = restore_via_api(plain, backend_info(plain)["uid"], "", 0)
    assert restored["response"] is None and "dedicated" in restored["errors"][0]["message"]
    st = gql(plain, "/admin/slash", RESTORE_STATUS, {"restoreId": 1})
    assert "dedicated" in error_messages(st)[0]
    assert control(plain, "/__control/state")["restores"] == []
    token = cerebro(plain, CEREBRO_LOGIN, {"email": CEREBRO_EMAIL, "password": CEREBRO_PASSWORD}).json()
    listed = cerebro(plain, DEPLOYMENTS, bearer=token["data"]["login"]["token"]).json()["data"]["deployments"]
    assert {d["name"]: d["deploymentType"] for d in listed} == {"alpha": "dedicated", "beta": "shared"}


def test_backup_operations_need_the_acl_access_token(acl):
    resp = gql(acl, "/admin/slash", LIST_BACKUPS, key=ACL_KEY)
    assert error_messages(resp) == ["no accessJwt available"]
    access = tokens(acl)["accessJWT"]
    resp = gql(acl, "/admin/slash", LIST_BACKUPS, key=ACL_KEY, token=access).json()
    assert resp["data"]["listBackups"] == {"response": [], "errors": []}
