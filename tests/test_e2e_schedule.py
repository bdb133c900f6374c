"""End to end: cron fire times are never lost, under `wrangler dev` against the D1 emulator.

Each source remembers the last tick it processed. A fire time that finds the source busy waits
and runs, coalesced with any others, as one catch-up job when the source is free; ticks that
never ran (Cloudflare skipped or delayed them) are caught up by the next tick, as one job. Each
catch-up job says so.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from harness import D1Emulator, Ferry, d1_source

TRIGGER = "*/5 * * * *"
HOUR_MS = 3600 * 1000
T0 = 1893456000000  # 2030-01-01T00:00:00Z


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    work = tmp_path_factory.mktemp("schedule-e2e")
    db = sqlite3.connect(work / "db.sqlite")
    db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t (v) VALUES ('a'), ('b');")
    db.commit()
    db.close()
    emu = D1Emulator(work, {"busy-uuid": work / "db.sqlite", "idle-uuid": work / "db.sqlite"}, active_polls=2)
    yield emu
    emu.stop()


@pytest.fixture(autouse=True)
def clean(emulator):
    emulator.reset()


def tasks_of(emulator, database_id: str) -> list:
    return [t for t in emulator.state()["tasks"] if t["database_id"] == database_id]


def wait_for_new_job(ferry: Ferry, source: str, not_id: str | None, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = ferry.source(source)["last_job"]
        if last and last["id"] != not_id:
            return last
        time.sleep(0.2)
    raise AssertionError(f"no new job of {source} within {timeout} s: {ferry.source(source)}")


def test_fire_times_that_find_the_source_busy_run_as_one_catch_up_job_when_it_is_free(emulator, tmp_path):
    ferry = Ferry(tmp_path / "ferry", [d1_source("hourly", emulator, "busy-uuid", "0 * * * *")])
    try:
        emulator.control(active_polls=100000)  # the export stays active until released
        status, _, payload = ferry.webhook("hourly")
        assert status == 202, payload
        first = payload["job"]["id"]
        ferry.wait_job(first, phases=("exporting",))
        for hour in (1, 2, 3):  # three fire times come due while the job runs
            ferry.scheduled(TRIGGER, at_ms=T0 + hour * HOUR_MS)
        time.sleep(1)
        assert ferry.source("hourly")["current_job_id"] == first
        assert len(tasks_of(emulator, "busy-uuid")) == 1, "no second export while busy"
        emulator.control(active_polls=1)
        assert ferry.wait_job(first)["phase"] == "committed"
        catch_up = ferry.wait_job(wait_for_new_job(ferry, "hourly", first)["id"])
        assert catch_up["phase"] == "committed", catch_up
        assert catch_up["trigger"] == "cron" and catch_up["scheduled_for"] == "2030-01-01T03:00:00.000Z"
        note = catch_up["catch_up"]
        assert "3 fire times" in note and "busy" in note, note
        assert len(tasks_of(emulator, "busy-uuid")) == 2, "one export for the three missed fire times"
        # Served: the next tick in the same hour starts nothing more.
        ferry.scheduled(TRIGGER, at_ms=T0 + 3 * HOUR_MS + 5 * 60 * 1000)
        time.sleep(1)
        assert ferry.source("hourly")["last_job"]["id"] == catch_up["id"]
    finally:
        ferry.stop()


def test_ticks_that_never_ran_are_caught_up_by_the_next_tick_as_one_job_that_says_so(emulator, tmp_path):
    ferry = Ferry(tmp_path / "ferry", [d1_source("hourly", emulator, "idle-uuid", "0 * * * *")])
    try:
        ferry.scheduled(TRIGGER, at_ms=T0 + 55 * 60 * 1000)  # 00:55: nothing due
        time.sleep(1)
        assert ferry.source("hourly")["last_job"] is None
        # No tick ran between 00:55 and 04:05; the 04:05 tick's own window (04:00, 04:05] has no
        # fire time, yet 01:00, 02:00, 03:00 and 04:00 were due.
        ferry.scheduled(TRIGGER, at_ms=T0 + 4 * HOUR_MS + 5 * 60 * 1000)
        job = ferry.wait_job(wait_for_new_job(ferry, "hourly", None)["id"])
        assert job["phase"] == "committed", job
        assert job["scheduled_for"] == "2030-01-01T04:00:00.000Z"
        assert "4 fire times" in job["catch_up"] and "missed or late tick" in job["catch_up"], job["catch_up"]
        assert len(tasks_of(emulator, "idle-uuid")) == 1
    finally:
        ferry.stop()
