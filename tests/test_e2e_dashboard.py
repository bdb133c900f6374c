"""End to end: the dashboard at `/` in a real browser (Debian's Chromium driven by Playwright for
Python; nothing is downloaded) against the Worker under `wrangler dev`, with four DXP sources:
healthy, failing (a wrong password, in the provider's words), stale (a committed backup older than
its one-minute `max_age`) and in flight (a throttled download). Also the bearer-token triggers the
dashboard's buttons use.

Screenshots at 1280x800 and 390x844 are written under the test's temp folder; their paths are
printed (run with `-s` to see them)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pytest

from harness import API_TOKEN, DXP_SECRETS, DxpEmulator, Ferry, dxp_source

CHROMIUM = os.environ.get("FERRY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GREEN, AMBER, RED = "rgb(45, 164, 78)", "rgb(212, 167, 44)", "rgb(207, 34, 46)"  # the lights' CSS colours



def browser_tools():
    """Playwright's sync API, or a failure saying how to install what is missing (never a skip)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: bash scripts/setup.sh installs Debian's chromium")
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("Playwright for Python is missing: bash scripts/setup.sh installs it (pip, no browser download)")
    return sync_api


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("dashboard-e2e")
    for sub in ("local", "slow"):
        (work / sub).mkdir()
    # Two backups: the healthy source first copies the older one, so "Back up now" has a new one.
    local = DxpEmulator(work / "local", volume_mib=24, backups=2)
    # The in-flight source's volume is large enough to stay in flight at 512 KiB/s all along.
    slow = DxpEmulator(work / "slow", volume_mib=48, backups=1)
    # Progress counts settled parts: one part in flight makes it move every 5 MiB.
    small_parts = {"part_size_mib": 5, "parts_in_flight": 1}
    sources = [
        dxp_source("healthy", local, **small_parts),
        dxp_source("failing", local, auth="basic", password_secret="WRONG_PASSWORD"),
        dxp_source("stale", local, max_age_minutes=1),
        dxp_source("inflight", slow, **small_parts),
    ]
    ferry = Ferry(work / "ferry", sources, secrets={**DXP_SECRETS, "WRONG_PASSWORD": "nope"})
    # The stale source's only backup, first: its age passes max_age (1 min) while the rest runs.
    stale = ferry.webhook_job("stale")
    assert stale["phase"] == "committed", stale
    yield {"ferry": ferry, "local": local, "slow": slow, "stale_at": time.time()}
    ferry.stop()
    local.stop()
    slow.stop()


def post(ferry: Ferry, path: str, body: bytes = b"", headers: dict | None = None):
    status, hdrs, raw = ferry.http.request("POST", path, body, headers or {})
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, {"raw": raw.decode(errors="replace")}


BEARER = {"authorization": f"Bearer {API_TOKEN}"}


def test_liveness_is_at_healthz_and_the_page_at_root_is_locked_down(world):
    ferry = world["ferry"]
    status, _, body = ferry.http.request("GET", "/healthz")
    assert status == 200 and json.loads(body)["service"] == "ferry"
    status, headers, body = ferry.http.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert csp.startswith("default-src 'none';") and "script-src 'sha256-" in csp and "unsafe" not in csp, csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"
    assert API_TOKEN.encode() not in body and b"<script>" in body


def test_triggers_accept_the_api_bearer_token_and_refuse_anything_else_untouched(world):
    ferry, local = world["ferry"], world["local"]
    before = ferry.source("healthy")
    assert before["last_job"] is None
    wrong = {"authorization": "Bearer wrong-token-0123456789abcdef0123456789"}
    for headers in (wrong, {}, {"authorization": "Basic " + API_TOKEN}):
        status, hdrs, payload = post(ferry, "/v1/sources/healthy/exports", headers=headers)
        assert status == 401, (headers, status, payload)
    # Webhook headers make it a webhook, judged by its signature whatever bearer it carries.
    status, _, payload = post(ferry, "/v1/sources/healthy/exports",
                              headers={**BEARER, "webhook-id": "msg_x", "webhook-timestamp": str(int(time.time())),
                                       "webhook-signature": "v1,AAAA"})
    assert status == 401 and "signature" in payload["error"], payload
    status, _, payload = post(ferry, "/v1/sources/nope/exports", headers=BEARER)
    assert status == 404, payload
    after = ferry.source("healthy")
    assert after["last_job"] is None and after["current_job_id"] is None, "refusals touch nothing"

    # A bearer trigger may name a backup like a webhook: the older one, so a newer one is left.
    older = local.backup(0)["backupId"]
    body = json.dumps({"backup_id": older}).encode()
    status, _, payload = post(ferry, "/v1/sources/healthy/exports", body, {**BEARER, "content-type": "application/json"})
    assert status == 202, payload
    job = payload["job"]
    assert job["trigger"] == "api" and job["webhook_id"] is None, job
    status, _, busy = post(ferry, "/v1/sources/healthy/exports", headers=BEARER)
    assert status == 409 and busy["job_id"] == job["id"], busy
    done = ferry.wait_job(job["id"], timeout=60)
    assert done["phase"] == "committed", done
    (backup,) = ferry.backups("healthy")
    assert backup["trigger"] == "api" and backup["provider"]["backup_id"] == older


def light_colour(page, name: str) -> str:
    return page.eval_on_selector(f'article[data-source="{name}"] .light', "e => getComputedStyle(e).backgroundColor")


def test_the_dashboard_shows_each_state_and_back_up_now_runs_to_committed(world, tmp_path):
    tools = browser_tools()
    expect, sync_playwright = tools.expect, tools.sync_playwright
    ferry, local, slow = world["ferry"], world["local"], world["slow"]
    if not ferry.backups("healthy"):
        assert ferry.webhook_job("healthy", body=json.dumps({"backup_id": local.backup(0)["backupId"]}).encode())[
            "phase"] == "committed"
    failed = ferry.webhook_job("failing")
    assert failed["phase"] == "failed" and failed["error"], failed
    # A failed restore drill recorded next to the stale source's backup, as a drill job writes it.
    stale_folder = ferry.backups("stale")[0]["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    drill_error = 'drill of backup x failed: table "users": 0 rows restored, 40 in the backup'
    ferry.r2_put(stale_folder + "drill.json", json.dumps({
        "job_id": "00000000000000dd", "at": "2026-11-28T06:00:00.000Z", "passed": False,
        "backup": stale_folder, "error": drill_error}).encode())
    slow.control(throttle_kib_per_s=512)
    status, _, payload = ferry.webhook("inflight")
    assert status == 202, payload

    problems: list[str] = []
    shots: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text} at {m.location}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(ferry.http.base + "/")

            # The token is asked for once, and kept in the tab's session storage only.
            expect(page.locator("#login")).to_be_visible()
            page.fill("#token", API_TOKEN)
            page.click("#login button[type=submit]")
            card = lambda name: page.locator(f'article.card[data-source="{name}"]')
            expect(card("inflight")).to_be_visible(timeout=10_000)
            assert page.evaluate("sessionStorage.getItem('ferry.apiToken')") == API_TOKEN
            assert page.evaluate("localStorage.length") == 0 and API_TOKEN not in page.url
            # No source here has a drill: no "Drill now" (test_e2e_cancel.py clicks one that has).
            expect(card("healthy").locator(".drill-now")).to_be_hidden()
            expect(card("inflight").locator(".cancel-job")).to_be_visible()

            # Healthy: green, with the word, its backup in the chart and its files listed.
            expect(card("healthy")).to_have_attribute("data-light", "green")
            expect(card("healthy").locator(".word")).to_have_text("Healthy")
            assert light_colour(page, "healthy") == GREEN
            expect(card("healthy").locator(".chart-box svg rect.size")).to_have_count(1)
            expect(card("healthy").locator(".backups-summary")).to_have_text("Backups (1)")
            expect(card("healthy").locator(".next-run")).to_contain_text("0 0 1 1 *")

            # Restore drills: none for the healthy source; the stale source's failed drill, in its words.
            expect(card("healthy").locator(".drill")).to_have_text("never drilled")
            expect(card("stale").locator(".drill .bad")).to_have_text("failed")
            expect(card("stale").locator(".drill .drill-error")).to_contain_text('table "users": 0 rows restored')
            expect(card("stale").locator(".backup .drill-badge")).to_have_text("drill failed")

            # Failing: amber, the provider's words in the reason and under recent failures.
            words = failed["error"][:40]
            expect(card("failing")).to_have_attribute("data-light", "amber")
            expect(card("failing").locator(".word")).to_have_text("Needs a look")
            expect(card("failing").locator(".reason")).to_contain_text(words)
            expect(card("failing").locator(".failure-list .error")).to_contain_text(words)
            expect(card("failing").locator(".last-run")).to_contain_text("backup failed")
            assert light_colour(page, "failing") == AMBER

            # In flight: the job with a progress bar, bytes, rate.
            inflight = card("inflight")
            expect(inflight.locator(".inflight")).to_be_visible()
            expect(inflight.locator(".inflight-title")).to_contain_text("Backup in flight")
            expect(inflight.locator(".inflight-text")).to_contain_text("/s", timeout=15_000)
            expect(page.locator("#summary")).to_contain_text("1 running")

            # "Back up now" on the healthy source: 202, a moving bar, then committed.
            local.control(throttle_kib_per_s=3072)
            healthy = card("healthy")
            healthy.locator(".backup-now").click()
            expect(healthy.locator(".action-result")).to_have_text(
                re.compile(r"^Backup started: job [0-9a-f]{16}$"))
            job_id = healthy.locator(".action-result").inner_text().rsplit(" ", 1)[1]
            expect(healthy.locator(".inflight")).to_be_visible()
            bar = healthy.locator(".inflight progress.bar")
            seen: list[tuple[int, float | None]] = []
            deadline = time.time() + 45
            while time.time() < deadline:
                if healthy.locator(".inflight").is_hidden():
                    break
                copied = bar.get_attribute("data-copied")
                if copied is not None:
                    value = bar.evaluate("b => b.hasAttribute('value') ? b.value / b.max : null")
                    if not seen or int(copied) != seen[-1][0]:
                        seen.append((int(copied), value))
                time.sleep(0.2)
            copied_values = [c for c, _ in seen]
            assert len(copied_values) >= 2 and copied_values == sorted(copied_values), seen
            fractions = [v for _, v in seen if v is not None]
            assert fractions and 0 < fractions[-1] <= 1, ("the bar became determinate once the total was known", seen)
            assert len(fractions) < 2 or fractions[-1] > fractions[0], seen
            expect(healthy.locator(".inflight")).to_be_hidden(timeout=30_000)
            expect(healthy.locator(".last-run")).to_contain_text("backup committed")
            expect(healthy.locator(".backups-summary")).to_have_text("Backups (2)", timeout=10_000)
            expect(healthy.locator(".chart-box svg rect.size")).to_have_count(2)
            assert ferry.job(job_id)["phase"] == "committed"
            local.control(throttle_kib_per_s=0)

            # A file of a backup downloads through the bearer-authenticated API, byte for byte.
            newest = ferry.backups("healthy")[0]
            artifact = next(a for a in newest["artifacts"] if a["filename"] == "database.gz")
            healthy.locator("details.backups summary").click()
            with page.expect_download() as download:
                healthy.locator(f'button.file[data-key="{artifact["key"]}"]').click()
            saved = tmp_path / "download-database.gz"
            download.value.save_as(saved)
            assert download.value.suggested_filename == "database.gz"
            assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifact["sha256"]

            # "Verify now": the newest backup becomes verified.
            healthy.locator(".verify-now").click()
            expect(healthy.locator(".action-result")).to_contain_text("Verification started")
            expect(healthy.locator(".verification .good")).to_have_text("verified", timeout=30_000)

            # Stale: once its backup is older than max_age (one minute), red with the reason.
            wait = world["stale_at"] + 62 - time.time()
            if wait > 0:
                time.sleep(wait)
            expect(card("stale")).to_have_attribute("data-light", "red", timeout=10_000)
            expect(card("stale").locator(".word")).to_have_text("Stale")
            expect(card("stale").locator(".reason")).to_contain_text("more than max_age (1 min)")
            assert light_colour(page, "stale") == RED
            expect(inflight.locator(".inflight")).to_be_visible()  # still copying at 512 KiB/s

            for width, height in ((1280, 800), (390, 844)):
                page.set_viewport_size({"width": width, "height": height})
                page.wait_for_timeout(300)
                for full in (False, True):
                    path = tmp_path / f"dashboard-{width}x{height}{'-full' if full else ''}.png"
                    page.screenshot(path=str(path), full_page=full)
                    shots.append(str(path))
            # On a phone the cards stack in one column that fits the screen.
            boxes = [card(n).bounding_box() for n in ("healthy", "failing", "stale", "inflight")]
            assert len({round(b["x"]) for b in boxes}) == 1 and all(b["x"] + b["width"] <= 390 for b in boxes), boxes
            assert page.evaluate("document.documentElement.scrollWidth") <= 390

            # Sign out forgets the token.
            page.click("#signout")
            expect(page.locator("#login")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('ferry.apiToken')") is None
        finally:
            browser.close()
            slow.control(throttle_kib_per_s=0)
    for shot in shots:
        print("screenshot:", shot)
    # A Worker without the retention routes answers 404 for them: the page stops asking after one.
    allowed = [m for m in problems if "404" in m and "/retention" in m]
    assert len(allowed) <= 1 and [m for m in problems if m not in allowed] == [], problems
