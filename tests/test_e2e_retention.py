"""End to end: retention under `wrangler dev`, against the D1 emulator.

A daily-scheduled D1 source makes 40 backups over a simulated year: the Worker's scheduled
handler is fired at 03:00 on chosen days of 2025, in order, each job committed before the next
tick, so every manifest records its fire time (`scheduled_for`), the time retention counts it at.

1. Without a `retention` table nothing is deleted, and the plan says every backup is kept.
2. With a policy, `GET /v1/sources/{name}/retention` promises what is kept (and by which rule)
   and what goes; the plan is checked against an independent reading of restic's rules; the
   next day's daily pass applies it, and what remains in R2 is exactly what was promised, with
   no object left in any folder without a manifest. A pinned backup survives.
3. The 40th backup's commit applies the policy again: the newest survives and a new plan
   deletes nothing.

The Worker runs with a tiny step budget (`FERRY_STEP_SUBREQUESTS`): a listing page shows
`STEP_PAGE` backups at most and says where the next one starts, the backup index is rebuilt from
R2 a few folders per request, and retention deletes a couple of backups per alarm step, so every
answer above is reached over many bounded steps.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from harness import API_TOKEN, D1Emulator, Ferry, d1_source

TRIGGER = "*/5 * * * *"
SOURCE = "yearly-db"
YEAR = datetime(2025, 1, 1, 3, 0, tzinfo=timezone.utc)
# Every 9 days for most of the year, then a cluster in December: 39 backups before the policy is
# set, the 40th after.
DAYS = list(range(0, 298, 9)) + [330, 340, 350, 351, 352]
LAST_DAY = 353
POLICY = {"keep_last": 2, "keep_daily": 3, "keep_weekly": 4, "keep_monthly": 4, "keep_yearly": 2,
          "keep_within": "2d"}
PINNED_INDEX = 4  # the backup of day 36 (2025-02-06): no rule keeps it
# 9 subrequests per step: (9 - 1) / 3 = 2 backups per listing page, 2 folders per index rebuild
# step, 9 / 4 = 2 deletions per retention step (crate::index).
STEP_BUDGET = "9"
STEP_PAGE = 2


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    work = tmp_path_factory.mktemp("retention-e2e")
    db = sqlite3.connect(work / "db.sqlite")
    db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t (v) VALUES ('a'), ('b');")
    db.commit()
    db.close()
    emu = D1Emulator(work, {"ret-uuid": work / "db.sqlite"}, active_polls=1)
    yield emu
    emu.stop()


def source(emulator, **extra) -> dict:
    return d1_source(SOURCE, emulator, "ret-uuid", "0 3 * * *", poll_interval_ms=100, **extra)


def backup_at(ferry: Ferry, when: datetime) -> dict:
    """Fires the cron trigger at `when` and waits for the job it starts to commit."""
    before = ferry.source(SOURCE)["last_job"]
    ferry.scheduled(TRIGGER, at_ms=ms(when))
    deadline = time.time() + 30
    while time.time() < deadline:
        last = ferry.source(SOURCE)["last_job"]
        if last and (before is None or last["id"] != before["id"]):
            job = ferry.wait_job(last["id"], timeout=30, interval=0.1)
            assert job["phase"] == "committed", job
            assert job["scheduled_for"] == when.strftime("%Y-%m-%dT%H:%M:%S.000Z"), job
            return job
        time.sleep(0.1)
    raise AssertionError(f"no job for the tick at {when}:\n{ferry.log()}")


def request(ferry: Ferry, method: str, path: str):
    status, _, body = ferry.http.request(method, path, headers={"authorization": f"Bearer {API_TOKEN}"})
    return status, json.loads(body)


def api_json_ready(ferry: Ferry, path: str) -> dict:
    """GETs `path`, again while the source's backup index is being rebuilt (503)."""
    deadline = time.time() + 60
    while True:
        status, _, body = ferry.api(path)
        if status != 503 or time.time() > deadline:
            assert status == 200, (path, status, body)
            return json.loads(body)
        time.sleep(0.05)


def folders(ferry: Ferry) -> dict:
    """folder → manifest, for every committed backup listed by the API, page after page: each
    page holds at most what one step's budget allows, whatever `limit` asks."""
    listed, before, pages = [], None, 0
    while True:
        query = "limit=1000" + (f"&before={urllib.parse.quote(before)}" if before else "")
        page = api_json_ready(ferry, f"/v1/sources/{SOURCE}/backups?{query}")
        assert len(page["backups"]) <= STEP_PAGE, page
        listed += page["backups"]
        pages += 1
        before = page["next"]
        if before is None:
            break
    assert pages >= len(listed) // STEP_PAGE, pages
    return {m["artifacts"][0]["key"].rsplit("/", 1)[0] + "/": m for m in listed}


def r2_keys(ferry: Ferry) -> list:
    """Every object key of the local R2 bucket, read from miniflare's own store."""
    keys = []
    for store in (ferry.persist / "v3" / "r2").glob("**/*.sqlite"):
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "_mf_objects" in tables:
                keys += [r[0] for r in db.execute("SELECT key FROM _mf_objects")]
        finally:
            db.close()
    return keys


def restic_plan(backups: list, policy: dict, now: datetime) -> dict:
    """An independent reading of restic's forget rules (UTC periods), plus Ferry's protections:
    folder → reasons, for the backups kept."""
    order = sorted(backups, key=lambda b: (b["time"], b["folder"]), reverse=True)
    reasons = {b["folder"]: [] for b in order}
    reasons[order[0]["folder"]].append("newest")
    for b in order:
        if b["pinned"]:
            reasons[b["folder"]].append("pinned")
    for b in order[:policy.get("keep_last", 0)]:
        reasons[b["folder"]].append("last")
    periods = [
        ("hourly", lambda t: t.strftime("%Y-%m-%dT%H")),
        ("daily", lambda t: t.strftime("%Y-%m-%d")),
        ("weekly", lambda t: "%04d-W%02d" % t.isocalendar()[:2]),
        ("monthly", lambda t: t.strftime("%Y-%m")),
        ("yearly", lambda t: t.strftime("%Y")),
    ]
    for name, label in periods:
        left, last = policy.get(f"keep_{name}", 0), None
        for i, b in enumerate(order):
            if left == 0:
                break
            bucket = label(b["time"])
            if bucket != last:
                reasons[b["folder"]].append(f"{name} {bucket}")
            elif i == len(order) - 1:
                reasons[b["folder"]].append(f"oldest {name} {bucket}")
            else:
                continue
            last, left = bucket, left - 1
    if "keep_within" in policy:
        assert policy["keep_within"].endswith("d")
        latest = max(b["time"] for b in order if b["time"] <= now)
        cutoff = latest - timedelta(days=int(policy["keep_within"][:-1]))
        for b in order:
            if b["time"] > cutoff:
                reasons[b["folder"]].append(f"within {policy['keep_within']}")
    return {f: r for f, r in reasons.items() if r}


def as_backups(listed: dict) -> list:
    return [{"folder": f, "time": parse(m["scheduled_for"]), "pinned": m["pinned"]} for f, m in listed.items()]


def test_forty_backups_over_a_year_are_thinned_exactly_as_the_plan_promised(emulator, tmp_path):
    ferry = Ferry(tmp_path / "ferry", [source(emulator)], secrets={"FERRY_STEP_SUBREQUESTS": STEP_BUDGET})
    try:
        # 1. No retention table: 39 backups over the year, all kept.
        for day in DAYS:
            backup_at(ferry, YEAR + timedelta(days=day))
        listed = folders(ferry)
        assert len(listed) == len(DAYS)
        newest_first = sorted(listed, reverse=True)  # folder names start with the start time
        first = api_json_ready(ferry, f"/v1/sources/{SOURCE}/backups?limit=1000")
        assert [m["job_id"] for m in first["backups"]] == [listed[f]["job_id"] for f in newest_first[:STEP_PAGE]]
        assert first["next"] == newest_first[STEP_PAGE - 1], first["next"]
        plan = api_json_ready(ferry, f"/v1/sources/{SOURCE}/retention")
        assert plan["policy"] is None and plan["delete"] == 0 and plan["keep"] == len(DAYS), plan
        assert all(b["reasons"] == ["no retention policy"] for b in plan["backups"])
        order = sorted(listed, key=lambda f: listed[f]["scheduled_for"])
        pinned = order[PINNED_INDEX]

        # Pins: 404 for an unknown backup; pin, unpin; the listing shows them.
        status, body = request(ferry, "POST", f"/v1/backups/{SOURCE}/2025-01-01T000000Z-0000000000000000/pin")
        assert status == 404, body
        for folder, method in [(pinned, "POST"), (order[PINNED_INDEX + 1], "POST"), (order[PINNED_INDEX + 1], "DELETE")]:
            status, body = request(ferry, method, "/v1/backups/" + urllib.parse.quote(folder) + "pin")
            assert status == 200 and body == {"backup": folder, "pinned": method == "POST"}, body
        listed = folders(ferry)
        assert [f for f, m in listed.items() if m["pinned"]] == [pinned]

        # 2. The policy: the plan promises, the daily pass applies.
        ferry.stop()
        ferry.write_config([source(emulator, retention=POLICY)])
        ferry.start()
        plan = api_json_ready(ferry, f"/v1/sources/{SOURCE}/retention")
        assert plan["policy"] == POLICY and plan["verifies"] is False, plan
        promised = {b["folder"]: b["reasons"] for b in plan["backups"] if b["action"] == "keep"}
        doomed = {b["folder"] for b in plan["backups"] if b["action"] == "delete"}
        assert set(promised) | doomed == set(listed) and not set(promised) & doomed
        assert promised == restic_plan(as_backups(listed), POLICY, parse(plan["planned_at"]))
        assert "pinned" in promised[pinned] and promised[order[-1]][0] == "newest"
        assert promised[order[0]] == ["oldest yearly 2025"], "restic keeps the oldest while a rule has room"
        assert len(doomed) >= 20, plan
        assert folders(ferry).keys() == listed.keys(), "planning deletes nothing"

        # The first tick of the next day runs the daily pass (no backup is due at 00:05).
        ferry.scheduled(TRIGGER, at_ms=ms(YEAR + timedelta(days=LAST_DAY, hours=-3, minutes=5)))
        deadline = time.time() + 30
        while time.time() < deadline and folders(ferry).keys() != promised.keys():
            time.sleep(0.2)
        assert folders(ferry).keys() == promised.keys(), ferry.log()
        assert ferry.source(SOURCE)["last_job"]["scheduled_for"].startswith("2025-12-19"), "no job was started"
        assert_no_object_without_a_manifest(ferry, set(promised), doomed)

        # 3. The 40th backup: its commit applies the policy again.
        newest = backup_at(ferry, YEAR + timedelta(days=LAST_DAY))
        deadline = time.time() + 30
        while time.time() < deadline and api_json_ready(ferry, f"/v1/sources/{SOURCE}/retention")["delete"]:
            time.sleep(0.2)
        plan = api_json_ready(ferry, f"/v1/sources/{SOURCE}/retention")
        assert plan["delete"] == 0, plan
        remaining = folders(ferry)
        assert set(remaining) == {b["folder"] for b in plan["backups"]}
        assert pinned in remaining and remaining[pinned]["pinned"]
        assert plan["backups"][0]["folder"].endswith(f"-{newest['id']}/") and "newest" in plan["backups"][0]["reasons"]
        assert {b["folder"]: b["reasons"] for b in plan["backups"]} == restic_plan(
            as_backups(remaining), POLICY, parse(plan["planned_at"]))
        assert order[-3] in promised and order[-3] not in remaining, "the commit's pass deleted what the new backup replaced"
        assert_no_object_without_a_manifest(ferry, set(remaining), doomed)
    finally:
        ferry.stop()


def assert_no_object_without_a_manifest(ferry: Ferry, kept: set, doomed: set) -> None:
    keys = [k for k in r2_keys(ferry) if k.startswith(f"{SOURCE}/")]
    assert keys, "the local R2 store was found"
    by_folder: dict = {}
    for k in keys:
        folder = "/".join(k.split("/")[:2]) + "/"
        by_folder.setdefault(folder, set()).add(k.split("/", 2)[2])
    assert set(by_folder) == kept, (set(by_folder) - kept, kept - set(by_folder))
    assert not set(by_folder) & doomed
    for folder, names in by_folder.items():
        assert "manifest.json" in names, (folder, names)
