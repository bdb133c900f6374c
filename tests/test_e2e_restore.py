"""End to end: D1 restores and restore drills by the built Worker under `wrangler dev`, against
the D1 emulator with SQLite behind its import, query and Time Travel endpoints.

The backed-up database's dump spans several multipart parts (part_size_mib = 5), so the MD5 and
the row counts Ferry records while copying cross part and slice boundaries, and the restore
streams a multi-part object out of R2 in one PUT.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from harness import D1Emulator, Ferry, d1_source
from test_e2e_d1 import expected_dump, make_big_db, rows_of

PART_MIB = 5
USERS = [(i, f"user;{i}\n'quoted'") for i in range(1, 41)]


def make_source_db(path: Path) -> Path:
    make_big_db(path, mib=PART_MIB + 2)
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany("INSERT INTO users VALUES (?, ?)", USERS)
        db.commit()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("restore-e2e")
    src = make_source_db(work / "src.sqlite")
    dst = work / "dst.sqlite"
    sqlite3.connect(dst).close()
    emulator = D1Emulator(work, {"src-uuid": src, "dst-uuid": dst}, active_polls=1, cancel_after=30)
    ferry = Ferry(work / "ferry", [d1_source("big", emulator, "src-uuid", part_size_mib=PART_MIB, drill_schedule="0 4 * * *")])
    original = rows_of_path(src)
    dump = expected_dump(src)
    job = ferry.webhook_job("big", timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("big") if m["job_id"] == job["id"]]
    yield {"ferry": ferry, "emulator": emulator, "src": src, "dst": dst, "original": original, "dump": dump,
           "manifest": manifest, "folder": manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"}
    ferry.stop()
    emulator.stop()


def rows_of_path(path: Path) -> dict:
    with closing(sqlite3.connect(path)) as db:
        return rows_of(db)


def restore(world, body: dict):
    return world["ferry"].restore(world["folder"], body)


def test_the_manifest_records_the_dumps_md5_and_rows_per_table_counted_while_copying(world):
    (art,) = world["manifest"]["artifacts"]
    assert art["parts"] > 1, "the dump must span more than one part"
    assert art["md5"] == hashlib.md5(world["dump"]).hexdigest()
    assert art["row_counts"] == {"blobs": len(world["original"]["blobs"]), "users": len(USERS)}


def test_a_restore_without_the_matching_confirm_is_refused_and_touches_nothing(world):
    for body in ({"target": {"database_id": "dst-uuid"}},
                 {"target": {"database_id": "dst-uuid"}, "confirm": "src-uuid"},
                 {"mode": "time_travel", "confirm": "dst-uuid"}):
        status, answer = restore(world, body)
        assert status == 400, answer
        assert "confirm" in answer["error"]
    status, _ = world["ferry"].restore(world["folder"], {}, token="wrong")
    assert status == 401
    state = world["emulator"].state()
    assert state["imports"] == [] and not any("/time_travel/" in r["path"] for r in state["requests"])
    assert rows_of_path(world["dst"]) == {}
    assert world["ferry"].source("big")["last_job"]["task"] == "export", "no job was started"


def test_a_folder_without_a_manifest_is_refused_and_touches_nothing(world):
    ferry = world["ferry"]
    before = ferry.source("big")["last_job"]["id"]
    uncommitted = world["folder"].rstrip("/") + "x"
    ferry.r2_put(f"{uncommitted}/db.sql", b"PRAGMA defer_foreign_keys=TRUE;\n")  # files, but no manifest
    status, answer = ferry.restore(uncommitted, {"target": {"database_id": "dst-uuid"}, "confirm": "dst-uuid"})
    assert status == 404, answer
    assert "is not a committed backup" in answer["error"] and "manifest.json" in answer["error"]
    assert ferry.source("big")["last_job"]["id"] == before, "no job was started"
    assert world["emulator"].state()["imports"] == []


def test_an_import_into_an_unknown_database_fails_clearly_and_imports_nothing(world):
    ferry = world["ferry"]
    status, answer = restore(world, {"target": {"database_id": "no-such-uuid"}, "confirm": "no-such-uuid"})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "failed", job
    assert "target database no-such-uuid does not exist" in job["error"], job["error"]
    state = world["emulator"].state()
    assert state["imports"] == []
    assert not any(r["path"].endswith("/import") for r in state["requests"]), "nothing was sent to an import"


def test_a_backup_larger_than_one_part_imports_into_a_named_database_row_for_row(world):
    ferry = world["ferry"]
    status, answer = restore(world, {"target": {"database_id": "dst-uuid"}, "confirm": "dst-uuid"})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=120)
    assert job["phase"] == "restored", job
    assert job["task"] == "restore" and "into database dst-uuid" in job["note"]
    assert "secret_upload_url" not in json.dumps(job)
    assert rows_of_path(world["dst"]) == world["original"]
    (imported,) = world["emulator"].state()["imports"]
    assert imported["status"] == "complete", imported  # the staged (rewritten) dump, under its own MD5


def test_time_travel_restores_the_source_to_the_backups_bookmark(world):
    with closing(sqlite3.connect(world["src"])) as db:
        db.execute("DELETE FROM users WHERE id > 10")
        db.execute("UPDATE blobs SET data = 'changed' WHERE id < 5")
        db.commit()
    assert rows_of_path(world["src"]) != world["original"]
    status, answer = restore(world, {"mode": "time_travel", "confirm": "src-uuid"})
    assert status == 202, answer
    job = world["ferry"].wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "restored", job
    assert world["manifest"]["provider"]["at_bookmark"] in job["note"]
    assert rows_of_path(world["src"]) == world["original"]


def test_time_travel_past_the_window_fails_saying_to_import_instead(world):
    world["emulator"].control(expired_bookmarks=[world["manifest"]["provider"]["at_bookmark"]])
    status, answer = restore(world, {"mode": "time_travel", "confirm": "src-uuid"})
    assert status == 202, answer
    job = world["ferry"].wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "failed"
    assert "outside the Time Travel window" in job["error"] and "importing its dump" in job["error"]


def drill(world) -> dict:
    status, answer = world["ferry"].api_post("/v1/sources/big/drill", {})
    assert status == 202, answer
    return world["ferry"].wait_job(answer["job"]["id"], timeout=120)


def drill_record(world) -> dict:
    """The drill's outcome, as listed with the backup (it is stored next to it as drill.json)."""
    (backup,) = [b for b in world["ferry"].backups("big") if b["job_id"] == world["manifest"]["job_id"]]
    return backup["drill"]


def test_a_drill_passes_on_a_good_backup_and_deletes_its_scratch_database(world):
    job = drill(world)
    assert job["phase"] == "restored", job
    scratch = f"ferry-drill-{job['id']}"
    state = world["emulator"].state()
    assert scratch in state["created"] and scratch in state["deleted"]
    assert scratch not in state["databases"].values()
    record = drill_record(world)
    assert record["passed"] is True and record["job_id"] == job["id"]
    assert record["tables"]["users"] == {"backup": len(USERS), "restored": len(USERS)}


def test_the_drill_schedule_starts_a_drill_at_its_fire_time(world):
    ferry = world["ferry"]
    ferry.scheduled("*/5 * * * *", at_ms=1893470400000)  # 2030-01-01T04:00:00Z: the drill is due, no export
    deadline = time.time() + 30
    last = ferry.source("big")["last_job"]
    while time.time() < deadline and not (last["task"] == "drill" and last["trigger"] == "cron"):
        time.sleep(0.2)
        last = ferry.source("big")["last_job"]
    job = ferry.wait_job(last["id"], timeout=120)
    assert (job["task"], job["trigger"], job["phase"]) == ("drill", "cron", "restored"), job
    assert job["scheduled_for"] == "2030-01-01T04:00:00.000Z"
    assert drill_record(world)["job_id"] == job["id"]
    status, _, metrics = ferry.api("/metrics")
    assert status == 200 and 'ferry_last_drill_success{source="big"} 1' in metrics.decode(), metrics


def test_a_drill_fails_naming_the_table_when_the_dump_in_r2_lost_its_rows(world):
    ferry = world["ferry"]
    key = world["manifest"]["artifacts"][0]["key"]
    _, dump = ferry.artifact(key)
    altered = b"\n".join(line for line in dump.split(b"\n") if not line.startswith(b'INSERT INTO "users"'))
    assert len(altered) < len(dump)
    ferry.r2_put(key, altered)
    job = drill(world)
    assert job["phase"] == "failed", job
    assert 'table "users": 0 rows restored, 40 in the backup' in job["error"], job["error"]
    assert "blobs" not in job["error"].split("not the one copied")[0]
    state = world["emulator"].state()
    assert f"ferry-drill-{job['id']}" in state["deleted"], "the scratch database is deleted on failure too"
    record = drill_record(world)
    assert record["passed"] is False and record["tables"]["users"] == {"backup": 40, "restored": 0}
