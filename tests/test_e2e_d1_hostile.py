"""End to end: a D1 database D1's own export cannot back up as it is, by the built Worker under
`wrangler dev`, against the D1 emulator (one Worker for the module).

The hostile database holds an FTS5 table with its own content, an external-content FTS5 table
kept in sync by a trigger, integers ±(2^53+1) and 2^63−1 in a table without a rowid column
(with gaps in its rowids) and in one with an INTEGER PRIMARY KEY, a 1.5 MB TEXT and a 1 MB BLOB,
and a view and a trigger that come before the tables they use. D1 refuses to export virtual
tables and then blocks the database (workers-sdk#9519); its export rounds integers beyond 2^53
(D1 import/export docs). Ferry must never send the refused export, and its backup (the dump plus
the query artifact) must rebuild the database value for value and type for type.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from harness import API_TOKEN, D1_TOKEN, D1Emulator, Ferry, d1_source

LOST_SCRATCH = "ferry-drill-00000000000000ab"
BIG = 2 ** 53 + 1
MAX = 2 ** 63 - 1
LONG_TEXT = ("it's a 'quoted'\nline;\r\n" * 70_000)[:1_500_000]
BLOB = bytes(range(256)) * 4096


def make_hostile_db(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as db:
        db.executescript("""
            CREATE VIEW early AS SELECT id, length(body) AS n FROM docs;
            CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT, data BLOB);
            CREATE TRIGGER docs_ai AFTER INSERT ON docs BEGIN INSERT INTO doc_log VALUES (new.id); END;
            CREATE TABLE doc_log (id INTEGER);
            CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT, body TEXT);
            CREATE VIRTUAL TABLE articles_fts USING fts5(title, body, content='articles', content_rowid='id');
            CREATE TRIGGER articles_ai AFTER INSERT ON articles BEGIN
              INSERT INTO articles_fts(rowid, title, body) VALUES (new.id, new.title, new.body);
            END;
            CREATE VIRTUAL TABLE notes USING fts5(subject, text, tokenize='porter');
            CREATE TABLE nums (v INTEGER, label TEXT);
            CREATE TABLE ids (id INTEGER PRIMARY KEY, big INTEGER, f REAL);
            CREATE INDEX nums_v ON nums(v);
        """)
        db.executemany("INSERT INTO articles (title, body) VALUES (?, ?)",
                       [("Ferry", "backs up databases"), ("D1", "is SQLite at the edge"), ("it's", "quoted\nlines")])
        db.executemany("INSERT INTO notes (rowid, subject, text) VALUES (?, ?, ?)",
                       [(3, "first", "running runners run"), (10, None, "ünïcødé ✓ and 'quotes'"),
                        (11, "blob-ish", "line\r\nbreak")])
        db.executemany("INSERT INTO nums VALUES (?, ?)",
                       [(1, "small"), (BIG, "plus"), (-BIG, "minus"), (MAX, "max"), (2 ** 53, "edge"), (7, "gone")])
        db.execute("DELETE FROM nums WHERE label = 'small'")  # rowids 2.. : the dump renumbers them
        db.executemany("INSERT INTO ids VALUES (?, ?, ?)", [(5, MAX, 0.5), (9, -BIG, None), (12, 3, 1e300)])
        db.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(1, LONG_TEXT, None), (2, "short", BLOB)])
        db.commit()
    return path


def snapshot(path: Path) -> dict:
    """Every ordinary table's rows in order, each value with its SQLite type; the FTS tables'
    contents and the answers of a few MATCH queries."""
    out = {}
    with closing(sqlite3.connect(path)) as db:
        for table in ("articles", "nums", "ids", "docs", "doc_log"):
            cols = [c[1] for c in db.execute(f'PRAGMA table_info("{table}")')]
            typed = ", ".join(f'"{c}", typeof("{c}")' for c in cols)
            out[table] = db.execute(f'SELECT {typed} FROM "{table}" ORDER BY {cols[0]}, rowid').fetchall()
        out["notes"] = db.execute("SELECT rowid, subject, text FROM notes ORDER BY rowid").fetchall()
        out["match"] = [db.execute(q).fetchall() for q in (
            "SELECT rowid FROM notes WHERE notes MATCH 'run' ORDER BY rowid",
            "SELECT rowid FROM articles_fts WHERE articles_fts MATCH 'edge' ORDER BY rowid",
            "SELECT rowid FROM articles_fts WHERE articles_fts MATCH 'lines' ORDER BY rowid",
        )]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("d1-hostile")
    hostile = make_hostile_db(work / "hostile.sqlite")
    plain = work / "plain.sqlite"
    with closing(sqlite3.connect(plain)) as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        db.execute("INSERT INTO t (v) VALUES ('x')")
        db.commit()
    target = work / "target.sqlite"
    sqlite3.connect(target).close()
    only_virtual, virtual_target = work / "only-virtual.sqlite", work / "virtual-target.sqlite"
    with closing(sqlite3.connect(only_virtual)) as db:
        db.execute("CREATE VIRTUAL TABLE words USING fts5(w)")
        db.executemany("INSERT INTO words (rowid, w) VALUES (?, ?)", [(1, "alpha"), (7, "beta gamma")])
        db.commit()
    sqlite3.connect(virtual_target).close()
    lost = work / f"{LOST_SCRATCH}.sqlite"  # what a drill whose job was lost left behind
    sqlite3.connect(lost).close()
    emulator = D1Emulator(work, {"hostile-uuid": hostile, "plain-uuid": plain, "busy-uuid": plain,
                                 "target-uuid": target, "virtual-uuid": only_virtual,
                                 "vtarget-uuid": virtual_target, "lost-uuid": lost}, active_polls=2, cancel_after=30)
    sources = [
        d1_source("hostile", emulator, "hostile-uuid", query_page_rows=2, scan_window_rows=2),
        d1_source("virtual", emulator, "virtual-uuid"),
        d1_source("plain", emulator, "plain-uuid"),
        d1_source("busy", emulator, "busy-uuid"),
    ]
    ferry = Ferry(work / "ferry", sources)
    yield {"ferry": ferry, "emulator": emulator, "work": work, "hostile": hostile, "target": target,
           "virtual_target": virtual_target}
    ferry.stop()
    emulator.stop()


@pytest.fixture(scope="module")
def backup(world):
    """The hostile database's backup: the job, its manifest and its two files."""
    ferry = world["ferry"]
    job = ferry.webhook_job("hostile", timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("hostile") if m["job_id"] == job["id"]]
    files = {a["filename"]: ferry.artifact(a["key"])[1] for a in manifest["artifacts"]}
    return {"job": job, "manifest": manifest, "files": files, "state": world["emulator"].state()}


def test_virtual_tables_never_reach_the_export_and_the_manifest_says_which_path_each_table_took(backup):
    tasks = backup["state"]["tasks"]
    assert [t["status"] for t in tasks] == ["complete"], f"one export, never refused: {tasks}"
    paths = backup["manifest"]["provider"]["paths"]
    assert sorted(paths["query_tables"]) == ["articles_fts", "notes"]
    assert "notes" not in paths["dump_tables"] and not any(t.startswith(("notes_", "articles_fts")) for t in paths["dump_tables"])
    assert {"articles", "nums", "ids", "articles_ai", "nums_v"} <= set(paths["dump_tables"])
    names = [a["filename"] for a in backup["manifest"]["artifacts"]]
    assert names[0] == "ferry_query_export.sql" and names[1].endswith(".sql"), names
    dump = backup["files"][names[1]].decode()
    assert "VIRTUAL" not in dump and "notes_data" not in dump and "CREATE TRIGGER articles_ai" in dump


def test_the_query_artifact_captures_virtual_tables_and_exact_integers_and_the_job_names_the_columns(backup):
    (art,) = [a for a in backup["manifest"]["artifacts"] if a["filename"] == "ferry_query_export.sql"]
    details = art["details"]
    assert details["role"] == "d1_query_export"
    assert {v["name"]: (v["content"], v["rows"]) for v in details["virtual_tables"]} == {
        "notes": ("rows", 3), "articles_fts": ("external", 0)}
    assert details["exact_integers"] == {"nums.v": 3, "ids.big": 2}
    assert backup["manifest"]["provider"]["paths"]["exact_integer_columns"] == ["ids.big", "nums.v"]
    text = backup["files"]["ferry_query_export.sql"].decode()
    assert "INSERT INTO \"articles_fts\"(\"articles_fts\") VALUES('rebuild');" in text
    assert f'UPDATE "nums" SET "v" = {MAX} WHERE rowid = 3;' in text, text
    assert f'UPDATE "ids" SET "big" = {MAX} WHERE rowid = 5;' in text, text
    assert art["md5"], "the import's etag is recorded like the dump's"
    assert any("nums.v" in w and "ids.big" in w for w in backup["job"]["warnings"]), backup["job"]["warnings"]
    # The emulator's export rounds these, as D1's does: the dump alone is wrong.
    (dump_name,) = [n for n in backup["files"] if n != "ferry_query_export.sql"]
    assert str(MAX) not in backup["files"][dump_name].decode()


def test_the_dump_then_the_query_artifact_rebuild_the_database_value_for_value_and_type_for_type(world, backup):
    restored = world["work"] / "restored.sqlite"
    (dump_name,) = [n for n in backup["files"] if n != "ferry_query_export.sql"]
    with closing(sqlite3.connect(restored)) as db:
        db.executescript(backup["files"][dump_name].decode())
        db.executescript(backup["files"]["ferry_query_export.sql"].decode())
        db.commit()
    assert snapshot(restored) == snapshot(world["hostile"])


def test_a_restore_through_ferry_imports_the_dump_then_the_query_artifact_into_an_empty_database(world, backup):
    ferry, emulator = world["ferry"], world["emulator"]
    folder = backup["manifest"]["artifacts"][0]["key"].rsplit("/", 1)[0]
    status, answer = ferry.restore(folder, {"target": {"database_id": "target-uuid"}, "confirm": "target-uuid"})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=120)
    assert job["phase"] == "restored", job
    imports = emulator.state()["imports"]
    md5 = {a["filename"]: a["md5"] for a in backup["manifest"]["artifacts"]}
    assert len(imports) == 1, "the dump and the query artifact are staged into one import"
    assert imports[0]["etag"] not in md5.values(), "the staged file, not either artifact as stored"
    assert snapshot(world["target"]) == snapshot(world["hostile"])


def test_an_export_already_running_is_said_in_the_job_and_not_retried_in_a_tight_loop(world):
    ferry, emulator = world["ferry"], world["emulator"]
    # Another client starts an export of the database and walks away (it is cancelled after 30 s).
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    body = json.dumps({"output_format": "polling"})
    conn.request("POST", f"/client/v4/accounts/{emulator.account}/d1/database/busy-uuid/export", body,
                 {"authorization": f"Bearer {D1_TOKEN}", "content-type": "application/json"})
    assert conn.getresponse().status == 202
    conn.close()
    status, _, payload = ferry.webhook("busy")
    assert status == 202, payload
    job_id = payload["job"]["id"]
    deadline = time.time() + 30
    job = ferry.job(job_id)
    while time.time() < deadline and not job.get("last_error"):
        time.sleep(0.3)
        job = ferry.job(job_id)
    assert job["phase"] == "exporting", job
    assert "running another export of this database" in job["last_error"], job
    time.sleep(3)
    calls = [r for r in emulator.state()["requests"] if "/busy-uuid/" in r["path"]]
    assert len(calls) == 2, f"one refused query, then a wait of minutes, not a loop: {calls}"


def test_an_export_status_d1_does_not_document_is_polled_on_until_it_completes(world):
    world["emulator"].control(active_status="queued", active_polls=3)
    job = world["ferry"].webhook_job("plain", timeout=60)
    assert job["phase"] == "committed", job
    assert job["provider"]["polls"] >= 3


def test_the_rounded_columns_are_named_in_the_sources_history_and_on_the_dashboard(world, backup):
    ferry = world["ferry"]
    (summary,) = [h for h in ferry.source("hostile")["history"] if h["id"] == backup["job"]["id"]]
    assert any("nums.v" in w and "ids.big" in w for w in summary.get("warnings", [])), summary
    from test_e2e_dashboard import CHROMIUM, CHROMIUM_ARGS, browser_tools

    sync_api = browser_tools()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(ferry.http.base + "/")
            page.fill("#token", API_TOKEN)
            page.click("#login button[type=submit]")
            warnings = page.locator('article.card[data-source="hostile"] .warnings')
            sync_api.expect(warnings).to_be_visible(timeout=10_000)
            sync_api.expect(warnings.locator(".warning-item").first).to_contain_text("nums.v")
            sync_api.expect(page.locator('article.card[data-source="plain"] .warnings')).to_be_hidden()
        finally:
            browser.close()


def drill(ferry) -> dict:
    status, answer = ferry.api_post("/v1/sources/hostile/drill", {})
    assert status == 202, answer
    return ferry.wait_job(answer["job"]["id"], timeout=180)


def scratch_databases(emulator) -> list:
    return [n for n in emulator.state()["databases"].values() if n.startswith("ferry-drill-") and n != LOST_SCRATCH]


def test_a_drill_of_the_hostile_backup_reads_back_virtual_rows_and_exact_integers_and_passes(world, backup):
    job = drill(world["ferry"])
    assert job["phase"] == "restored", job
    state = job["restore"]
    assert len(state["checked"]) == 3 and "read back value for value" in job["note"], job
    queries = [sql for db, sql in world["emulator"].state()["queries"] if db.startswith("ferry-drill-")]
    assert any('CAST("v" AS TEXT)' in q and 'FROM "nums"' in q for q in queries), queries
    assert any('quote("subject")' in q and 'FROM "notes"' in q for q in queries), queries
    assert scratch_databases(world["emulator"]) == []


def altered(ferry, manifest: dict, filename: str, change) -> tuple:
    """Changes one artifact in R2 and makes the manifest's hashes and size match the change, so
    only the drill's comparison can catch it. Returns what to put back."""
    import hashlib
    (art,) = [a for a in manifest["artifacts"] if a["filename"] == filename]
    original = ferry.r2_get(art["key"])
    data = change(original)
    assert data != original
    manifest_key = art["key"].rsplit("/", 1)[0] + "/manifest.json"
    manifest_bytes = ferry.r2_get(manifest_key)
    stored = json.loads(manifest_bytes)
    for a in stored["artifacts"]:
        if a["filename"] == filename:
            a.update(size=len(data), sha256=hashlib.sha256(data).hexdigest(), md5=hashlib.md5(data).hexdigest())
    ferry.r2_put(art["key"], data)
    ferry.r2_put(manifest_key, json.dumps(stored).encode())
    return [(art["key"], original), (manifest_key, manifest_bytes)]


@pytest.mark.parametrize("change, named", [
    (lambda sql: b"\n".join(l for l in sql.split(b"\n") if not l.startswith(b'INSERT INTO "notes"(rowid, "subject", "text") VALUES(10,')),
     'virtual table "notes": 2 rows restored, 3 in the backup'),
    (lambda sql: sql.replace(f'UPDATE "nums" SET "v" = {MAX} '.encode(), f'UPDATE "nums" SET "v" = {MAX - 1} '.encode()),
     'table "nums" column "v": 3 integers beyond 2^53 restored, 3 in the backup, with other values'),
], ids=["virtual-rows-dropped", "big-integer-changed"])
def test_a_drill_of_a_backup_altered_in_r2_fails_naming_the_table(world, backup, change, named):
    ferry = world["ferry"]
    restore_to = altered(ferry, backup["manifest"], "ferry_query_export.sql", change)
    try:
        job = drill(ferry)
        assert job["phase"] == "failed", job
        assert named in job["error"], job["error"]
        assert 'table "ids"' not in job["error"] and "articles" not in job["error"], job["error"]
    finally:
        for key, data in restore_to:
            ferry.r2_put(key, data)
    assert scratch_databases(world["emulator"]) == []


def test_a_drill_whose_scratch_create_answer_is_lost_adopts_the_database_and_leaves_none(world, backup):
    emulator = world["emulator"]
    emulator.control(faults=[{"step": "create", "fault": "truncate"}])
    try:
        job = drill(world["ferry"])
    finally:
        emulator.control(faults=[])
    assert job["phase"] == "restored", job
    name = f"ferry-drill-{job['id']}"
    state = emulator.state()
    assert state["faults_injected"] and state["created"].count(name) == 1, state["created"]
    assert name in state["deleted"] and scratch_databases(emulator) == []
    assert any("adopted it" in n for n in job["restore"]["notes"]), job["restore"]["notes"]


def test_a_database_of_only_virtual_tables_is_backed_up_restored_and_drilled_from_its_query_artifact(world):
    ferry = world["ferry"]
    job = ferry.webhook_job("virtual", timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("virtual") if m["job_id"] == job["id"]]
    assert [a["filename"] for a in manifest["artifacts"]] == ["ferry_query_export.sql"], "no dump: no export sent"
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0]
    status, answer = ferry.restore(folder, {"target": {"database_id": "vtarget-uuid"}, "confirm": "vtarget-uuid"})
    assert status == 202, answer
    restored = ferry.wait_job(answer["job"]["id"], timeout=120)
    assert restored["phase"] == "restored", restored
    with closing(sqlite3.connect(world["virtual_target"])) as db:
        assert db.execute("SELECT rowid, w FROM words ORDER BY rowid").fetchall() == [(1, "alpha"), (7, "beta gamma")]
        assert db.execute("SELECT rowid FROM words WHERE words MATCH 'gamma'").fetchall() == [(7,)]
    status, answer = ferry.api_post("/v1/sources/virtual/drill", {})
    assert status == 202, answer
    drilled = ferry.wait_job(answer["job"]["id"], timeout=120)
    assert drilled["phase"] == "restored" and len(drilled["restore"]["checked"]) == 1, drilled


def test_the_daily_sweep_deletes_the_scratch_database_of_a_lost_drill_and_nothing_else(world):
    """Runs last in the module: the sweep fires two days ahead, where the leftover is old."""
    from test_e2e_sweep import DAY_MS, fire

    emulator = world["emulator"]
    before = set(emulator.state()["databases"].values())
    assert LOST_SCRATCH in before
    report = fire(world["ferry"], (int(time.time() * 1000) // DAY_MS + 2) * DAY_MS + 30 * 60 * 1000)
    assert report["errors"] == [], report
    state = emulator.state()
    assert LOST_SCRATCH in state["deleted"], state["deleted"]
    assert set(state["databases"].values()) == before - {LOST_SCRATCH}
