"""End to end: the daily orphan sweep under `wrangler dev`.

A committed backup, a folder without a manifest put behind Ferry's back, and a copy killed
mid-way whose job then ends without cleaning up (its record is deleted from the source's Durable
Object while the runtime is down, so the job is released with its multipart upload still open and
its first file stored). Cron is fired at chosen times: 12 hours later nothing is old enough to go;
two days later the stray folder and the killed job's folder are removed and its recorded upload is
aborted, the committed backup stays whole, and the report names all of it. A second tick on the
same UTC day sweeps nothing. The local R2 state (miniflare's SQLite) is read, never written.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from harness import DXP_SECRETS, DxpEmulator, Ferry, dxp_source

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
CRON = "*/5 * * * *"
ONE_PART_PER_SLICE = {"part_size_mib": 5, "slice_max_mib": 5, "parts_in_flight": 2}
STRAY = "kept/2026-01-01T000000Z-00000000000000f1/"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep-e2e")
    emulator = DxpEmulator(work, volume_mib=30, backups=1)
    yield {"emulator": emulator, "work": work}
    emulator.stop()


def r2_db(ferry: Ferry) -> Path:
    (db,) = [p for p in (ferry.persist / "v3" / "r2").rglob("*.sqlite") if "_mf_objects" in tables(p)]
    return db


def tables(path: Path) -> set:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def r2_objects(ferry: Ferry) -> dict:
    with sqlite3.connect(f"file:{r2_db(ferry)}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT key, size FROM _mf_objects"))


def r2_upload_state(ferry: Ferry, upload_id: str) -> int | None:
    """0 in progress, 1 completed, 2 aborted (miniflare's multipart states)."""
    with sqlite3.connect(f"file:{r2_db(ferry)}?mode=ro", uri=True) as db:
        row = db.execute("SELECT state FROM _mf_multipart_uploads WHERE upload_id = ?", (upload_id,)).fetchone()
    return row[0] if row else None


def do_keys(ferry: Ferry, prefix: str) -> list:
    keys = []
    for path in (ferry.persist / "v3" / "do").rglob("*.sqlite"):
        if "_cf_KV" in tables(path):
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                keys += [r[0] for r in db.execute("SELECT key FROM _cf_KV WHERE key LIKE ?", (prefix + "%",))]
    return keys


def lose_job_record(ferry: Ferry, job_id: str) -> None:
    """Deletes a job's record from its source's Durable Object (the runtime must be stopped)."""
    deleted = 0
    for path in (ferry.persist / "v3" / "do").rglob("*.sqlite"):
        if "_cf_KV" in tables(path):
            with sqlite3.connect(path) as db:
                deleted += db.execute("DELETE FROM _cf_KV WHERE key = ?", (f"job:{job_id}",)).rowcount
    assert deleted == 1, deleted


def fire(ferry: Ferry, at_ms: int) -> dict:
    """Fires cron as if at `at_ms` and returns the latest sweep report once it is that day's."""
    day = time.strftime("%Y-%m-%d", time.gmtime(at_ms / 1000))
    ferry.scheduled(CRON, at_ms=at_ms)
    deadline = time.time() + 60
    while time.time() < deadline:
        status, _, body = ferry.api("/v1/sweeps/latest")
        if status == 200:
            report = json.loads(body)
            if report["day"] == day and report["complete"]:
                return report
        time.sleep(0.3)
    raise AssertionError(f"no complete sweep report for {day}: {ferry.api('/v1/sweeps/latest')}\n{ferry.log()}")


def wait_for_volume_part(ferry: Ferry, job_id: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = ferry.job(job_id)
        copy = job.get("copy") or {}
        assert job["phase"] not in ("committed", "failed"), job
        if copy.get("key", "").endswith("volume.tgz") and copy.get("parts_stored", 0) >= 1:
            return copy
        time.sleep(0.1)
    raise AssertionError(f"no part stored: {ferry.job(job_id)}")


def test_the_daily_sweep_removes_orphans_and_never_a_backup(world):
    emulator = world["emulator"]
    sources = [dxp_source("kept", emulator), dxp_source("orphaned", emulator, **ONE_PART_PER_SLICE)]
    ferry = Ferry(world["work"] / "sweep", sources, secrets=DXP_SECRETS)
    try:
        assert ferry.api("/v1/sweeps/latest", token=None)[0] == 401
        assert ferry.api("/v1/sweeps/latest")[0] == 404, "no sweep has run yet"

        # A committed backup, and a folder without a manifest.
        committed = ferry.webhook_job("kept", timeout=120)
        assert committed["phase"] == "committed", committed
        (manifest,) = ferry.backups("kept")
        backup_keys = {a["key"] for a in manifest["artifacts"]} | {a["key"].rsplit("/", 1)[0] + "/manifest.json"
                                                                  for a in manifest["artifacts"]}
        ferry.r2_put(STRAY + "stray.bin", b"x" * 1000)
        start_ms = int(time.time() * 1000)

        # 12 hours later: everything is younger than a day; nothing goes.
        report = fire(ferry, start_ms + 12 * HOUR_MS)
        assert report["removed"] == [] and report["uploads_aborted"] == [], report
        assert report["committed_folders"] == 1 and report["fresh_folders"] == 1, report
        assert STRAY + "stray.bin" in r2_objects(ferry)

        # A copy killed mid-way whose job then ends without cleaning up.
        emulator.control(throttle_kib_per_s=2048)
        status, _, payload = ferry.webhook("orphaned")
        assert status == 202, payload
        job_id = payload["job"]["id"]
        copy = wait_for_volume_part(ferry, job_id)
        upload_id = copy["upload_id"]
        folder = copy["key"].rsplit("/", 1)[0] + "/"
        ferry.stop(kill=True)
        emulator.control(throttle_kib_per_s=0)
        assert do_keys(ferry, f"upload:{job_id}:") == [f"upload:{job_id}:{upload_id}"], "the open upload is recorded"
        lose_job_record(ferry, job_id)
        ferry.start()
        deadline = time.time() + 60
        while ferry.source("orphaned")["current_job_id"] is not None and time.time() < deadline:
            time.sleep(0.5)
        assert ferry.source("orphaned")["current_job_id"] is None, "the job without a record is released"
        assert r2_upload_state(ferry, upload_id) == 0, "the upload is still open"
        leftovers = [k for k in r2_objects(ferry) if k.startswith(folder)]
        assert leftovers, "the killed job's first file is in its folder"

        # Two days later (00:30 UTC): the stray folder, the killed job's folder and its upload go.
        sweep_day_ms = (start_ms // DAY_MS + 2) * DAY_MS + 30 * 60 * 1000
        report = fire(ferry, sweep_day_ms)
        objects = r2_objects(ferry)
        assert not [k for k in objects if k.startswith(STRAY) or k.startswith(folder)], objects
        assert r2_upload_state(ferry, upload_id) == 2, "the recorded upload was aborted"
        assert do_keys(ferry, "upload:") == [], "its record is settled"
        assert backup_keys <= set(objects), "the committed backup is whole"
        assert [b["job_id"] for b in ferry.backups("kept")] == [committed["id"]]
        for art in manifest["artifacts"]:
            assert len(ferry.artifact(art["key"])[1]) == art["size"]

        removed = {r["folder"]: r for r in report["removed"]}
        assert set(removed) == {STRAY, folder}, report
        assert removed[STRAY]["keys"] == [STRAY + "stray.bin"] and removed[STRAY]["bytes"] == 1000
        assert removed[STRAY]["reason"] == "stale"
        assert sorted(removed[folder]["keys"]) == sorted(leftovers)
        (aborted,) = report["uploads_aborted"]
        assert aborted["upload_id"] == upload_id and aborted["source"] == "orphaned" and aborted["job_id"] == job_id
        assert report["objects_removed"] == 1 + len(leftovers) and report["errors"] == [], report
        assert report["committed_folders"] == 1
        report_key = f"_ferry/sweeps/{report['day']}.json"
        assert report_key in objects, "the report is stored in R2"
        assert ferry.backups("kept")[0]["job_id"] == committed["id"], "backup listings ignore the report"

        # The same UTC day again: no second sweep, even with an old-looking stray folder.
        ferry.r2_put(STRAY + "again.bin", b"y" * 10)
        ferry.scheduled(CRON, at_ms=sweep_day_ms + 10 * 60 * 1000)
        time.sleep(2)
        assert json.loads(ferry.api("/v1/sweeps/latest")[2]) == report
        assert STRAY + "again.bin" in r2_objects(ferry)
        logs = "".join(p.read_text(errors="replace") for p in (ferry.workdir / "wrangler-logs").glob("*.log"))
        assert f"sweep: {report['day']} was already swept" in logs
    finally:
        ferry.stop()


def test_the_sweep_walks_each_replica_bucket_after_the_primary_and_keeps_the_replicas(world):
    emulator = world["emulator"]
    replica = {"bucket_binding": "BACKUPS_REPLICA"}
    ferry = Ferry(world["work"] / "sweep-replica", [dxp_source("copied", emulator, replica=replica)],
                  secrets=DXP_SECRETS)
    try:
        export = ferry.webhook_job("copied", timeout=120)
        assert export["phase"] == "committed", export
        (child,) = export["children"]
        assert ferry.wait_job(child, timeout=120)["phase"] == "committed"
        (manifest,) = ferry.backups("copied")
        folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
        replica_manifest = ferry.r2_get(folder + "manifest.json", bucket="ferry-backups-replica")
        assert replica_manifest is not None
        stray = "copied/2026-01-01T000000Z-00000000000000f2/"
        ferry.r2_put(stray + "half.bin", b"z" * 2000, bucket="ferry-backups-replica")

        sweep_day_ms = (int(time.time() * 1000) // DAY_MS + 2) * DAY_MS + 30 * 60 * 1000
        report = fire(ferry, sweep_day_ms)
        assert ferry.r2_get(stray + "half.bin", bucket="ferry-backups-replica") is None, "the stray replica folder went"
        assert [r["folder"] for r in report["removed"]] == [stray], report
        assert report["errors"] == [] and report["committed_folders"] == 2, "one backup in each bucket"
        assert ferry.r2_get(folder + "manifest.json", bucket="ferry-backups-replica") == replica_manifest
        for art in manifest["artifacts"]:
            assert len(ferry.r2_get(art["key"], bucket="ferry-backups-replica")) == art["size"]
            assert len(ferry.artifact(art["key"])[1]) == art["size"], "the primary backup is whole"
    finally:
        ferry.stop()
