"""Tests for the D1 emulator's restore side (tests/emulators/d1_restore.py): import with SQLite
behind it, database create/delete, the query endpoint, and Time Travel restore by bookmark.

The emulator runs as a subprocess on a free port, as the end-to-end tests use it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from emulators.common import start_emulator, stop_emulator

sys.path.insert(0, str(Path(__file__).resolve().parent / "emulators"))
from d1_dump import dump_sql  # noqa: E402

ACCOUNT = "0123456789abcdef0123456789abcdef"
TOKEN = "test-token-abc"
SRC_ID = "11111111-2222-3333-4444-555555555555"
DST_ID = "22222222-2222-3333-4444-555555555555"
BASE = f"/client/v4/accounts/{ACCOUNT}/d1/database"


def rows(path, table):
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid').fetchall()


@pytest.fixture()
def env(tmp_path):
    src, dst = tmp_path / "src.sqlite", tmp_path / "dst.sqlite"
    with closing(sqlite3.connect(src)) as conn:
        conn.executescript("""
            CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT, data BLOB);
            CREATE TABLE "o""dd" (v);
            CREATE TRIGGER t AFTER INSERT ON items
            BEGIN UPDATE items SET label = label WHERE 0; END;
        """)
        conn.executemany("INSERT INTO items VALUES(?,?,?)",
                         [(i, f"x;\n'{i}'", bytes([i % 256])) for i in range(200)])
        conn.execute('INSERT INTO "o""dd"  VALUES(1)')
        conn.commit()
    sqlite3.connect(dst).close()
    proc, port, line = start_emulator("d1.py", [
        "--account", ACCOUNT, "--token", TOKEN,
        "--database", f"{SRC_ID}={src}", "--database", f"{DST_ID}={dst}", "--active-polls", "1"])
    try:
        assert port is not None, line
        yield {"host": f"127.0.0.1:{port}", "src": src, "dst": dst}
    finally:
        stop_emulator(proc)


def call(host, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection(host, timeout=30)
    hdrs = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(payload)
    except ValueError:
        return resp.status, dict(resp.getheaders()), payload


def dump_of(path) -> bytes:
    with closing(sqlite3.connect(path)) as conn:
        return dump_sql(conn).encode()


def import_file(host, db, data: bytes):
    etag = hashlib.md5(data).hexdigest()
    status, _, init = call(host, "POST", f"{BASE}/{db}/import", {"action": "init", "etag": etag})
    assert status == 200 and init["success"], init
    url = urlsplit(init["result"]["upload_url"])
    status, headers, _ = call(host, "PUT", url.path, raw=data, headers={"Content-Length": str(len(data))})
    assert status == 200
    assert headers["ETag"] == f'"{etag}"'
    status, _, answer = call(host, "POST", f"{BASE}/{db}/import",
                             {"action": "ingest", "etag": etag, "filename": init["result"]["filename"]})
    seen = [status]
    while answer["result"]["status"] == "active":
        status, _, answer = call(host, "POST", f"{BASE}/{db}/import",
                                 {"action": "poll", "current_bookmark": answer["result"]["at_bookmark"]})
        seen.append(status)
    return seen, answer["result"]


def test_an_imported_dump_produces_the_same_rows_as_the_source(env):
    seen, result = import_file(env["host"], DST_ID, dump_of(env["src"]))
    assert seen[0] == 202 and seen[-1] == 200, "ingest answers active first, then poll completes"
    assert result["status"] == "complete" and result["result"]["num_queries"] > 200
    assert result["result"]["final_bookmark"]
    assert rows(env["dst"], "items") == rows(env["src"], "items")
    assert rows(env["dst"], 'o""dd') == [(1,)]


def test_a_failing_import_leaves_the_database_as_it_was_and_reports_both_error_fields(env):
    with closing(sqlite3.connect(env["dst"])) as conn:
        conn.execute("CREATE TABLE keep(v)")
        conn.execute("INSERT INTO keep VALUES(7)")
        conn.commit()
    _, result = import_file(env["host"], DST_ID, b"INSERT INTO keep VALUES(8);\nINSERT INTO nowhere VALUES(1);")
    assert result["status"] == "error" and "nowhere" in result["error"] and result["errors"] == [result["error"]]
    assert rows(env["dst"], "keep") == [(7,)]


def test_transaction_statements_are_refused(env):
    _, result = import_file(env["host"], DST_ID, b"BEGIN TRANSACTION;\nCREATE TABLE x(a);\nCOMMIT;")
    assert result["error"] == "cannot start a transaction within a transaction"


def test_a_statement_over_100000_bytes_is_too_long_and_one_at_the_cap_is_not(env):
    head = b"INSERT INTO t VALUES('"
    at_cap = head + b"x" * (100_000 - len(head) - 3) + b"');"
    assert len(at_cap) == 100_000
    _, result = import_file(env["host"], DST_ID, b"CREATE TABLE t(a);\n" + at_cap)
    assert result["status"] == "complete", result
    over = at_cap.replace(b"');", b"x');")
    _, result = import_file(env["host"], DST_ID, b"INSERT INTO t VALUES(1);\n" + over)
    assert result["status"] == "error" and "statement too long" in result["error"], result
    assert len(rows(env["dst"], "t")) == 1, "nothing of the failed import stays"


def test_objects_that_refer_to_ones_created_later_fail_with_no_such_table(env):
    trigger_first = (b"CREATE TABLE t(a);\nCREATE TRIGGER tr INSTEAD OF INSERT ON v BEGIN INSERT INTO t "
                     b"VALUES(new.a); END;\nCREATE VIEW v AS SELECT a FROM t;")
    _, result = import_file(env["host"], DST_ID, trigger_first)
    assert result["status"] == "error" and "no such table: main.v" in result["error"], result
    _, result = import_file(env["host"], DST_ID, b"CREATE INDEX i ON t2(a);\nCREATE TABLE t2(a);")
    assert result["status"] == "error" and "no such table: main.t2" in result["error"], result
    child_first = (b"PRAGMA defer_foreign_keys=TRUE;\nCREATE TABLE c(p REFERENCES pa(id));\nINSERT INTO c VALUES(1);\n"
                   b"CREATE TABLE pa(id INTEGER PRIMARY KEY);\nINSERT INTO pa VALUES(1);")
    _, result = import_file(env["host"], DST_ID, child_first)
    assert result["status"] == "error" and "no such table: main.pa" in result["error"], result


def test_foreign_keys_are_enforced_unless_deferred(env):
    schema = (b"CREATE TABLE child(id INTEGER PRIMARY KEY, p INTEGER REFERENCES parent(id));\n"
              b"CREATE TABLE parent(id INTEGER PRIMARY KEY);\n")
    rows_sql = b"INSERT INTO child VALUES(1, 5);\nINSERT INTO parent VALUES(5);"
    _, result = import_file(env["host"], DST_ID, schema + rows_sql)
    assert result["status"] == "error" and "FOREIGN KEY constraint failed" in result["error"], result
    _, result = import_file(env["host"], DST_ID, b"PRAGMA defer_foreign_keys=TRUE;\n" + schema + rows_sql)
    assert result["status"] == "complete", result
    assert rows(env["dst"], "child") == [(1, 5)]


def test_an_upload_without_content_length_is_refused(env):
    data = b"CREATE TABLE x(a);"
    status, _, init = call(env["host"], "POST", f"{BASE}/{DST_ID}/import",
                           {"action": "init", "etag": hashlib.md5(data).hexdigest()})
    conn = http.client.HTTPConnection(env["host"], timeout=10)
    conn.putrequest("PUT", urlsplit(init["result"]["upload_url"]).path)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    assert conn.getresponse().status == 411


def test_the_upload_etag_switch_omits_or_corrupts_it(env):
    call(env["host"], "POST", "/__control", {"upload_etag": "corrupt"})
    data = b"CREATE TABLE x(a);"
    _, _, init = call(env["host"], "POST", f"{BASE}/{DST_ID}/import",
                      {"action": "init", "etag": hashlib.md5(data).hexdigest()})
    _, headers, _ = call(env["host"], "PUT", urlsplit(init["result"]["upload_url"]).path, raw=data)
    assert headers["ETag"] == '"' + "0" * 32 + '"'


def test_databases_are_created_queried_and_deleted(env):
    status, _, made = call(env["host"], "POST", BASE, {"name": "ferry-drill-0123"})
    assert status == 200 and made["result"]["name"] == "ferry-drill-0123"
    uuid = made["result"]["uuid"]
    status, _, again = call(env["host"], "POST", BASE, {"name": "ferry-drill-0123"})
    assert status == 400 and not again["success"]
    import_file(env["host"], uuid, dump_of(env["src"]))
    status, _, q = call(env["host"], "POST", f"{BASE}/{uuid}/query", {"sql": 'SELECT count(*) AS n FROM "items"'})
    assert status == 200 and q["result"][0]["results"] == [{"n": 200}]
    status, _, gone = call(env["host"], "DELETE", f"{BASE}/{uuid}")
    assert status == 200 and gone["success"]
    status, _, _ = call(env["host"], "POST", f"{BASE}/{uuid}/query", {"sql": "SELECT 1"})
    assert status == 404
    _, _, state = call(env["host"], "GET", "/__control/state")
    assert state["created"] == ["ferry-drill-0123"] and state["deleted"] == ["ferry-drill-0123"]


def test_time_travel_restores_the_content_of_a_bookmark(env):
    status, _, b = call(env["host"], "GET", f"{BASE}/{SRC_ID}/time_travel/bookmark")
    bookmark = b["result"]["bookmark"]
    with closing(sqlite3.connect(env["src"])) as conn:
        conn.execute("DELETE FROM items WHERE id >= 100")
        conn.commit()
    assert len(rows(env["src"], "items")) == 100
    status, _, r = call(env["host"], "POST", f"{BASE}/{SRC_ID}/time_travel/restore?bookmark={bookmark}")
    assert status == 200 and r["result"]["previous_bookmark"] and r["result"]["bookmark"] != bookmark
    assert len(rows(env["src"], "items")) == 200
    # The previous bookmark undoes the restore.
    call(env["host"], "POST", f"{BASE}/{SRC_ID}/time_travel/restore?bookmark={r['result']['previous_bookmark']}")
    assert len(rows(env["src"], "items")) == 100


def test_an_export_bookmark_can_be_restored_and_an_unknown_one_is_outside_the_window(env):
    status, _, started = call(env["host"], "POST", f"{BASE}/{SRC_ID}/export", {"output_format": "polling"})
    bookmark = started["result"]["at_bookmark"]
    with closing(sqlite3.connect(env["src"])) as conn:
        conn.execute("DELETE FROM items")
        conn.commit()
    status, _, r = call(env["host"], "POST", f"{BASE}/{SRC_ID}/time_travel/restore?bookmark={bookmark}")
    assert status == 200, r
    assert len(rows(env["src"], "items")) == 200
    status, _, r = call(env["host"], "POST", f"{BASE}/{SRC_ID}/time_travel/restore?bookmark=nope")
    assert status == 400 and "outside the Time Travel window" in r["errors"][0]["message"]
    call(env["host"], "POST", "/__control", {"expired_bookmarks": [bookmark]})
    status, _, r = call(env["host"], "POST", f"{BASE}/{SRC_ID}/time_travel/restore?bookmark={bookmark}")
    assert status == 400


def test_at_most_ten_restores_per_ten_minutes(env):
    _, _, b = call(env["host"], "GET", f"{BASE}/{SRC_ID}/time_travel/bookmark")
    path = f"{BASE}/{SRC_ID}/time_travel/restore?bookmark={b['result']['bookmark']}"
    statuses = [call(env["host"], "POST", path)[0] for _ in range(11)]
    assert statuses == [200] * 10 + [429]


def test_a_stuck_import_stays_active_and_blocks_the_database_until_the_switch_is_cleared(env):
    host, data = env["host"], b"CREATE TABLE x(a);"
    call(host, "POST", "/__control", {"import_stuck": True})
    etag = hashlib.md5(data).hexdigest()
    _, _, init = call(host, "POST", f"{BASE}/{DST_ID}/import", {"action": "init", "etag": etag})
    call(host, "PUT", urlsplit(init["result"]["upload_url"]).path, raw=data, headers={"Content-Length": str(len(data))})
    _, _, answer = call(host, "POST", f"{BASE}/{DST_ID}/import",
                        {"action": "ingest", "etag": etag, "filename": init["result"]["filename"]})
    bookmark = answer["result"]["at_bookmark"]
    for _ in range(5):
        status, _, answer = call(host, "POST", f"{BASE}/{DST_ID}/import", {"action": "poll", "current_bookmark": bookmark})
        assert (status, answer["result"]["status"]) == (202, "active"), answer
    status, _, _ = call(host, "POST", f"{BASE}/{DST_ID}/query", {"sql": "SELECT 1"})
    assert status == 503, "D1 blocks the database while it imports"
    call(host, "POST", "/__control", {"import_stuck": False})
    for _ in range(3):  # then the usual import_active_polls
        status, _, answer = call(host, "POST", f"{BASE}/{DST_ID}/import", {"action": "poll", "current_bookmark": bookmark})
        if answer["result"]["status"] != "active":
            break
    assert (status, answer["result"]["status"]) == (200, "complete"), answer


def test_a_create_whose_answer_is_lost_made_the_database_and_a_second_is_refused_7502(env):
    """The ``create`` fault step: ``truncate`` creates the database and cuts the answer."""
    status, _, _ = call(env["host"], "POST", "/__control", {"faults": [{"step": "create", "fault": "truncate"}]})
    assert status == 200
    conn = http.client.HTTPConnection(env["host"], timeout=30)
    conn.request("POST", BASE, body=json.dumps({"name": "ferry-drill-lost"}),
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    try:
        resp.read()
        cut = False
    except http.client.IncompleteRead:
        cut = True
    conn.close()
    assert cut, "the answer was lost"
    status, _, again = call(env["host"], "POST", BASE, {"name": "ferry-drill-lost"})
    assert status == 400 and again["errors"][0]["code"] == 7502, again
    status, _, listed = call(env["host"], "GET", f"{BASE}?name=ferry-drill-lost")
    assert status == 200 and [d["name"] for d in listed["result"]] == ["ferry-drill-lost"]


def test_query_answers_round_integers_beyond_2_53_as_a_javascript_number_would(env):
    sql = "SELECT 9007199254740993 AS big, CAST(9007199254740993 AS TEXT) AS exact, 9007199254740992 AS edge"
    status, _, q = call(env["host"], "POST", f"{BASE}/{SRC_ID}/query", {"sql": sql})
    assert status == 200
    (row,) = q["result"][0]["results"]
    assert row["big"] != 9007199254740993 and row["big"] == 9007199254740992
    assert row["exact"] == "9007199254740993" and row["edge"] == 9007199254740992
