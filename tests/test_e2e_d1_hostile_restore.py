"""End to end: a D1 database that D1's own dump cannot import back as it is, backed up by Ferry
and restored by Ferry's restore route into the D1 emulator (SQLite behind it, D1's
100,000-byte statement cap and statement-by-statement import with foreign keys on).

The source holds a row with a 1.5 MB TEXT (newlines and quotes, so D1's `replace(…,char(10))`
wrapper), a 1 MB BLOB in a `WITHOUT ROWID` table, a view created before its table, an `INSTEAD OF`
trigger on a view (D1's dump writes triggers before views) and a child table whose rows come
before its parent's. One Worker serves every test of the module.
"""

from __future__ import annotations

import random
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from harness import D1Emulator, Ferry, d1_source

LONG_TEXT = ("it's a 'quoted'\nline;\r\n" * 70_000)[:1_500_000]
BLOB = random.Random(7).randbytes(1_000_000)


def make_hostile_db(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            """
            CREATE VIEW early_view AS SELECT id, length(body) AS n FROM docs;
            CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id));
            CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT);
            CREATE TABLE bins (k TEXT PRIMARY KEY, data BLOB) WITHOUT ROWID;
            CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);
            CREATE TABLE mixed (v);
            CREATE TABLE log (what TEXT);
            CREATE VIEW names AS SELECT name FROM parent;
            CREATE TRIGGER names_insert INSTEAD OF INSERT ON names BEGIN
              INSERT INTO parent (name) VALUES (new.name); INSERT INTO log VALUES ('via view');
            END;
            CREATE INDEX parent_name ON parent(name);
            """
        )
        db.execute("INSERT INTO parent VALUES (1, 'one'), (2, 'two')")
        db.execute("INSERT INTO child VALUES (10, 1), (11, 2)")
        db.execute("INSERT INTO docs VALUES (1, ?), (2, 'short')", (LONG_TEXT,))
        db.execute("INSERT INTO bins VALUES ('big', ?), ('small', x'00ff')", (BLOB,))
        db.executemany("INSERT INTO mixed VALUES (?)", [(1,), (2.5,), ("3",), (None,), (b"\x00\x01",), (-(2**53),)])
        db.commit()
    return path


def contents(path: Path) -> dict:
    """Every user table's rows with each value's SQLite type, and the schema's objects."""
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        out = {}
        for t in tables:
            cols = [c[1] for c in db.execute(f'PRAGMA table_info("{t}")')]
            typed = ", ".join(f'"{c}", typeof("{c}")' for c in cols)
            out[t] = db.execute(f'SELECT {typed} FROM "{t}" ORDER BY 1').fetchall()
        out["schema"] = db.execute(
            "SELECT type, name, tbl_name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("d1-hostile")
    src = make_hostile_db(work / "src.sqlite")
    dst = work / "dst.sqlite"
    sqlite3.connect(dst).close()
    emulator = D1Emulator(work, {"src-uuid": src, "dst-uuid": dst}, active_polls=1, cancel_after=30)
    ferry = Ferry(work / "ferry", [d1_source("hostile", emulator, "src-uuid", part_size_mib=5)])
    job = ferry.webhook_job("hostile", timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("hostile") if m["job_id"] == job["id"]]
    yield {"ferry": ferry, "emulator": emulator, "src": src, "dst": dst, "original": contents(src),
           "manifest": manifest, "folder": manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"}
    ferry.stop()
    emulator.stop()


def restore(world, body: dict, expect: str) -> dict:
    status, answer = world["ferry"].restore(world["folder"], body)
    assert status == 202, answer
    job = world["ferry"].wait_job(answer["job"]["id"], timeout=180)
    assert job["phase"] == expect, job
    return job


def test_the_dump_as_d1_wrote_it_is_refused_by_d1s_import(world):
    """The emulator is as strict as D1: the raw dump fails, which is why Ferry rewrites it."""
    ferry, emulator = world["ferry"], world["emulator"]
    _, dump = ferry.artifact(world["manifest"]["artifacts"][0]["key"])
    lines = dump.decode().split("\n")
    assert max(len(line.encode()) for line in lines) > 1_000_000, "a statement over D1's cap"
    assert [l.split(" ")[1] for l in lines if l.startswith("CREATE TRIGGER") or l.startswith("CREATE VIEW")] \
        == ["TRIGGER", "VIEW", "VIEW"], "the dump writes the trigger before the view it is on"
    with closing(sqlite3.connect(world["dst"])) as db:
        assert db.execute("SELECT count(*) FROM sqlite_schema").fetchone() == (0,)
    import emulators.d1_restore as d1r  # the emulator's own import, run in-process on a scratch file
    scratch = world["dst"].with_name("raw.sqlite")
    sqlite3.connect(scratch).close()
    error, _ = d1r.RestoreMixin._execute(None, type("Db", (), {"path": str(scratch)})(), dump)
    assert error and "statement too long" in error, error
    short = [l for l in lines if len(l.encode()) < 100_000]
    error, _ = d1r.RestoreMixin._execute(None, type("Db", (), {"path": str(scratch)})(), "\n".join(short).encode())
    assert error and "no such table: main.parent" in error, "a child's row before its parent table: " + error
    no_child = "\n".join(l for l in short if not l.startswith('INSERT INTO "child"')).encode()
    error, _ = d1r.RestoreMixin._execute(None, type("Db", (), {"path": str(scratch)})(), no_child)
    assert error and "no such table: main.names" in error, "the trigger before its view: " + error


def test_a_restore_into_an_empty_database_is_equal_value_for_value_and_type_for_type(world):
    job = restore(world, {"target": {"database_id": "dst-uuid"}, "confirm": "dst-uuid"}, "restored")
    assert any("imported in pieces" in n for n in job["restore"]["notes"]), job["restore"]
    assert contents(world["dst"]) == world["original"]
    with closing(sqlite3.connect(world["dst"])) as db:
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("INSERT INTO names VALUES ('three')")  # the trigger on the view works
        assert db.execute("SELECT what FROM log").fetchall() == [("via view",)]
        db.rollback()
    (imported,) = world["emulator"].state()["imports"]
    assert imported["status"] == "complete" and imported["etag"] != world["manifest"]["artifacts"][0]["md5"], \
        "D1 imported the rewritten dump, whose MD5 is not the backup's"
    staging = [n for n in job["restore"]["notes"] if "staged in" in n]
    assert staging, job["restore"]
    staged = staging[0].split("staged in ")[1].split(" ")[0] + "00000.sql"
    assert world["ferry"].r2_get(staged) is None, "the staged chunks are deleted"


def test_a_non_empty_target_is_refused_and_replace_true_replaces_the_backups_objects(world):
    with closing(sqlite3.connect(world["dst"])) as db:
        db.execute("INSERT INTO docs VALUES (3, 'added after the restore')")
        db.execute("CREATE TABLE keep_me (x)")
        db.commit()
    before = contents(world["dst"])
    job = restore(world, {"target": {"database_id": "dst-uuid"}, "confirm": "dst-uuid"}, "failed")
    assert "database dst-uuid is not empty" in job["error"] and '"replace": true' in job["error"], job["error"]
    assert contents(world["dst"]) == before, "nothing was imported"
    restore(world, {"target": {"database_id": "dst-uuid"}, "confirm": "dst-uuid", "replace": True}, "restored")
    after = contents(world["dst"])
    assert after.pop("keep_me") == [], "objects that are not the backup's stay"
    after["schema"] = [o for o in after["schema"] if o[1] != "keep_me"]
    assert after == world["original"]


def test_a_time_travel_fallback_must_name_the_database_it_writes(world):
    status, answer = world["ferry"].restore(
        world["folder"], {"mode": "time_travel", "confirm": "src-uuid", "target": {"database_id": "dst-uuid"}})
    assert status == 400 and '["src-uuid", "dst-uuid"]' in answer["error"], answer


def drill(world) -> dict:
    status, answer = world["ferry"].api_post("/v1/sources/hostile/drill", {})
    assert status == 202, answer
    return world["ferry"].wait_job(answer["job"]["id"], timeout=180)


def test_a_drill_passes_and_fails_naming_the_table_when_the_backup_is_altered(world):
    job = drill(world)
    assert job["phase"] == "restored", job
    ferry = world["ferry"]
    key = world["manifest"]["artifacts"][0]["key"]
    _, dump = ferry.artifact(key)
    altered = b"\n".join(l for l in dump.split(b"\n") if not l.startswith(b'INSERT INTO "child"'))
    ferry.r2_put(key, altered)
    try:
        job = drill(world)
        assert job["phase"] == "failed", job
        assert 'table "child": 0 rows restored, 2 in the backup' in job["error"], job["error"]
        assert 'table "docs"' not in job["error"]
    finally:
        ferry.r2_put(key, dump)
