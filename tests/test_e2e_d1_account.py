"""End to end: a whole D1 account (`database_id = "shop-*"`) backed up by the built Worker under
`wrangler dev`, against the D1 emulator: every matching database in a job of its own, found again
at each run, each with its own retention, health, metrics and listing.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import urllib.parse
from pathlib import Path

from emulators.d1_dump import dump_sql
from harness import API_TOKEN, D1Emulator, Ferry, d1_source
from test_e2e_dashboard import CHROMIUM, CHROMIUM_ARGS, browser_tools

MEMBERS = 30


def make_db(path: Path, n: int) -> Path:
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);")
    db.executemany("INSERT INTO orders (item, qty) VALUES (?, ?)", [(f"item {n}-{i}", n * 10 + i) for i in range(n % 4 + 1)])
    db.commit()
    db.close()
    return path


def dump_of(path: Path) -> bytes:
    db = sqlite3.connect(path)
    try:
        return dump_sql(db).encode()
    finally:
        db.close()


def all_backups(ferry: Ferry, source: str, member: str | None = None) -> list:
    """Every committed backup of the source (following the listing's pages)."""
    found, before = [], None
    while True:
        query = {"limit": "100"}
        if before:
            query["before"] = before
        if member:
            query["member"] = member
        page = ferry.api_json(f"/v1/sources/{source}/backups?" + urllib.parse.urlencode(query))
        found += page["backups"]
        before = page.get("next")
        if not before:
            return found


def dashboard_groups_the_members_under_the_source(ferry: Ferry) -> None:
    """In a real browser: the source's card lists its 30 databases, the failing one first."""
    sync_api = browser_tools()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(ferry.http.base + "/")
            page.fill("#token", API_TOKEN)
            page.click("#login button[type=submit]")
            card = page.locator('article.card[data-source="account"]')
            members = card.locator(".member-list li.member")
            sync_api.expect(members).to_have_count(MEMBERS, timeout=20_000)
            sync_api.expect(card.locator(".members-title")).to_have_text(f"{MEMBERS} members · 1 not green")
            first = members.first
            assert first.get_attribute("data-member") == "shop-07" and first.get_attribute("data-light") == "amber"
            sync_api.expect(first).to_contain_text("D1 Export error")
        finally:
            browser.close()


def account_round(ferry: Ferry, expected_children: int) -> tuple[dict, dict]:
    """One signed run of the account: the discovery job, then every member's job to its end."""
    status, _, payload = ferry.webhook("account")
    assert status == 202, payload
    parent = ferry.wait_job(payload["job"]["id"], phases=("dispatched", "failed", "skipped"))
    assert parent["phase"] == "dispatched", parent
    assert len(parent["children"]) == expected_children, parent
    children = [ferry.wait_job(c, timeout=120) for c in parent["children"]]
    by_member = {c["provider"]["database"]["name"]: c for c in children}
    assert len(by_member) == expected_children, "one job per database"
    return parent, by_member


def test_a_whole_d1_account_backs_up_each_database_in_its_own_job_one_failing_stops_none_and_a_new_one_joins(
        tmp_path):
    names = {f"uuid-{i:02d}": f"shop-{i:02d}" for i in range(MEMBERS)}
    files = {uuid: make_db(tmp_path / f"{name}.sqlite", i) for i, (uuid, name) in enumerate(names.items())}
    # A database of the account the pattern does not select.
    files["uuid-scratch"] = make_db(tmp_path / "scratch-notes.sqlite", 99)
    emulator = D1Emulator(tmp_path, files, active_polls=1, cancel_after=60)
    source = d1_source("account", emulator, "shop-*", list_page_size=10, retention={"keep_last": 1})
    ferry = Ferry(tmp_path / "ferry", [source])
    try:
        failure = "D1 Export error: the export of shop-07 failed (simulated)"
        emulator.control(export_errors={"uuid-07": failure})
        parent, first = account_round(ferry, MEMBERS)
        assert "secret_" not in json.dumps(parent)
        assert set(first) == set(names.values()), "every database the pattern selects, none other"
        # The list was read page by page (10 a page, as asked), the scratch database left out.
        listed = [r["path"] for r in emulator.state()["requests"]
                  if r["method"] == "GET" and r["path"].split("?")[0].endswith("/d1/database")]
        assert len(listed) == 4, listed  # 31 databases: three full pages and a short one
        assert not any("uuid-scratch" in r["path"] for r in emulator.state()["requests"])

        broken = first["shop-07"]
        assert broken["phase"] == "failed" and failure in broken["error"], broken
        for name, job in first.items():
            if name == "shop-07":
                continue
            assert job["phase"] == "committed", job
            assert job["parent"] == parent["id"]
        # Each member's backup holds its own database's dump, and names its member.
        backups = all_backups(ferry, "account")
        assert len(backups) == MEMBERS - 1
        by_member = {b["member"]: b for b in backups}
        assert set(by_member) == set(names.values()) - {"shop-07"}
        uuid_of = {name: uuid for uuid, name in names.items()}
        for name in ("shop-00", "shop-13", "shop-29"):
            manifest = by_member[name]
            assert manifest["provider"]["database_id"] == uuid_of[name]
            (art,) = manifest["artifacts"]
            _, body = ferry.artifact(art["key"])
            assert body == dump_of(files[uuid_of[name]]), f"{name}'s backup is its own database's dump"
            assert art["sha256"] == hashlib.sha256(body).hexdigest()

        # Health per member: the failing one makes the source amber, naming it; the others green.
        report = ferry.source("account")
        assert report["health"]["light"] == "amber", report["health"]
        assert report["health"]["reason"].startswith("database shop-07: "), report["health"]
        lights = {m: v["health"]["light"] for m, v in report["members"].items()}
        assert lights == {name: ("amber" if name == "shop-07" else "green") for name in names.values()}, lights
        only = all_backups(ferry, "account", member="shop-13")
        assert [b["job_id"] for b in only] == [first["shop-13"]["id"]]
        dashboard_groups_the_members_under_the_source(ferry)

        # A database created between runs joins the account's next run; the failure has cleared.
        added = make_db(tmp_path / "shop-30.sqlite", 30)
        status, _, body = emulator.http.request("POST", "/__control/databases",
                                                json.dumps({"uuid": "uuid-30", "path": str(added)}).encode(),
                                                {"content-type": "application/json"})
        assert status == 200, body
        emulator.control(export_errors={})
        _, second = account_round(ferry, MEMBERS + 1)
        assert all(job["phase"] == "committed" for job in second.values()), \
            {n: (j["phase"], j.get("error")) for n, j in second.items() if j["phase"] != "committed"}
        assert "shop-30" in second

        # Retention keeps each member's newest (keep_last = 1), none another's.
        newest = {name: job["id"] for name, job in second.items()}
        deadline = time.time() + 60
        while time.time() < deadline:
            kept = {b["member"]: b["job_id"] for b in all_backups(ferry, "account")}
            if kept == newest and len(all_backups(ferry, "account")) == MEMBERS + 1:
                break
            time.sleep(1)
        kept = sorted((b["member"], b["job_id"]) for b in all_backups(ferry, "account"))
        assert kept == sorted(newest.items()), "each database keeps its own newest backup"
        _, body = ferry.artifact(next(b for b in all_backups(ferry, "account", member="shop-30"))["artifacts"][0]["key"])
        assert body == dump_of(added)

        report = ferry.source("account")
        assert report["health"]["light"] == "green", report["health"]
        assert len(report["members"]) == MEMBERS + 1
        status, _, metrics = ferry.api("/metrics")
        assert status == 200
        text = metrics.decode()
        for name in ("shop-00", "shop-07", "shop-30"):
            assert f'ferry_member_healthy{{source="account",member="{name}"}} 1' in text, name
            assert f'ferry_backups_retained{{source="account",member="{name}"}} 1' in text, name
        # Every request stayed within the token's budget: D1 never rate-limited Ferry.
        assert emulator.state()["rate_limit_state"]["rate_limited"] == 0

        # A member's backup restores: a drill of shop-13's imports it into a scratch database.
        folder = all_backups(ferry, "account", member="shop-13")[0]["artifacts"][0]["key"].rsplit("/", 1)[0]
        status, answer = ferry.api_post("/v1/sources/account/drill", {"backup": folder})
        assert status == 202, answer
        drill = ferry.wait_job(answer["job"]["id"], timeout=120)
        assert drill["phase"] == "restored", (folder, drill)
    finally:
        ferry.stop()
        emulator.stop()
