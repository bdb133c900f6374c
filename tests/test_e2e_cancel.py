"""End to end: job deadlines, `POST /v1/jobs/{id}/cancel`, and the dashboard's Cancel and
"Drill now" buttons, by the built Worker under `wrangler dev` against the D1 emulator.

The emulator's `import_stuck` switch keeps a D1 import `active` for as long as it is set (D1 has no
call that stops an import; see `tests/emulators/d1_restore.py`). One Worker serves every test: a
source `app` (a drill configured, a long restore deadline) and a source `tight` (a 6 s restore
deadline), both backing up the same small database.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing

import pytest

from harness import API_TOKEN, D1Emulator, Ferry, TERMINAL, d1_source
from test_e2e_dashboard import CHROMIUM_ARGS, CHROMIUM, browser_tools

ENDED = (*TERMINAL, "cancelled")
BEARER = {"authorization": f"Bearer {API_TOKEN}", "content-type": "application/json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("cancel-e2e")
    src = work / "src.sqlite"
    with closing(sqlite3.connect(src)) as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, label TEXT)")
        db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(20)])
        db.commit()
    targets = {}
    for name in ("dst1", "dst2", "dst3"):
        targets[name] = work / f"{name}.sqlite"
        sqlite3.connect(targets[name]).close()
    emulator = D1Emulator(work, {"src-uuid": src, **targets}, active_polls=1, cancel_after=30)
    sources = [
        d1_source("app", emulator, "src-uuid", drill_schedule="0 4 * * 1", deadline_seconds={"restore": 600}),
        d1_source("tight", emulator, "src-uuid", deadline_seconds={"restore": 6}),
    ]
    ferry = Ferry(work / "ferry", sources)
    folders = {}
    for name in ("app", "tight"):
        job = ferry.webhook_job(name, timeout=90)
        assert job["phase"] == "committed", job
        folders[name] = ferry.backups(name)[0]["artifacts"][0]["key"].rsplit("/", 1)[0]
    yield {"ferry": ferry, "emulator": emulator, "folders": folders}
    ferry.stop()
    emulator.stop()


def cancel(ferry: Ferry, job_id: str, body: bytes = b"", headers: dict | None = None):
    status, _, raw = ferry.http.request("POST", f"/v1/jobs/{job_id}/cancel", body, BEARER if headers is None else headers)
    return status, json.loads(raw)


def start_stuck_restore(world, source: str, target: str) -> str:
    world["emulator"].control(import_stuck=True)
    status, answer = world["ferry"].restore(world["folders"][source], {"target": {"database_id": target}, "confirm": target})
    assert status == 202, answer
    return answer["job"]["id"]


def wait_stuck_polls(emulator, n: int = 2, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(t.get("stuck_polls", 0) >= n for t in emulator.state()["imports"]):
            return
        time.sleep(0.2)
    raise AssertionError(f"the import was never polled while stuck: {emulator.state()['imports']}")


def test_a_restore_whose_import_stays_active_is_cancelled_and_the_source_takes_the_next_job(world):
    ferry, emulator = world["ferry"], world["emulator"]
    try:
        job_id = start_stuck_restore(world, "app", "dst1")
        wait_stuck_polls(emulator)
        prefix = ferry.job(job_id)["restore"]["staging"]["prefix"]
        assert ferry.r2_get(prefix + "00000.sql") is not None, "the import was staged"
        status, _ = cancel(ferry, job_id, headers={})
        assert status == 401, "a cancel needs the bearer token"
        assert cancel(ferry, "0123456789abcdef")[0] == 404
        assert cancel(ferry, job_id, b'{"reason": 7}')[0] == 400
        status, answer = cancel(ferry, job_id, json.dumps({"reason": "the import is stuck"}).encode())
        assert status == 202 and answer["cancelling"] is True, answer
        job = ferry.wait_job(job_id, phases=ENDED, timeout=60)
        assert job["phase"] == "cancelled", job
        assert job["cancelled"]["by"] == "api" and job["cancelled"]["reason"] == "the import is stuck", job
        assert job["error"] == "cancelled by api: the import is stuck", job
        # The staged import was deleted.
        assert ferry.r2_get(prefix + "00000.sql") is None, prefix
        status, answer = cancel(ferry, job_id)
        assert status == 409 and "already ended (cancelled)" in answer["error"], answer
        # The source is free: the next job starts and commits.
        assert ferry.source("app")["current_job_id"] is None
        status, answer = ferry.api_post("/v1/sources/app/exports", {})
        assert status == 202, answer
        assert ferry.wait_job(answer["job"]["id"], timeout=90)["phase"] == "committed"
        history = ferry.source("app")["history"]
        assert any(h["id"] == job_id and h["phase"] == "cancelled" for h in history), history
        metrics = ferry.api("/metrics")[2].decode()
        assert 'outcome="cancelled"' in metrics, metrics
    finally:
        emulator.control(import_stuck=False)


def test_a_restore_whose_import_stays_active_fails_at_its_deadline_and_frees_the_source(world):
    ferry, emulator = world["ferry"], world["emulator"]
    try:
        job_id = start_stuck_restore(world, "tight", "dst2")
        job = ferry.wait_job(job_id, phases=ENDED, timeout=90)
        assert job["phase"] == "failed", job
        assert "did not finish within its deadline of 6 s (deadline_seconds.restore)" in job["error"], job
        assert job.get("cancelled") is None
        assert ferry.source("tight")["current_job_id"] is None
    finally:
        emulator.control(import_stuck=False)


def test_the_dashboard_cancels_a_running_job_and_starts_a_drill_where_one_is_configured(world):
    sync_api = browser_tools()
    ferry, emulator = world["ferry"], world["emulator"]
    problems: list[str] = []
    try:
        job_id = start_stuck_restore(world, "app", "dst3")
        wait_stuck_polls(emulator)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(ferry.http.base + "/")
                page.fill("#token", API_TOKEN)
                page.click("#login button[type=submit]")
                expect = sync_api.expect
                app = page.locator('article.card[data-source="app"]')
                tight = page.locator('article.card[data-source="tight"]')
                expect(app.locator(".inflight")).to_be_visible(timeout=15_000)
                expect(app.locator(".drill-now")).to_be_visible()
                expect(tight.locator(".drill-now")).to_be_hidden()
                app.locator(".cancel-job").click()
                expect(app.locator(".action-result")).to_contain_text(f"Cancelling job {job_id}", timeout=10_000)
                job = ferry.wait_job(job_id, phases=ENDED, timeout=60)
                assert job["phase"] == "cancelled" and job["cancelled"]["reason"] == "cancelled from the dashboard", job
                expect(app.locator(".inflight")).to_be_hidden(timeout=15_000)
                emulator.control(import_stuck=False)
                app.locator(".drill-now").click()
                expect(app.locator(".action-result")).to_contain_text("Restore drill started: job", timeout=10_000)
                text = app.locator(".action-result").text_content()
                drill_id = text.rsplit("job ", 1)[1].strip()
                drill = ferry.wait_job(drill_id, phases=ENDED, timeout=90)
                assert (drill["task"], drill["phase"]) == ("drill", "restored"), drill
            finally:
                browser.close()
    finally:
        emulator.control(import_stuck=False)
    assert problems == [], problems
