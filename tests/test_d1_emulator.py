"""Tests for the D1 REST export emulator (tests/emulators/d1.py) and its dump generator.

The emulator runs as a subprocess on a free port, exactly as the end-to-end
tests use it; every request goes through urllib / http.client to 127.0.0.1.
"""

from __future__ import annotations

import datetime
import email.utils
import gzip
import http.client
import json
import os
import re
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from emulators.common import get_tolerating_cutoff, start_emulator, stop_emulator

sys.path.insert(0, str(Path(__file__).resolve().parent / "emulators"))
from d1_dump import DumpError, VIRTUAL_TABLE_ERROR, dump_sql, js_number_to_string, quote_string  # noqa: E402

ACCOUNT = "0123456789abcdef0123456789abcdef"
TOKEN = "test-token-abc"
MAIN_ID = "11111111-2222-3333-4444-555555555555"
FTS_ID = "66666666-7777-8888-9999-000000000000"
EMPTY_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
BIG_ID = "bbbbbbbb-0000-0000-0000-000000000000"

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never use a proxy


def fts5_available() -> bool:
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(a)")
        return True
    except sqlite3.OperationalError:
        return False


# ----- databases -----------------------------------------------------------------------
MAIN_SCHEMA = '''
CREATE TABLE items(id INTEGER PRIMARY KEY, qty INTEGER, price REAL, label TEXT, data BLOB, note TEXT);
CREATE TABLE "Quoted ""T""" (k TEXT, v REAL);
CREATE TABLE seq(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);
CREATE TABLE _cf_KV(key TEXT PRIMARY KEY, value BLOB);
CREATE INDEX idx_items_label ON items(label);
CREATE VIEW v_items AS SELECT id, label FROM items;
CREATE TRIGGER trg_seq AFTER INSERT ON seq BEGIN UPDATE items SET qty = qty WHERE 0; END;
'''

ITEMS = [
    (1, 3, 1.5, "it's", b"\x00\xff\x10\xab", None),
    (2, -7, 1e21, "a\r\nb", b"", "x"),
    (3, 0, 0.1, "line1\nline2", None, "cr\ronly"),
    (4, 2**53, 1.2345e-7, "back\\nslash and\nnewline", b"ABC", 'q"uote'),
    (5, None, -0.30000000000000004, "", None, "unicode é ✓"),
]


def build_main_db(path: Path):
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(MAIN_SCHEMA)
        conn.executemany("INSERT INTO items VALUES(?,?,?,?,?,?)", ITEMS)
        conn.executemany('INSERT INTO "Quoted ""T""" VALUES(?,?)', [("k'1", 2.5), ("k2", None)])
        conn.executemany("INSERT INTO seq(name) VALUES(?)", [("a",), ("b",), ("c",)])
        conn.execute("DELETE FROM seq WHERE name='b'")
        conn.execute("INSERT INTO _cf_KV VALUES('secret', x'00')")
        conn.commit()


@pytest.fixture(scope="session")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("d1")
    paths = {"main": root / "maindb.sqlite", "fts": root / "ftsdb.sqlite",
             "empty": root / "emptydb.sqlite", "big": root / "bigdb.sqlite"}
    build_main_db(paths["main"])
    with closing(sqlite3.connect(paths["fts"])) as conn:
        conn.execute("CREATE TABLE plain(x)")
        if fts5_available():
            conn.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
            conn.execute("INSERT INTO docs VALUES('hello')")
        conn.commit()
    sqlite3.connect(paths["empty"]).close()
    with closing(sqlite3.connect(paths["big"])) as conn:
        conn.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, payload TEXT)")
        conn.executemany("INSERT INTO blobs(payload) VALUES(?)", [("z" * 1000,) for _ in range(300)])
        conn.commit()
    return paths


@pytest.fixture(scope="session")
def server(dbs):
    proc, port, line = start_emulator("d1.py", [
        "--account", ACCOUNT, "--token", TOKEN,
        "--database", f"{MAIN_ID}={dbs['main']}", "--database", f"{FTS_ID}={dbs['fts']}",
        "--database", f"{EMPTY_ID}={dbs['empty']}", "--database", f"{BIG_ID}={dbs['big']}",
        "--active-polls", "2", "--cancel-after", "30", "--url-ttl", "3600"])
    try:
        assert port is not None, f"unexpected first line {line!r}"
        yield f"127.0.0.1:{port}"
    finally:
        stop_emulator(proc)


@pytest.fixture(autouse=True)
def fresh(server):
    control(server, "/__control/reset")


# ----- HTTP helpers --------------------------------------------------------------------
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


def control(server, path="/__control", body=None) -> dict:
    method = "GET" if path.endswith("/state") else "POST"
    resp = request(f"http://{server}{path}", method, body if body is not None else ({} if method == "POST" else None))
    assert resp.status == 200, resp.body
    return resp.json()


def auth_headers():
    return {"Authorization": f"Bearer {TOKEN}"}


def export_call(server, db_id=MAIN_ID, bookmark=None, options=None, headers=None, account=ACCOUNT, body=None):
    if body is None:
        body = {"output_format": "polling", "dump_options": options or {"no_schema": False, "no_data": False, "tables": []}}
        if bookmark is not None:
            body["current_bookmark"] = bookmark
    url = f"http://{server}/client/v4/accounts/{account}/d1/database/{db_id}/export"
    return request(url, "POST", body, auth_headers() if headers is None else headers)


def run_export(server, db_id=MAIN_ID, options=None, max_polls=20):
    """Poll like wrangler does until a 200; return all responses."""
    responses = [export_call(server, db_id, options=options)]
    while responses[-1].status == 202:
        assert len(responses) < max_polls
        bookmark = responses[-1].json()["result"]["at_bookmark"]
        responses.append(export_call(server, db_id, bookmark=bookmark, options=options))
    return responses


def download(url, headers=None):
    return request(url, headers=headers)


def exported_sql(server, db_id=MAIN_ID, options=None) -> str:
    final = run_export(server, db_id, options)[-1].json()["result"]
    assert final["status"] == "complete", final
    resp = download(final["result"]["signed_url"])
    assert resp.status == 200
    return resp.body.decode()


def local_dump(path, **kwargs) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return dump_sql(conn, **kwargs)


# ----- export protocol -----------------------------------------------------------------
def test_export_polls_active_then_complete(server):
    responses = run_export(server)
    assert [r.status for r in responses] == [202, 202, 200]
    bodies = [r.json() for r in responses]
    for body in bodies:
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert body["result"]["success"] is True and body["result"]["type"] == "export"
    bookmarks = {b["result"]["at_bookmark"] for b in bodies}
    assert len(bookmarks) == 1
    bookmark = bookmarks.pop()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{32}", bookmark)
    assert [b["result"]["status"] for b in bodies] == ["active", "active", "complete"]
    filename = f"{MAIN_ID}-{bookmark}.sql"
    messages = [b["result"]["messages"] for b in bodies]
    assert messages == [[f"Generating {filename}"], ["Uploaded part 2", "Uploaded part 1"],
                        [f"Finished uploading {filename} in 2 parts."]]
    final = bodies[-1]["result"]
    assert final["result"]["filename"] == filename
    # Shaped like an R2 presigned GET: the issue time and lifetime are in the query.
    assert re.fullmatch(rf"http://{re.escape(server)}/__signed/[A-Za-z0-9_-]+/{re.escape(filename)}"
                        r"\?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=[^&]+&X-Amz-Date=\d{8}T\d{6}Z"
                        r"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=[0-9a-f]{64}",
                        final["result"]["signed_url"])
    assert "error" not in final
    # The documented limit (1,200 per 5 minutes per token) in both header forms.
    assert responses[0].headers["x-ratelimit-limit"] == "1200"
    assert responses[0].headers["Ratelimit-Policy"] == '"default";q=1200;w=300'
    assert re.fullmatch(r'"default";r=\d+;t=300', responses[0].headers["Ratelimit"])
    # Polling a completed task again keeps answering complete, with no new lines and a freshly
    # signed URL for the same file; the first URL still works.
    again = export_call(server, bookmark=bookmark)
    assert again.status == 200
    assert again.json()["result"]["status"] == "complete"
    assert again.json()["result"]["messages"] == []
    renewed = again.json()["result"]["result"]
    assert renewed["filename"] == filename and renewed["signed_url"] != final["result"]["signed_url"]
    assert download(renewed["signed_url"]).body == download(final["result"]["signed_url"]).body


def test_active_polls_switch_spreads_messages(server):
    control(server, body={"active_polls": 4})
    responses = run_export(server)
    assert [r.status for r in responses] == [202, 202, 202, 202, 200]
    lines = [line for r in responses for line in r.json()["result"]["messages"]]
    assert len(lines) == len(set(lines)) == 4  # every line exactly once


def query_call(server, sql, db_id=MAIN_ID):
    url = f"http://{server}/client/v4/accounts/{ACCOUNT}/d1/database/{db_id}/query"
    return request(url, "POST", {"sql": sql}, auth_headers())


def test_a_second_export_while_one_runs_is_refused(server):
    # workers-sdk#9578: "Cannot start a new export until that completes or times out".
    first = export_call(server).json()["result"]
    second = export_call(server)
    assert second.status == 200
    result = second.json()["result"]
    assert result["status"] == "error" and "Cannot start a new export until that completes or times out" in result["error"]
    assert "at_bookmark" not in result
    tasks = control(server, "/__control/state")["tasks"]
    assert len(tasks) == 1 and tasks[0]["status"] == "active" and tasks[0]["at_bookmark"] == first["at_bookmark"]


def test_queries_are_refused_while_an_export_runs_and_served_after(server):
    export_call(server)
    refused = query_call(server, "SELECT 1 AS one")
    assert refused.status == 400
    assert "Currently processing a long-running export" in refused.json()["errors"][0]["message"]
    assert query_call(server, "SELECT 1 AS one", db_id=EMPTY_ID).status == 200, "other databases are served"
    control(server, body={"cancel_after": 0})
    time.sleep(0.05)
    served = query_call(server, "SELECT 1 AS one")
    assert served.status == 200 and served.json()["result"][0]["results"] == [{"one": 1}]


@pytest.mark.skipif(not fts5_available(), reason="this sqlite3 build lacks fts5")
def test_a_virtual_table_refusal_blocks_queries_and_exports_until_it_times_out(server):
    # workers-sdk#9519: after the refusal every query gets "Currently processing a long-running export".
    control(server, body={"refused_export_block_s": 1})
    assert run_export(server, FTS_ID)[-1].json()["result"]["error"] == VIRTUAL_TABLE_ERROR
    assert "long-running export" in query_call(server, "SELECT 1", db_id=FTS_ID).json()["errors"][0]["message"]
    again = export_call(server, FTS_ID).json()["result"]
    assert again["status"] == "error" and "Cannot start a new export" in again["error"]
    time.sleep(1.1)
    assert query_call(server, "SELECT 1", db_id=FTS_ID).status == 200
    table_list = query_call(server, "PRAGMA table_list", db_id=FTS_ID).json()["result"][0]["results"]
    assert {r["name"]: r["type"] for r in table_list if r["name"].startswith("docs")}["docs_data"] == "shadow"


def test_query_answers_round_integers_beyond_2_pow_53_as_a_javascript_number_does(server):
    row = query_call(server, "SELECT 9007199254740993 AS v, -9007199254740993 AS w, 9007199254740992 AS e, "
                             "CAST(9223372036854775807 AS TEXT) AS t").json()["result"][0]["results"][0]
    assert row == {"v": 9007199254740992, "w": -9007199254740992, "e": 9007199254740992, "t": "9223372036854775807"}


def test_the_status_of_a_running_export_can_be_one_d1_does_not_document(server):
    control(server, body={"active_status": "queued"})
    responses = run_export(server)
    assert [r.json()["result"]["status"] for r in responses] == ["queued", "queued", "complete"]


def test_download_matches_dump_and_restores(server, dbs, tmp_path):
    sql = exported_sql(server)
    assert sql == local_dump(dbs["main"])
    assert sql.startswith("PRAGMA defer_foreign_keys=TRUE;\n") and not sql.endswith("\n")
    lines = sql.split("\n")
    assert not any(line.startswith(("BEGIN", "COMMIT")) for line in lines) and "_cf_KV" not in sql
    assert 'CREATE TABLE IF NOT EXISTS "Quoted ""T""" (k TEXT, v REAL);' in lines
    assert "INSERT INTO \"items\" (\"id\",\"qty\",\"price\",\"label\",\"data\",\"note\") " \
           "VALUES(1,3,1.5,'it''s',X'00ff10ab',NULL);" in lines
    assert "replace(replace('a\\r\\nb','\\r',char(13)),'\\n',char(10))" in sql
    seq_at = lines.index("DELETE FROM sqlite_sequence;")
    assert lines[seq_at + 1] == 'INSERT INTO "sqlite_sequence" ("name","seq") VALUES(\'seq\',3);'
    assert all(not line.startswith("INSERT INTO \"seq\"") for line in lines[seq_at:])

    restored = tmp_path / "restored.sqlite"
    with closing(sqlite3.connect(restored)) as conn:
        conn.executescript(sql)
    with closing(sqlite3.connect(dbs["main"])) as a, closing(sqlite3.connect(restored)) as b:
        for table in ("items", 'Quoted "T"', "seq", "sqlite_sequence", "v_items"):
            quoted = '"' + table.replace('"', '""') + '"'
            columns = [c[1] for c in a.execute(f"PRAGMA table_info({quoted})")]
            types = ", ".join(f'typeof("{c}")' for c in columns)
            query = f"SELECT *, {types} FROM {quoted} ORDER BY 1"
            assert a.execute(query).fetchall() == b.execute(query).fetchall(), table
        schema = "SELECT type, name FROM sqlite_schema ORDER BY name"
        original = [row for row in a.execute(schema) if "_cf_KV" not in row[1]]
        assert original == b.execute(schema).fetchall()


def test_download_headers_and_state(server):
    final = run_export(server)[-1].json()["result"]
    resp = download(final["result"]["signed_url"])
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/sql"
    assert int(resp.headers["Content-Length"]) == len(resp.body)
    assert resp.headers.get("Content-Encoding") is None
    state = control(server, "/__control/state")
    assert state["downloads"] == 1 and state["export_calls"] == 3
    task = state["tasks"][0]
    assert task["status"] == "complete" and task["polls"] == 3 and task["dump_size"] == len(resp.body)
    assert [r["status"] for r in state["requests"]] == [202, 202, 200, 200]
    assert state["switches"]["active_polls"] == 2
    # Unknown token, or right token with a wrong filename.
    token_url = final["result"]["signed_url"]
    assert download(re.sub(r"/__signed/[^/]+/", "/__signed/nope/", token_url)).status == 404
    assert download(token_url.replace(".sql?", ".sqlx?")).status == 404


def test_signed_url_expires(server):
    control(server, body={"url_ttl": 0.4})
    url = run_export(server)[-1].json()["result"]["result"]["signed_url"]
    assert download(url).status == 200
    time.sleep(0.6)
    resp = download(url)
    assert resp.status == 403
    assert b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>" in resp.body


def test_auto_cancel_when_not_polled(server):
    control(server, body={"cancel_after": 0.3})
    bookmark = export_call(server).json()["result"]["at_bookmark"]
    time.sleep(0.5)
    resp = export_call(server, bookmark=bookmark)
    assert resp.status == 200
    result = resp.json()["result"]
    assert result["status"] == "error"
    assert result["error"] == "Export cancelled: not polled for 0.3 seconds"
    assert result["messages"] == [] and "result" not in result
    assert control(server, "/__control/state")["tasks"][0]["status"] == "cancelled"
    # The database is free again: a new export gets a new bookmark.
    fresh_task = export_call(server).json()["result"]
    assert fresh_task["status"] == "active" and fresh_task["at_bookmark"] != bookmark


def test_regular_polling_is_not_cancelled(server):
    control(server, body={"cancel_after": 0.5, "active_polls": 4})
    bookmark = export_call(server).json()["result"]["at_bookmark"]
    statuses = []
    for _ in range(4):
        time.sleep(0.2)
        statuses.append(export_call(server, bookmark=bookmark).json()["result"]["status"])
    assert statuses == ["active", "active", "active", "complete"]


def test_export_error_switch(server):
    control(server, body={"export_error": "Export failed: out of cheese"})
    responses = run_export(server)
    assert [r.status for r in responses] == [202, 202, 200]
    final = responses[-1].json()
    assert final["success"] is True
    result = final["result"]
    assert result["status"] == "error" and result["error"] == "Export failed: out of cheese"
    assert "result" not in result
    lines = [line for r in responses for line in r.json()["result"]["messages"]]
    assert lines[0].startswith("Generating ") and lines[1:] == ["Export failed: out of cheese"]


def test_polling_failure_switch(server):
    control(server, body={"polling_failure": "Export went sideways"})
    responses = run_export(server)
    assert responses[-1].status == 200
    assert responses[-1].json() == {"success": True, "errors": [], "messages": [],
                                    "result": {"success": False, "error": "Export went sideways"}}


@pytest.mark.skipif(not fts5_available(), reason="this sqlite3 build lacks fts5")
def test_virtual_table_refused(server, dbs):
    responses = run_export(server, FTS_ID)
    result = responses[-1].json()["result"]
    assert responses[-1].status == 200
    assert result["status"] == "error" and result["error"] == VIRTUAL_TABLE_ERROR
    with closing(sqlite3.connect(dbs["fts"])) as conn:
        with pytest.raises(DumpError, match=re.escape(VIRTUAL_TABLE_ERROR)):
            dump_sql(conn)
        # Only selected tables are checked, so filtering the virtual table out exports fine.
        assert dump_sql(conn, tables=["plain"]) == "PRAGMA defer_foreign_keys=TRUE;\nCREATE TABLE plain(x);"


# ----- failures, auth, validation ----------------------------------------------------------
def test_fail_next_503_then_429_then_normal(server):
    control(server, body={"fail_next": [{"status": 503, "retry_after": "2", "code": 7500, "message": "busy"},
                                        {"status": 429}]})
    first = export_call(server)
    assert first.status == 503 and first.headers["Retry-After"] == "2"
    assert first.json() == {"success": False, "errors": [{"code": 7500, "message": "busy"}],
                            "messages": [], "result": None}
    second = export_call(server)
    assert second.status == 429 and second.headers["Retry-After"] == "1"
    assert second.json()["success"] is False and second.json()["errors"][0]["code"] >= 1000
    assert export_call(server).status == 202
    assert control(server, "/__control/state")["export_calls"] == 3


def test_malformed_body(server):
    control(server, body={"fail_next": [{"status": 403, "body": "<html><body>Attention Required!</body></html>"}]})
    resp = export_call(server)
    assert resp.status == 403 and resp.headers["Content-Type"] == "text/html"
    with pytest.raises(ValueError):
        json.loads(resp.body)


def test_rate_limit_blocks_every_call(server):
    control(server, body={"rate_limit": {"limit": 3, "window": 10, "block": 1}})
    get_url = f"http://{server}/client/v4/accounts/{ACCOUNT}/d1/database/{MAIN_ID}"
    assert [export_call(server).status for _ in range(3)] == [202, 200, 200]  # one export; two refused
    limited = export_call(server)
    assert limited.status == 429 and limited.headers["Retry-After"] == "1"
    assert request(get_url, headers=auth_headers()).status == 429  # every call is blocked
    time.sleep(1.1)
    assert request(get_url, headers=auth_headers()).status == 200


def test_rate_limit_is_per_token_and_every_answer_says_what_is_left(server):
    control(server, body={"rate_limit": {"limit": 3, "window": 30, "block": 30}})
    answers = [export_call(server) for _ in range(3)]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0"]
    assert all(a.headers["x-ratelimit-limit"] == "3" for a in answers)
    assert answers[0].headers["Ratelimit"] == '"default";r=2;t=30'
    assert answers[0].headers["Ratelimit-Policy"] == '"default";q=3;w=30'
    reset = email.utils.parsedate_to_datetime(answers[2].headers["x-ratelimit-reset"])
    assert 25 <= reset.timestamp() - time.time() <= 32, "when the oldest call leaves the window"
    # Another token has a count of its own (the emulator refuses it, but counts it first).
    other = request(f"http://{server}/client/v4/accounts/{ACCOUNT}/d1/database/{MAIN_ID}",
                    headers={"Authorization": "Bearer someone-else"})
    assert other.status == 403 and other.headers["x-ratelimit-remaining"] == "2"
    limited = export_call(server)
    assert limited.status == 429 and limited.headers["x-ratelimit-remaining"] == "0"
    assert export_call(server).status == 429
    counts = control(server, "/__control/state")["rate_limit_state"]
    assert counts == {"calls": 5, "rate_limited": 1, "blocked_hits": 1}


def test_rate_limit_http_date(server):
    control(server, body={"rate_limit": {"limit": 1, "window": 10, "block": 30}, "retry_after_http_date": True})
    assert export_call(server).status == 202
    limited = export_call(server)
    assert limited.status == 429
    when = email.utils.parsedate_to_datetime(limited.headers["Retry-After"])
    assert 25 <= when.timestamp() - time.time() <= 35


def test_authentication(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Auth-Email": "a@b.c", "X-Auth-Key": "wrong"},
                    {"X-Auth-Key": TOKEN}):
        resp = export_call(server, headers=headers)
        assert resp.status == 403
        assert resp.json() == {"success": False, "errors": [{"code": 10000, "message": "Authentication error"}],
                               "messages": [], "result": None}
    assert export_call(server, headers={"X-Auth-Email": "a@b.c", "X-Auth-Key": TOKEN}).status == 202


def test_request_validation(server):
    unknown_db = export_call(server, db_id="no-such-db")
    assert unknown_db.status == 404 and unknown_db.json()["errors"][0]["code"] == 7404
    assert export_call(server, account="f" * 32).status == 404
    missing = export_call(server, body={"dump_options": {}})
    assert missing.status == 400 and missing.json()["success"] is False
    assert export_call(server, body={"output_format": "file"}).status == 400
    bad = export_call(server, bookmark="00000001-00000000-00004f6d-deadbeef")
    assert bad.status == 400
    assert bad.json()["errors"] == [{"code": 7500, "message": "Unknown export bookmark"}]


def test_hold_ms(server):
    control(server, body={"hold_ms": 300})
    started = time.monotonic()
    assert export_call(server).status == 202
    assert time.monotonic() - started >= 0.3


def test_get_database(server, dbs):
    base = f"http://{server}/client/v4/accounts/{ACCOUNT}/d1/database"
    by_id = request(f"{base}/{MAIN_ID}", headers=auth_headers())
    assert by_id.status == 200
    info = by_id.json()["result"]
    assert info["uuid"] == MAIN_ID and info["name"] == "maindb" and info["version"] == "production"
    assert info["num_tables"] == 3 and info["file_size"] == os.path.getsize(dbs["main"])
    assert "created_at" in info
    by_name = request(f"{base}/maindb?fields=uuid,name", headers=auth_headers())
    assert by_name.json()["result"] == {"uuid": MAIN_ID, "name": "maindb"}
    assert request(f"{base}/nope", headers=auth_headers()).status == 404
    assert request(f"{base}/{MAIN_ID}").status == 403
    listing = request(f"{base}?per_page=10&page=1", headers=auth_headers()).json()
    assert listing["result_info"] == {"page": 1, "per_page": 10, "count": 4, "total_count": 4}


# ----- dump options through the API ----------------------------------------------------------
def test_dump_options_through_api(server, dbs):
    no_data = exported_sql(server, options={"no_data": True})
    assert no_data == local_dump(dbs["main"], no_data=True)
    assert "INSERT INTO" not in no_data and "CREATE INDEX idx_items_label" in no_data

    no_schema = exported_sql(server, options={"no_schema": True})
    assert no_schema == local_dump(dbs["main"], no_schema=True)
    body = no_schema.split("\n")[1:]
    assert body and all(line.startswith("INSERT INTO ") for line in body)
    assert 'INSERT INTO "sqlite_sequence" ("name","seq") VALUES(\'seq\',3);' in body

    only_items = exported_sql(server, options={"tables": ["items"]})
    assert "CREATE TABLE items(" in only_items
    assert "CREATE INDEX" not in only_items and "sqlite_sequence" not in only_items  # the index-name quirk
    with_index = exported_sql(server, options={"tables": ["items", "idx_items_label"]})
    assert with_index.endswith("CREATE INDEX idx_items_label ON items(label);")


def test_empty_database_dump(server):
    assert exported_sql(server, EMPTY_ID) == "PRAGMA defer_foreign_keys=TRUE;"


# ----- signed URL transport switches -----------------------------------------------------------
def raw_get(url):
    host, path = re.match(r"http://([^/]+)(/.*)", url).groups()
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return conn, resp


def test_no_content_length_gives_chunked(server, dbs):
    control(server, body={"no_content_length": True})
    url = run_export(server, BIG_ID)[-1].json()["result"]["result"]["signed_url"]
    conn, resp = raw_get(url)
    with closing(conn):
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Length") is None
        assert resp.read().decode() == local_dump(dbs["big"])


def test_gzip_switch(server, dbs):
    control(server, body={"gzip": True})
    url = run_export(server)[-1].json()["result"]["result"]["signed_url"]
    resp = download(url)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert int(resp.headers["Content-Length"]) == len(resp.body)
    assert gzip.decompress(resp.body).decode() == local_dump(dbs["main"])


def test_gzip_and_chunked_together(server, dbs):
    control(server, body={"gzip": True, "no_content_length": True})
    url = run_export(server, BIG_ID)[-1].json()["result"]["result"]["signed_url"]
    conn, resp = raw_get(url)
    with closing(conn):
        assert resp.getheader("Content-Encoding") == "gzip"
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert gzip.decompress(resp.read()).decode() == local_dump(dbs["big"])


def test_download_delay_and_failure(server, dbs):
    control(server, body={"download_delay_ms": 100})
    url = run_export(server, BIG_ID)[-1].json()["result"]["result"]["signed_url"]
    size = len(local_dump(dbs["big"]).encode())
    assert size > 3 * 64 * 1024
    started = time.monotonic()
    assert download(url).status == 200
    assert time.monotonic() - started >= 0.1 * (size // (64 * 1024)) - 0.05
    control(server, body={"download_delay_ms": 0, "download_fail_status": 500})
    assert download(url).status == 500
    assert control(server, "/__control/state")["downloads"] == 1


def test_client_killed_mid_download_does_not_break_server(server):
    control(server, body={"download_delay_ms": 200})
    url = run_export(server, BIG_ID)[-1].json()["result"]["result"]["signed_url"]
    conn, resp = raw_get(url)
    resp.read(1000)
    conn.close()
    control(server, body={"download_delay_ms": 0})
    assert download(url).status == 200


def test_control_rejects_unknown_switch(server):
    resp = request(f"http://{server}/__control", "POST", {"no_such_switch": 1})
    assert resp.status == 400


# ----- dump generator unit tests ------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (3, "3"), (-7, "-7"), (0, "0"), (-0.0, "0"), (1.5, "1.5"), (100.0, "100"), (0.1, "0.1"),
    (0.1 + 0.2, "0.30000000000000004"), (1e20, "100000000000000000000"), (1e21, "1e+21"),
    (123456789012345680000, "123456789012345680000"), (1.5e300, "1.5e+300"), (-1.5e300, "-1.5e+300"),
    (0.000001, "0.000001"), (1e-7, "1e-7"), (1.2345e-7, "1.2345e-7"), (123e-20, "1.23e-18"),
    (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    (2**53, "9007199254740992"), (2**53 + 1, "9007199254740992"), (2**63 - 1, "9223372036854776000"),
    (float("inf"), "Infinity"), (float("-inf"), "-Infinity"), (float("nan"), "NaN"),
])
def test_js_number_to_string(value, expected):
    assert js_number_to_string(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("plain", "'plain'"),
    ("it's", "'it''s'"),
    ("a\r\nb", "replace(replace('a\\r\\nb','\\r',char(13)),'\\n',char(10))"),
    ("x\ny", "replace('x\\ny','\\n',char(10))"),
    ("x\ry", "replace('x\\ry','\\r',char(13))"),
    ("lit\\n\n", "replace('lit\\n\\012','\\012',char(10))"),
    ("\\n\\012\n", "replace('\\n\\012(\\n0)','(\\n0)',char(10))"),
])
def test_quote_string(value, expected):
    assert quote_string(value) == expected


def memory_db(script: str) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.executescript(script)
    return conn


def test_dump_matches_wrangler_example():
    conn = memory_db("""
        CREATE TABLE foo(id INTEGER PRIMARY KEY, value TEXT);
        INSERT INTO foo VALUES (1, 'xxx'), (2, 'yyy'), (3, 'zzz');
        CREATE TABLE bar(id INTEGER PRIMARY KEY, value TEXT);
        INSERT INTO bar VALUES (1, 'aaa');
    """)
    assert dump_sql(conn) == "\n".join([
        "PRAGMA defer_foreign_keys=TRUE;",
        "CREATE TABLE foo(id INTEGER PRIMARY KEY, value TEXT);",
        'INSERT INTO "foo" ("id","value") VALUES(1,\'xxx\');',
        'INSERT INTO "foo" ("id","value") VALUES(2,\'yyy\');',
        'INSERT INTO "foo" ("id","value") VALUES(3,\'zzz\');',
        "CREATE TABLE bar(id INTEGER PRIMARY KEY, value TEXT);",
        'INSERT INTO "bar" ("id","value") VALUES(1,\'aaa\');',
    ])
    assert dump_sql(conn, no_data=True) == "\n".join([
        "PRAGMA defer_foreign_keys=TRUE;",
        "CREATE TABLE foo(id INTEGER PRIMARY KEY, value TEXT);",
        "CREATE TABLE bar(id INTEGER PRIMARY KEY, value TEXT);",
    ])
    assert dump_sql(conn, no_schema=True, tables=["bar"]) == \
        'PRAGMA defer_foreign_keys=TRUE;\nINSERT INTO "bar" ("id","value") VALUES(1,\'aaa\');'
    assert dump_sql(memory_db("")) == "PRAGMA defer_foreign_keys=TRUE;"


def test_dump_special_tables_and_ordering():
    conn = memory_db("""
        CREATE TABLE 'single q'(a);
        CREATE TABLE "w""eird"("c""ol" BLOB);
        CREATE TABLE [bracketed](a);
        CREATE TABLE auto(id INTEGER PRIMARY KEY AUTOINCREMENT, n);
        CREATE TABLE _cf_METADATA(k);
        CREATE VIEW zview AS SELECT 1;
        CREATE INDEX aidx ON auto(n);
        CREATE TRIGGER trg AFTER INSERT ON auto BEGIN SELECT 1; END;
        INSERT INTO "w""eird" VALUES (x'DEADBEEF');
        INSERT INTO auto(n) VALUES (NULL);
        INSERT INTO _cf_METADATA VALUES (1);
        ANALYZE;
    """)
    lines = dump_sql(conn).split("\n")
    assert lines[:4] == [
        "PRAGMA defer_foreign_keys=TRUE;",
        "CREATE TABLE IF NOT EXISTS 'single q'(a);",
        'CREATE TABLE IF NOT EXISTS "w""eird"("c""ol" BLOB);',
        'INSERT INTO "w""eird" ("c""ol") VALUES(X\'deadbeef\');',
    ]
    assert lines[4] == "CREATE TABLE [bracketed](a);"  # only ' and " quoting triggers IF NOT EXISTS
    assert "ANALYZE sqlite_schema;" in lines
    assert lines[lines.index("ANALYZE sqlite_schema;") + 1].startswith('INSERT INTO "sqlite_stat1" ("tbl","idx","stat") VALUES(')
    # _cf_* tables are skipped (their name can still show up in sqlite_stat1 rows).
    assert not any(line.startswith(("CREATE TABLE _cf_", 'INSERT INTO "_cf_')) for line in lines)
    # sqlite_sequence comes after every other table, then index < trigger < view.
    tail = lines[lines.index("DELETE FROM sqlite_sequence;"):]
    assert tail == [
        "DELETE FROM sqlite_sequence;",
        'INSERT INTO "sqlite_sequence" ("name","seq") VALUES(\'auto\',1);',
        "CREATE INDEX aidx ON auto(n);",
        "CREATE TRIGGER trg AFTER INSERT ON auto BEGIN SELECT 1; END;",
        "CREATE VIEW zview AS SELECT 1;",
    ]
    # no_schema keeps the sqlite_sequence/sqlite_stat rows but drops DELETE/ANALYZE.
    no_schema = dump_sql(conn, no_schema=True)
    assert "DELETE FROM sqlite_sequence;" not in no_schema and "ANALYZE" not in no_schema
    assert 'INSERT INTO "sqlite_sequence"' in no_schema
    # The tables filter applies to index/trigger/view names, not their parent table.
    assert dump_sql(conn, tables=["zview", "trg"], no_data=True).split("\n") == [
        "PRAGMA defer_foreign_keys=TRUE;",
        "CREATE TRIGGER trg AFTER INSERT ON auto BEGIN SELECT 1; END;",
        "CREATE VIEW zview AS SELECT 1;",
    ]


# ----- byte ranges on the signed URL ------------------------------------------------------------
def test_signed_url_serves_ranges_and_if_range(server):
    url = run_export(server)[-1].json()["result"]["result"]["signed_url"]
    whole = download(url)
    etag, size = whole.headers["ETag"], len(whole.body)
    assert whole.headers["Accept-Ranges"] == "bytes" and whole.headers["Last-Modified"]
    part = download(url, {"Range": "bytes=10-", "If-Range": etag})
    assert part.status == 206 and part.body == whole.body[10:]
    assert part.headers["Content-Range"] == f"bytes 10-{size - 1}/{size}"
    assert download(url, {"Range": f"bytes={size}-"}).status == 416
    control(server, body={"etag_generation": 1})
    replaced = download(url, {"Range": "bytes=10-", "If-Range": etag})
    assert replaced.status == 200 and replaced.body == whole.body and replaced.headers["ETag"] != etag
    control(server, body={"ignore_range": True})
    assert download(url, {"Range": "bytes=10-"}).status == 200
    log = [r for r in control(server, "/__control/state")["requests"] if r["path"].startswith("/__signed/")]
    assert (log[1]["range"], log[1]["if_range"], log[1]["served_start"], log[1]["status"]) == ("bytes=10-", etag, 10, 206)


def test_a_renewed_signed_url_serves_the_same_object_with_the_same_etag(server):
    control(server, body={"url_ttl": 0.4})
    responses = run_export(server)
    first = responses[-1].json()["result"]
    etag = download(first["result"]["signed_url"]).headers["ETag"]
    time.sleep(0.6)
    assert download(first["result"]["signed_url"]).status == 403
    again = export_call(server, bookmark=first["at_bookmark"]).json()["result"]
    assert again["status"] == "complete" and again["result"]["signed_url"] != first["result"]["signed_url"]
    resumed = download(again["result"]["signed_url"], {"Range": "bytes=5-", "If-Range": etag})
    assert resumed.status == 206


# ----- the signed URL as an object store serves it ------------------------------------------------
def big_export(server) -> tuple[str, str]:
    """Run an export of the ~300 KB database; return (signed_url, at_bookmark)."""
    result = run_export(server, BIG_ID)[-1].json()["result"]
    assert result["status"] == "complete", result
    return result["result"]["signed_url"], result["at_bookmark"]


def signed_downloads(server) -> list:
    return [r for r in control(server, "/__control/state")["requests"] if r["path"].startswith("/__signed/")]


def raw_range_get(url, headers):
    return get_tolerating_cutoff(url, headers)


def test_every_download_carries_a_strong_etag_last_modified_accept_ranges_and_length(server):
    url, _ = big_export(server)
    whole = download(url)
    assert whole.status == 200 and len(whole.body) > 250_000
    assert re.fullmatch(r'"[0-9a-f]{32}"', whole.headers["ETag"])
    assert email.utils.parsedate_to_datetime(whole.headers["Last-Modified"]).tzinfo is not None
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Length"] == str(len(whole.body))
    part = download(url, {"Range": "bytes=100-"})
    assert part.status == 206
    for name in ("ETag", "Last-Modified", "Accept-Ranges"):
        assert part.headers[name] == whole.headers[name], name
    assert part.headers["Content-Length"] == str(len(whole.body) - 100)


def test_a_mid_file_range_gets_206_with_its_content_range_and_bytes(server):
    url, _ = big_export(server)
    body = download(url).body
    size = len(body)
    mid = size // 2 + 7
    part = download(url, {"Range": f"bytes={mid}-"})
    assert part.status == 206 and part.body == body[mid:]
    assert part.headers["Content-Range"] == f"bytes {mid}-{size - 1}/{size}"
    assert part.headers["Content-Length"] == str(size - mid)
    bounded = download(url, {"Range": f"bytes={mid}-{mid + 99}"})
    assert bounded.status == 206 and bounded.body == body[mid:mid + 100]
    assert bounded.headers["Content-Range"] == f"bytes {mid}-{mid + 99}/{size}"
    clamped = download(url, {"Range": f"bytes={size - 5}-{size + 1000}"})
    assert clamped.status == 206 and clamped.body == body[-5:]
    assert clamped.headers["Content-Range"] == f"bytes {size - 5}-{size - 1}/{size}"
    suffix = download(url, {"Range": "bytes=-10"})
    assert suffix.status == 206 and suffix.body == body[-10:]


def test_a_range_starting_at_or_past_the_end_is_416_with_the_total(server):
    url, _ = big_export(server)
    size = len(download(url).body)
    for start in (size, size + 1000):
        resp = download(url, {"Range": f"bytes={start}-"})
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{size}"
        assert resp.headers["Content-Type"] == "application/xml" and b"InvalidRange" in resp.body


def test_malformed_and_multi_range_headers_are_ignored_and_get_the_whole_body(server):
    url, _ = big_export(server)
    body = download(url).body
    for header in ("bytes=1-2,5-6", "items=0-5", "bytes=abc-", "bytes=9-3", "bytes=-"):
        resp = download(url, {"Range": header})
        assert resp.status == 200 and resp.body == body, header
        assert resp.headers.get("Content-Range") is None


def test_if_range_matching_gets_206_and_after_etag_generation_changes_the_whole_body(server):
    url, _ = big_export(server)
    whole = download(url)
    etag, modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    assert download(url, {"Range": "bytes=50-", "If-Range": etag}).status == 206
    assert download(url, {"Range": "bytes=50-", "If-Range": modified}).status == 206
    assert download(url, {"Range": "bytes=50-", "If-Range": "W/" + etag}).status == 200, "weak never matches"
    control(server, body={"etag_generation": 1})
    replaced = download(url, {"Range": "bytes=50-", "If-Range": etag})
    assert replaced.status == 200 and replaced.body == whole.body
    assert replaced.headers["ETag"] != etag and replaced.headers["Last-Modified"] != modified
    assert download(url, {"Range": "bytes=50-", "If-Range": modified}).status == 200
    again = download(url, {"Range": "bytes=50-", "If-Range": replaced.headers["ETag"]})
    assert again.status == 206 and again.body == whole.body[50:]


def test_ignore_range_answers_200_with_the_whole_body(server):
    url, _ = big_export(server)
    body = download(url).body
    control(server, body={"ignore_range": True})
    resp = download(url, {"Range": "bytes=1000-", "If-Range": download(url).headers["ETag"]})
    assert resp.status == 200 and resp.body == body
    assert resp.headers["Content-Length"] == str(len(body)) and resp.headers.get("Content-Range") is None
    assert download(url, {"Range": f"bytes={len(body) + 5}-"}).status == 200, "no 416 either"


def test_gzip_encoding_is_another_object_with_its_own_etag(server):
    url, _ = big_export(server)
    plain_etag = download(url).headers["ETag"]
    control(server, body={"gzip": True})
    encoded = download(url)
    assert encoded.headers["Content-Encoding"] == "gzip" and encoded.headers["ETag"] != plain_etag
    part = download(url, {"Range": "bytes=10-", "If-Range": encoded.headers["ETag"]})
    assert part.status == 206 and part.body == encoded.body[10:]
    assert download(url, {"Range": "bytes=10-", "If-Range": plain_etag}).status == 200


def test_truncate_after_bytes_cuts_a_range_response_counted_from_its_start(server):
    url, _ = big_export(server)
    body = download(url).body
    control(server, body={"truncate_after_bytes": 1000})
    mid = len(body) // 3
    resp, got, complete = raw_range_get(url, {"Range": f"bytes={mid}-"})
    assert resp.status == 206 and resp.getheader("Content-Length") == str(len(body) - mid)
    assert not complete and got == body[mid:mid + 1000]
    resp, got, complete = raw_range_get(url, {})
    assert resp.status == 200 and not complete and got == body[:1000]
    log = signed_downloads(server)[-2:]
    assert [(r["status"], r["served_start"], r["served_end"], r["sent"]) for r in log] == [
        (206, mid, len(body), 1000), (200, 0, len(body), 1000)]
    control(server, body={"truncate_after_bytes": 0})
    assert raw_range_get(url, {})[2]


def test_throttle_paces_every_download(server):
    url, _ = big_export(server)
    size = len(download(url).body)
    control(server, body={"throttle_kib_per_s": 512})
    began = time.monotonic()
    part = download(url, {"Range": f"bytes={size // 2}-"})
    took = time.monotonic() - began
    assert part.status == 206
    assert took >= (size - size // 2) / (512 * 1024) * 0.8, took


def test_an_expired_signed_url_is_403_xml_and_the_next_poll_issues_a_working_one(server):
    control(server, body={"signed_url_ttl_s": 0.5})
    url, bookmark = big_export(server)
    query = parse_qs(urlsplit(url).query)
    issued = datetime.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - issued).total_seconds()) < 5
    assert query["X-Amz-Expires"] == ["1"]  # the lifetime in whole seconds, rounded up
    whole = download(url)
    assert whole.status == 200
    time.sleep(0.7)
    expired = download(url, {"Range": "bytes=100-"})
    assert expired.status == 403 and expired.headers["Content-Type"] == "application/xml"
    assert b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>" in expired.body
    control(server, body={"signed_url_ttl_s": 3600})
    renewed = export_call(server, BIG_ID, bookmark=bookmark).json()["result"]
    assert renewed["status"] == "complete"
    fresh = renewed["result"]["signed_url"]
    assert fresh != url and parse_qs(urlsplit(fresh).query)["X-Amz-Expires"] == ["3600"]
    resumed = download(fresh, {"Range": "bytes=100-", "If-Range": whole.headers["ETag"]})
    assert resumed.status == 206 and resumed.body == whole.body[100:], "same dump, same validators"
    assert download(url).status == 403, "the old URL stays expired"


def test_signed_url_ttl_s_is_validated_and_url_ttl_is_its_alias(server):
    switches = control(server, "/__control/state")["switches"]
    assert switches["signed_url_ttl_s"] == 3600 and switches["url_ttl"] == 3600
    for bad in ({"signed_url_ttl_s": -1}, {"signed_url_ttl_s": "60"}, {"signed_url_ttl_s": True},
                {"url_ttl": None}, {"signed_url_ttl_s": 5, "url_ttl": 6}):
        assert request(f"http://{server}/__control", "POST", bad).status == 400, bad
    assert control(server, body={"url_ttl": 7})["switches"]["signed_url_ttl_s"] == 7
    assert control(server, body={"signed_url_ttl_s": 9})["switches"]["url_ttl"] == 9


def test_an_altered_or_stripped_signed_url_is_refused(server):
    url, _ = big_export(server)
    tampered = download(url.replace("X-Amz-Expires=3600", "X-Amz-Expires=604800"))
    assert tampered.status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in tampered.body
    stripped = download(url.split("?", 1)[0])
    assert stripped.status == 403 and b"<Code>AccessDenied</Code>" in stripped.body
    assert download(url).status == 200


def test_request_log_records_range_if_range_and_the_span_served_of_every_download(server):
    url, _ = big_export(server)
    whole = download(url, {"Accept-Encoding": "gzip, br"})
    size, etag = len(whole.body), whole.headers["ETag"]
    download(url, {"Range": "bytes=10-", "If-Range": etag})
    download(url, {"Range": "bytes=10-19"})
    download(url, {"Range": f"bytes={size}-"})
    download(url.replace("X-Amz-Expires=3600", "X-Amz-Expires=1"), {"Range": "bytes=5-"})
    log = signed_downloads(server)
    assert len(log) == 5
    path = urlsplit(url).path
    assert all(r["method"] == "GET" and r["path"] == path for r in log)
    fields = [(r["status"], r["range"], r["if_range"], r["served_start"], r["served_end"], r["sent"]) for r in log]
    assert fields == [
        (200, None, None, 0, size, size),
        (206, "bytes=10-", etag, 10, size, size - 10),
        (206, "bytes=10-19", None, 10, 20, 10),
        (416, f"bytes={size}-", None, None, None, 0),
        (403, "bytes=5-", None, None, None, 0),
    ]
    assert log[0]["accept_encoding"] == "gzip, br" and log[1]["accept_encoding"] == "identity"


def test_request_log_keeps_hundreds_of_downloads(server):
    url, _ = big_export(server)
    host, target = re.match(r"http://([^/]+)(/.*)", url).groups()
    conn = http.client.HTTPConnection(host, timeout=10)
    with closing(conn):
        for n in range(250):
            conn.request("GET", target, headers={"Range": f"bytes={n}-{n}"})
            resp = conn.getresponse()
            assert resp.status == 206 and len(resp.read()) == 1
    log = signed_downloads(server)
    assert len(log) == 250 and [r["served_start"] for r in log] == list(range(250))
