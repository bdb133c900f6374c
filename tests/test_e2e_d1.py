"""End to end: D1 backups by the built Worker under `wrangler dev`, against the D1 emulator.

Every test drives the real Worker (workerd, local R2 and Durable Objects) over HTTP and checks
what landed in R2 through Ferry's own API.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from emulators.d1_dump import dump_sql
from harness import API_TOKEN, D1_TOKEN, D1Emulator, Ferry, d1_source

BIG_PART_MIB = 5


def make_app_db(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, score REAL, avatar BLOB);
        CREATE TABLE "order items" (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id), note TEXT);
        CREATE INDEX idx_items_user ON "order items"(user_id);
        CREATE VIEW top_users AS SELECT name FROM users WHERE score > 50;
    """)
    rows = [("alice", 99.5, b"\x00\x01\xff"), ("bob", None, None), ("O'Brien", 12.0, b""),
            ("line\r\nbreak", 1e300, b"\xde\xad\xbe\xef"), ("ünïcødé ✓", -0.25, None)]
    db.executemany("INSERT INTO users (name, score, avatar) VALUES (?, ?, ?)", rows)
    db.executemany('INSERT INTO "order items" (user_id, note) VALUES (?, ?)',
                   [(1, "first"), (2, "it's\nmultiline"), (3, None), (1, "x" * 1000)])
    db.commit()
    db.close()
    return path


def make_big_db(path: Path, mib: int) -> Path:
    """A database whose dump is several times the multipart part size."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data TEXT)")
    row = 10 * 1024
    count = mib * 1024 * 1024 // row + 7
    db.executemany("INSERT INTO blobs (data) VALUES (?)", ((os.urandom(row // 2).hex(),) for _ in range(count)))
    db.commit()
    db.close()
    return path


def rows_of(db: sqlite3.Connection) -> dict:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {t: db.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("d1-e2e")
    app = make_app_db(work / "app.sqlite")
    big = make_big_db(work / "big.sqlite", mib=3 * BIG_PART_MIB + 2)
    small = make_app_db(work / "small.sqlite")
    dbs = {name: (big if name == "big-uuid" else app if name == "app-uuid" else small)
           for name in ["app-uuid", "big-uuid", "every-five-uuid", "daily-uuid", "half-hour-uuid", "yearly-uuid",
                        "locked-uuid", "busy-uuid", "failing-uuid", "flaky-uuid"]}
    emulator = D1Emulator(work, dbs, active_polls=2, cancel_after=30)
    sources = [
        d1_source("every-five", emulator, "every-five-uuid", "*/5 * * * *"),
        d1_source("daily", emulator, "daily-uuid", "0 3 * * *"),
        d1_source("half-hour", emulator, "half-hour-uuid", "30 * * * *"),
        d1_source("yearly", emulator, "yearly-uuid", "0 0 1 1 *"),
        d1_source("app-db", emulator, "app-uuid"),
        d1_source("big", emulator, "big-uuid", part_size_mib=BIG_PART_MIB),
        d1_source("locked-out", emulator, "locked-uuid", token_secret="WRONG_D1_TOKEN"),
        d1_source("busy", emulator, "busy-uuid", "17 4 * * *"),  # due only in BUSY_TICK's window
        d1_source("failing", emulator, "failing-uuid"),
        d1_source("flaky", emulator, "flaky-uuid"),
    ]
    ferry = Ferry(work / "ferry", sources, secrets={"WRONG_D1_TOKEN": "not-the-token"})
    yield {"ferry": ferry, "emulator": emulator, "work": work, "app": app, "big": big, "small": small, "sources": sources}
    ferry.stop()
    emulator.stop()


@pytest.fixture(autouse=True)
def clean_switches(world):
    world["emulator"].reset()
    yield


def expected_dump(path: Path) -> bytes:
    db = sqlite3.connect(path)
    try:
        return dump_sql(db).encode()
    finally:
        db.close()


def check_backup(ferry: Ferry, job: dict, expected: bytes) -> dict:
    """The job's manifest is listed, and its one artifact reads back byte for byte."""
    assert job["phase"] == "committed", job
    manifests = [m for m in ferry.backups(job["source"]) if m["job_id"] == job["id"]]
    assert len(manifests) == 1, manifests
    manifest = manifests[0]
    assert manifest["source"] == job["source"] and manifest["kind"] == "d1"
    (art,) = manifest["artifacts"]
    headers, body = ferry.artifact(art["key"])
    assert body == expected, "artifact differs from the emulator's dump"
    digest = hashlib.sha256(body).hexdigest()
    assert art["sha256"] == digest
    assert headers["x-ferry-sha256"] == digest, "the recorded sha256 is served with the file"
    assert art["size"] == len(expected)
    assert art["key"].startswith(f"{job['source']}/") and art["key"].endswith("/" + art["filename"])
    assert headers["content-type"] == "application/sql"
    return manifest


def test_cron_run_backs_up_exactly_the_due_sources(world):
    ferry, emulator = world["ferry"], world["emulator"]
    # A tick of the Worker's */5 trigger at 03:00 UTC: "*/5 * * * *" and "0 3 * * *" are due,
    # "30 * * * *" and "0 0 1 1 *" are not (nor the webhook-only sources).
    tick = 1893466800000  # 2030-01-01T03:00:00Z
    ferry.scheduled("*/5 * * * *", at_ms=tick)
    due = {"every-five", "daily"}
    jobs = {}
    deadline = time.time() + 30
    while time.time() < deadline and len(jobs) < len(due):
        for s in ferry.api_json("/v1/sources")["sources"]:
            if s["name"] in due and s["last_job"]:
                jobs[s["name"]] = s["last_job"]["id"]
        time.sleep(0.2)
    assert set(jobs) == due
    for name, job_id in jobs.items():
        job = ferry.wait_job(job_id)
        assert job["trigger"] == "cron"
        assert job["scheduled_for"] == "2030-01-01T03:00:00.000Z"
        check_backup(ferry, job, expected_dump(world["small"]))
    for s in ferry.api_json("/v1/sources")["sources"]:
        if s["name"] in {"half-hour", "yearly"}:
            assert s["last_job"] is None, s
    # Only the due sources' databases were exported.
    exported = {t["database_id"] for t in emulator.state()["tasks"]}
    assert exported == {"every-five-uuid", "daily-uuid"}
    # The same tick again (cron is at-least-once) starts nothing new.
    ferry.scheduled("*/5 * * * *", at_ms=tick)
    time.sleep(1)
    for name, job_id in jobs.items():
        assert ferry.source(name)["last_job"]["id"] == job_id
    # The plain wrangler endpoint reaches the same handler.
    ferry.scheduled("*/5 * * * *")


def test_signed_webhook_backs_up_one_source_byte_identical_and_restorable(world, tmp_path):
    ferry = world["ferry"]
    status, headers, payload = ferry.webhook("app-db")
    assert status == 202, payload
    job = payload["job"]
    assert job["phase"] == "queued" and job["trigger"] == "webhook" and job["source"] == "app-db"
    job = ferry.wait_job(job["id"])
    expected = expected_dump(world["app"])
    manifest = check_backup(ferry, job, expected)
    assert manifest["trigger"] == "webhook"
    assert manifest["provider"]["database_id"] == "app-uuid"
    assert manifest["provider"]["at_bookmark"] == job["provider"]["at_bookmark"]
    assert manifest["started_at"] <= manifest["finished_at"]
    assert job["provider"]["messages"][0].startswith("Generating")
    assert job["attempts"] >= 4 and job["provider"]["polls"] >= 3, "202 active at least once, then 200"
    # Restore the stored dump into a fresh SQLite database: the same rows come back.
    _, body = ferry.artifact(manifest["artifacts"][0]["key"])
    restored = sqlite3.connect(tmp_path / "restored.sqlite")
    restored.executescript(body.decode())
    original = sqlite3.connect(world["app"])
    assert rows_of(restored) == rows_of(original)
    assert restored.execute("SELECT name FROM sqlite_schema WHERE name='idx_items_user'").fetchone()
    # Nothing secret in what the API shows.
    for path in ["/v1/sources", f"/v1/jobs/{job['id']}", "/v1/sources/app-db/backups"]:
        text = ferry.api(path)[2].decode()
        for secret in (API_TOKEN, D1_TOKEN, "__signed"):
            assert secret not in text, (path, secret)


def test_dump_several_times_the_part_size_goes_through_multipart_intact(world):
    ferry = world["ferry"]
    status, _, payload = ferry.webhook("big")
    assert status == 202, payload
    job = ferry.wait_job(payload["job"]["id"], timeout=120)
    expected = expected_dump(world["big"])
    part = BIG_PART_MIB * 1024 * 1024
    assert len(expected) > 3 * part
    manifest = check_backup(ferry, job, expected)
    art = manifest["artifacts"][0]
    assert art["parts"] == -(-len(expected) // part), art


def test_bad_stale_and_replayed_signatures_change_nothing(world):
    ferry, emulator = world["ferry"], world["emulator"]
    before = ferry.source("yearly")["last_job"]
    now = int(time.time())
    good = ferry.webhook  # for brevity
    cases = {
        "wrong signature": dict(signature="v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="),
        "empty signature": dict(signature="v1,"),
        "truncated signature": dict(signature="v1,g0hM9SsE+OTPJTGt"),
        "stale timestamp": dict(timestamp=now - 301),
        "future timestamp": dict(timestamp=now + 301),
        "missing headers": dict(headers={"content-type": "application/json"}),
    }
    for label, kwargs in cases.items():
        status, _, payload = good("yearly", **kwargs)
        assert status == 401, (label, payload)
        assert "error" in payload
    # A signature over a different body does not verify either.
    msg_id, ts = "msg_tampered", now
    from harness import sign
    status, _, _ = ferry.webhook("yearly", body=b'{"x":2}', msg_id=msg_id, timestamp=ts, signature=sign(b'{"x":1}', msg_id, ts))
    assert status == 401
    assert ferry.source("yearly")["last_job"] == before
    assert emulator.state()["export_calls"] == 0, "no provider call for refused webhooks"

    # A replayed delivery returns the first job and starts nothing new.
    status, _, first = ferry.webhook("yearly", msg_id="msg_replay_1")
    assert status == 202
    job = ferry.wait_job(first["job"]["id"])
    calls = emulator.state()["export_calls"]
    status, headers, again = ferry.webhook("yearly", msg_id="msg_replay_1")
    assert status == 202 and headers.get("idempotent-replayed") == "true"
    assert again["job"]["id"] == job["id"]
    time.sleep(1)
    assert emulator.state()["export_calls"] == calls
    assert len([b for b in ferry.backups("yearly") if b["job_id"] == job["id"]]) == 1


def test_unknown_source_is_404_after_the_signature_check(world):
    ferry = world["ferry"]
    assert ferry.webhook("no-such-source")[0] == 404
    assert ferry.webhook("no-such-source", signature="v1,")[0] == 401


# 2030-01-02T04:17:00Z: a tick of a one-minute trigger covers (04:16, 04:17], where only "busy"
# ("17 4 * * *") is due; "*/5 * * * *" fires at 04:15 and 04:20, the other schedules elsewhere.
BUSY_TICK = 1893557820000


def test_second_trigger_during_a_running_job_gets_409(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(active_polls=100000)  # the export stays active
    status, _, first = ferry.webhook("busy")
    assert status == 202
    job_id = first["job"]["id"]
    ferry.wait_job(job_id, phases=("exporting",))
    status, _, second = ferry.webhook("busy")
    assert status == 409, second
    assert second["job_id"] == job_id
    # A cron tick that finds the source busy starts nothing now: the scheduled handler logs that
    # the fire time waits, no second export reaches D1, and once the job ends one catch-up runs.
    assert ferry.source("busy")["current_job_id"] == job_id
    exports = lambda: [t for t in emulator.state()["tasks"] if t["database_id"] == "busy-uuid"]  # noqa: E731
    deadline = time.time() + 10
    while not exports() and time.time() < deadline:  # the schema is read before the export starts
        time.sleep(0.1)
    assert len(exports()) == 1
    ferry.scheduled("* * * * *", at_ms=BUSY_TICK)
    line = (f"cron * * * * *: busy: due at 2030-01-02T04:17:00.000Z: job {job_id} is still in flight; "
            "it runs as a catch-up when that job ends")

    def worker_log() -> str:  # the Worker's console output
        return "".join(p.read_text(errors="replace") for p in (ferry.workdir / "wrangler-logs").glob("*.log"))

    deadline = time.time() + 10
    while line not in worker_log() and time.time() < deadline:
        time.sleep(0.2)
    assert line in worker_log(), "the scheduled run recorded that the busy source's fire time waits"
    time.sleep(1)
    assert len(exports()) == 1, "the tick started no second export"
    source = ferry.source("busy")
    assert source["current_job_id"] == job_id and source["last_job"]["id"] == job_id
    assert source["last_job"]["trigger"] == "webhook"
    emulator.control(active_polls=1)  # let it finish
    job = ferry.wait_job(job_id)
    assert job["phase"] == "committed"
    deadline = time.time() + 30
    while ferry.source("busy")["last_job"]["id"] == job_id and time.time() < deadline:
        time.sleep(0.2)
    catch_up = ferry.wait_job(ferry.source("busy")["last_job"]["id"])
    assert catch_up["phase"] == "committed" and catch_up["trigger"] == "cron", catch_up
    assert catch_up["scheduled_for"] == "2030-01-02T04:17:00.000Z" and "busy" in catch_up["catch_up"], catch_up
    assert len(exports()) == 2, "one catch-up export for the fire time that waited"
    assert ferry.source("busy")["current_job_id"] is None
    assert ferry.webhook("busy")[0] == 202, "the source is free again"


def test_export_error_leaves_a_failed_job_with_d1_message_and_no_manifest(world):
    ferry, emulator = world["ferry"], world["emulator"]
    message = "D1 Export error: cannot export databases with Virtual Tables (fts5)"
    emulator.control(export_error=message)
    status, _, payload = ferry.webhook("failing")
    assert status == 202
    job = ferry.wait_job(payload["job"]["id"])
    assert job["phase"] == "failed"
    assert message in job["error"], job["error"]
    assert job["artifacts"] == []
    assert ferry.backups("failing") == []


def test_provider_permanent_error_fails_the_job_with_its_message(world):
    ferry = world["ferry"]
    job = ferry.webhook_job("locked-out")
    assert job["phase"] == "failed"
    assert "Authentication error" in job["error"] and "403" in job["error"], job["error"]
    assert ferry.backups("locked-out") == []


def test_transient_failures_are_retried_with_backoff(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(fail_next=[{"status": 503}, {"status": 429, "retry_after": "1"}, {"status": 502, "body": "<html>bad gateway</html>"}])
    status, _, payload = ferry.webhook("flaky")
    job = ferry.wait_job(payload["job"]["id"])
    assert job["phase"] == "committed", job
    statuses = [r["status"] for r in emulator.state()["requests"] if "/export" in r["path"]]
    assert statuses[:3] == [503, 429, 502], statuses
    check_backup(ferry, job, expected_dump(world["small"]))


def test_download_failure_fails_the_job_without_a_half_written_backup(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(download_fail_status=403)
    job = ferry.webhook_job("failing")
    assert job["phase"] == "failed"
    assert "refused (HTTP 403)" in job["error"], job["error"]
    assert ferry.backups("failing") == []


def test_api_needs_the_bearer_token(world):
    ferry = world["ferry"]
    for path in ["/v1/sources", "/v1/jobs/0123456789abcdef", "/v1/sources/app-db/backups", "/v1/backups/app-db/x/y"]:
        assert ferry.api(path, token=None)[0] == 401
        assert ferry.api(path, token="wrong")[0] == 401
    assert ferry.api("/v1/jobs/0123456789abcdef")[0] == 404
    assert ferry.api("/v1/sources/nope/backups")[0] == 404
    assert ferry.api("/v1/backups/app-db/not-a-backup/file.sql")[0] == 404


def test_killed_worker_finishes_the_job_after_restart(world, tmp_path):
    emulator = world["emulator"]
    sources = [d1_source("restartable", emulator, "big-uuid", part_size_mib=BIG_PART_MIB)]
    ferry = Ferry(tmp_path / "ferry", sources)
    try:
        emulator.control(download_delay_ms=40)  # about 12 s for the whole dump
        status, _, payload = ferry.webhook("restartable")
        job_id = payload["job"]["id"]
        ferry.wait_job(job_id, phases=("transferring",), timeout=60)
        deadline = time.time() + 30
        while emulator.state()["downloads"] < 1 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # well into the download, a part or so uploaded
        ferry.stop(kill=True)
        emulator.control(download_delay_ms=0)
        ferry.start()
        job = ferry.wait_job(job_id, timeout=90)
        assert job["phase"] == "committed", job
        assert emulator.state()["downloads"] >= 2, "the copy was restarted after the kill"
        check_backup(ferry, job, expected_dump(world["big"]))
    finally:
        ferry.stop()


def test_malformed_config_names_the_field_and_runs_nothing(world, tmp_path):
    emulator = world["emulator"]
    bad = [d1_source("good", emulator, "app-uuid"), d1_source("broken", emulator, "app-uuid", schedule="every night")]
    ferry = Ferry(tmp_path / "ferry", bad)
    try:
        status, _, body = ferry.api("/v1/sources")
        assert status == 500
        error = json.loads(body)["error"]
        assert 'source "broken"' in error and 'field "schedule"' in error, error
        status, _, payload = ferry.webhook("good")
        assert status == 500 and payload["error"] == error
        ferry.scheduled("*/5 * * * *", at_ms=1893466800000)
        time.sleep(1)
        assert emulator.state()["export_calls"] == 0
    finally:
        ferry.stop()


def test_a_signed_url_that_expires_mid_copy_is_renewed_and_the_copy_resumes(world, tmp_path):
    emulator = world["emulator"]
    source = d1_source("renewed", emulator, "big-uuid", part_size_mib=BIG_PART_MIB, slice_max_mib=BIG_PART_MIB)
    ferry = Ferry(tmp_path / "ferry", [source])
    try:
        # One 5 MiB part per slice at 2 MiB/s, and URLs that last 4 s: each URL expires mid-copy.
        emulator.control(url_ttl=4, throttle_kib_per_s=2048)
        job = ferry.webhook_job("renewed", timeout=180)
        assert job["renewals"] >= 1, job
        check_backup(ferry, job, expected_dump(world["big"]))
        downloads = [r for r in emulator.state()["requests"] if r["path"].startswith("/__signed/")]
        assert any(r["status"] == 403 for r in downloads), "an expired URL was refused"
        resumed = [r for r in downloads if r["status"] == 206]
        tokens = {r["path"].split("/")[2] for r in resumed}
        assert len(tokens) >= 2, "resumed on a fresh URL"
        assert all(r["served_start"] % (BIG_PART_MIB << 20) == 0 for r in resumed)
        starts = [r["served_start"] for r in resumed]
        assert starts == sorted(starts), f"no stored part was downloaded again: {starts}"
    finally:
        ferry.stop()


def test_an_oversized_webhook_body_gets_413_and_starts_nothing(world):
    import http.client
    ferry = world["ferry"]
    # Declared too large: refused on Content-Length alone.
    status, _, payload = ferry.webhook("app-db", body=b'{"pad": "' + b"x" * (1 << 20) + b'"}')
    assert status == 413, payload
    # Not declared (chunked): read only up to the cap, then refused.
    conn = http.client.HTTPConnection("127.0.0.1", ferry.port, timeout=30)
    try:
        chunks = (b'{"pad": "' + b"x" * 8192 for _ in range(64))
        conn.request("POST", "/v1/sources/app-db/exports", body=chunks, encode_chunked=True,
                     headers={"webhook-id": "msg_chunked", "webhook-timestamp": str(int(time.time())),
                              "webhook-signature": "v1,AAAA", "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 413, (resp.status, resp.read())
    finally:
        conn.close()
    assert world["emulator"].state()["export_calls"] == 0, "nothing was started"


def test_weak_secrets_are_refused_naming_the_secret(world, tmp_path):
    ferry = Ferry(tmp_path / "ferry", [d1_source("app-db", world["emulator"], "app-uuid")],
                  secrets={"FERRY_API_TOKEN": "short-token", "FERRY_WEBHOOK_SECRET": "whsec_AA=="})
    try:
        status, _, body = ferry.api("/v1/sources", token="short-token")
        assert status == 503 and b"FERRY_API_TOKEN is too weak" in body, body
        status, _, payload = ferry.webhook("app-db")
        assert status == 500 and "FERRY_WEBHOOK_SECRET is too weak" in payload["error"], payload
        assert world["emulator"].state()["export_calls"] == 0
    finally:
        ferry.stop()


def test_one_delivery_starts_one_source_and_concurrent_triggers_start_one_export(world, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    emulator = world["emulator"]
    sources = [d1_source("first", emulator, "app-uuid"), d1_source("second", emulator, "app-uuid")]
    ferry = Ferry(tmp_path / "ferry", sources)
    try:
        # The same signed delivery replayed to every source starts one job, for the first.
        ts = int(time.time())
        status, _, payload = ferry.webhook("first", msg_id="msg_once", timestamp=ts)
        assert status == 202, payload
        status, _, payload = ferry.webhook("second", msg_id="msg_once", timestamp=ts)
        assert status == 409 and "already delivered to source \"first\"" in payload["error"], payload
        ferry.wait_job(ferry.source("first")["last_job"]["id"])
        assert ferry.source("second")["last_job"] is None
        tasks = len(emulator.state()["tasks"])
        # 20 concurrent triggers of one source: exactly one is admitted, one export starts.
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda i: ferry.webhook("second", msg_id=f"msg_c{i}")[0], range(20)))
        assert sorted(answers).count(202) == 1 and answers.count(409) == 19, answers
        ferry.wait_job(ferry.source("second")["last_job"]["id"], timeout=120)
        assert len(emulator.state()["tasks"]) - tasks == 1, "exactly one export was started at D1"
    finally:
        ferry.stop()


def test_a_job_keeps_the_database_and_dump_options_it_started_with_when_the_config_changes_mid_export(world, tmp_path):
    emulator = world["emulator"]
    started_with = d1_source("moving", emulator, "app-uuid", dump_options={"tables": ["users"]})
    edited = d1_source("moving", emulator, "yearly-uuid", dump_options={"no_data": True})
    ferry = Ferry(tmp_path / "ferry", [started_with])
    try:
        emulator.control(active_polls=1000)  # the export stays active until released below
        status, _, payload = ferry.webhook("moving")
        assert status == 202, payload
        job_id = payload["job"]["id"]
        deadline = time.time() + 30
        while time.time() < deadline and (ferry.job(job_id)["provider"]["polls"] or 0) < 2:
            time.sleep(0.2)
        bookmark = ferry.job(job_id)["provider"]["at_bookmark"]
        assert bookmark, "the export is running with its bookmark"
        # Mid-export, the config now names another database and other dump options.
        ferry.stop()
        ferry.write_config([edited])
        ferry.start()
        assert ferry.source("moving")["current_job_id"] == job_id
        polls = ferry.job(job_id)["provider"]["polls"]
        deadline = time.time() + 30
        while time.time() < deadline and ferry.job(job_id)["provider"]["polls"] < polls + 3:
            time.sleep(0.2)
        assert ferry.job(job_id)["phase"] == "exporting", "it kept polling after the restart"
        emulator.control(active_polls=2)
        job = ferry.wait_job(job_id, timeout=60)
        expected = dump_sql_of(world["app"], tables=["users"])
        manifest = check_backup(ferry, job, expected)
        assert manifest["provider"]["database_id"] == "app-uuid"
        assert manifest["provider"]["at_bookmark"] == bookmark
        assert manifest["provider"]["dump_options"] == {"tables": ["users"], "no_data": False, "no_schema": False}
        assert job["config"]["provider"]["database_id"] == "app-uuid", "the API shows the settings the job ran with"
        state = emulator.state()
        assert not [r for r in state["requests"] if "/database/yearly-uuid/" in r["path"]], \
            "the other database never got a call, let alone a poll with the old bookmark"
        assert [t["database_id"] for t in state["tasks"]] == ["app-uuid"]
        # The next job runs with the edited config.
        job = ferry.webhook_job("moving")
        manifest = check_backup(ferry, job, dump_sql_of(world["small"], no_data=True))
        assert manifest["provider"]["database_id"] == "yearly-uuid"
    finally:
        ferry.stop()


def dump_sql_of(path: Path, **options) -> bytes:
    db = sqlite3.connect(path)
    try:
        return dump_sql(db, **options).encode()
    finally:
        db.close()


def test_sources_on_one_token_share_its_rate_limit_and_every_backup_still_commits(world):
    """Cloudflare allows 1,200 API calls per 5 minutes per token and then blocks every call for
    5 minutes; here the emulator scales that down to 12 calls per 6 s (then a 30 s block), and
    four D1 sources on one token back up at once (about 20 calls)."""
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(rate_limit={"limit": 12, "window": 6, "block": 30}, active_polls=4)
    names = ["app-db", "yearly", "failing", "flaky"]
    ids = []
    for name in names:
        status, _, payload = ferry.webhook(name)
        assert status == 202, payload
        ids.append(payload["job"]["id"])
    jobs = [ferry.wait_job(job_id, timeout=120) for job_id in ids]
    assert [j["phase"] for j in jobs] == ["committed"] * 4, [(j["source"], j["error"]) for j in jobs]
    counts = emulator.state()["rate_limit_state"]
    assert counts["blocked_hits"] == 0, "no call reached the emulator during a block"
    assert counts["rate_limited"] == 0, "the limit was never crossed"
    assert counts["calls"] > 12, f"more calls than one window allows: the budget spread them ({counts})"
    status, _, text = ferry.api("/metrics")
    text = text.decode()
    assert status == 200
    tokens = re.findall(r'^ferry_api_budget_remaining\{token="([0-9a-f]{8})"\} \d+$', text, re.M)
    assert tokens, text
    assert any(f'ferry_api_budget_limit{{token="{t}"}} 12' in text for t in tokens), text
    assert D1_TOKEN not in text
