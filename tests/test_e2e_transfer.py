"""End to end: the sliced, resumable copy engine under `wrangler dev`.

Slices are forced tiny (one 5 MiB part per slice) so a 60 MiB DXP volume takes twelve slices, each
in its own alarm invocation; the runtime is SIGKILLed between slices, the source ignores ranges,
replaces the object mid-copy, or never lets a part finish. The emulator's request log shows what
each slice asked for.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request

import pytest

from harness import DXP_SECRETS, DXP_USER_TOKEN, DxpEmulator, Ferry, dxp_source

PART = 5 * 1024 * 1024
VERIFY_TICK = 1893470400000  # 2030-01-01T04:00:00Z
ONE_PART_PER_SLICE = {"part_size_mib": 5, "slice_max_mib": 5, "parts_in_flight": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("transfer-e2e")
    emulator = DxpEmulator(work, volume_mib=60, backups=1)
    yield {"emulator": emulator, "work": work}
    emulator.stop()


@pytest.fixture(autouse=True)
def clean(world):
    world["emulator"].reset()


def volume_requests(emulator) -> list:
    return [r for r in emulator.state()["requests"] if "/backup/download/volume/" in r["path"]]


def wait_for_parts(ferry: Ferry, job_id: str, more_than: int, timeout: float = 60) -> int:
    """Waits until the volume's copy has stored more than `more_than` parts; returns the count."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = ferry.job(job_id)
        copy = job.get("copy") or {}
        if job["phase"] in ("committed", "failed"):
            raise AssertionError(f"the job ended before the kill: {job}")
        if copy.get("key", "").endswith("volume.tgz") and copy.get("parts_stored", 0) > more_than:
            return copy["parts_stored"]
        time.sleep(0.1)
    raise AssertionError(f"no new part within {timeout} s: {ferry.job(job_id)}")


def check_volume(ferry: Ferry, job: dict, backup: dict) -> dict:
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups(job["source"]) if m["job_id"] == job["id"]]
    (art,) = [a for a in manifest["artifacts"] if a["filename"] == "volume.tgz"]
    headers, body = ferry.artifact(art["key"])
    assert len(body) == backup["volume"]["size"]
    assert hashlib.sha256(body).hexdigest() == backup["volume"]["sha256"] == art["sha256"], "volume differs"
    assert art["parts"] == len(art["part_sha256"]) == -(-len(body) // PART)
    for i, part_hash in enumerate(art["part_sha256"]):
        assert part_hash == hashlib.sha256(body[i * PART:(i + 1) * PART]).hexdigest(), f"part {i + 1}"
    return art


def test_copy_survives_five_kills_between_slices_and_resumes_from_the_persisted_offset(world):
    emulator = world["emulator"]
    ferry = Ferry(world["work"] / "kills", [dxp_source("killed", emulator, **ONE_PART_PER_SLICE)], secrets=DXP_SECRETS)
    try:
        emulator.control(throttle_kib_per_s=2048)  # about 2.5 s per 5 MiB slice
        status, _, payload = ferry.webhook("killed")
        assert status == 202, payload
        job_id = payload["job"]["id"]
        parts = 0
        for _ in range(5):
            parts = wait_for_parts(ferry, job_id, parts)
            ferry.restart(kill=True)
        emulator.control(throttle_kib_per_s=0)
        job = ferry.wait_job(job_id, timeout=120)
        art = check_volume(ferry, job, emulator.backup())
        parts = art["parts"]

        requests = [r for r in volume_requests(emulator) if r["status"] in (200, 206)]
        assert requests[0]["range"] is None and requests[0]["status"] == 200
        starts = []
        for r in requests[1:]:
            assert r["status"] == 206, r
            assert r["range"].startswith("bytes=") and r["range"].endswith("-"), r
            assert r["if_range"], "a resumed slice sends If-Range"
            start = int(r["range"][len("bytes="):-1])
            assert start % PART == 0 and start == r["served_start"], r
            starts.append(start)
        assert starts == sorted(starts), f"a slice went back to bytes already stored: {starts}"
        assert len(set(starts)) == parts - 1, f"one resumed request per stored part boundary: {starts}"
    finally:
        ferry.stop()


def test_a_source_that_ignores_ranges_restarts_from_zero_and_still_commits(world):
    emulator = world["emulator"]
    ferry = Ferry(world["work"] / "norange", [dxp_source("norange", emulator, **ONE_PART_PER_SLICE)], secrets=DXP_SECRETS)
    try:
        emulator.control(ignore_range=True)
        job = ferry.webhook_job("norange", timeout=120)
        check_volume(ferry, job, emulator.backup())
        assert any("ignored the range" in r for r in job.get("restarts", [])), job
        answered_whole = [r for r in volume_requests(emulator) if r["range"] and r["status"] == 200]
        assert answered_whole, "a range request was answered with the whole object"
    finally:
        ferry.stop()


def test_an_object_replaced_mid_copy_restarts_from_zero(world):
    emulator = world["emulator"]
    ferry = Ferry(world["work"] / "etag", [dxp_source("replaced", emulator, **ONE_PART_PER_SLICE)], secrets=DXP_SECRETS)
    try:
        emulator.control(throttle_kib_per_s=4096)
        status, _, payload = ferry.webhook("replaced")
        job_id = payload["job"]["id"]
        wait_for_parts(ferry, job_id, 0)
        emulator.control(etag_generation=1, throttle_kib_per_s=0)
        job = ferry.wait_job(job_id, timeout=120)
        check_volume(ferry, job, emulator.backup())
        assert any("ETag changed" in r for r in job.get("restarts", [])), job
    finally:
        ferry.stop()


def test_a_copy_that_never_stores_a_part_fails_within_the_watchdog_and_frees_the_source(world):
    emulator = world["emulator"]
    source = dxp_source("stuck", emulator, max_stalled_slices=3, **ONE_PART_PER_SLICE)
    source["retry"] = {"max_attempts": 50, "base_ms": 100, "max_delay_ms": 200}
    ferry = Ferry(world["work"] / "stuck", [source], secrets=DXP_SECRETS)
    try:
        emulator.control(truncate_after_bytes=1024 * 1024)  # every download dies before a part is full
        job = ferry.webhook_job("stuck", timeout=120)
        assert job["phase"] == "failed", job
        assert "no progress in 3 consecutive slices" in job["error"], job["error"]
        assert ferry.backups("stuck") == []
        emulator.control(truncate_after_bytes=0)
        status, _, payload = ferry.webhook("stuck")
        assert status == 202, payload
        job = ferry.wait_job(payload["job"]["id"], timeout=120)
        check_volume(ferry, job, emulator.backup())
    finally:
        ferry.stop()


def test_verify_reads_a_backup_back_and_an_altered_object_fails_naming_its_key(world):
    emulator = world["emulator"]
    small = {"part_size_mib": 5, "slice_max_mib": 5}
    source = dxp_source("checked", emulator, verify_schedule="0 4 * * *", **small)
    ferry = Ferry(world["work"] / "verify", [source], secrets=DXP_SECRETS)
    try:
        job = ferry.webhook_job("checked", timeout=120)
        art = check_volume(ferry, job, emulator.backup())
        (backup,) = ferry.backups("checked")
        assert backup["verification"] is None, "never verified yet"

        verified = ferry.verify_job("checked", timeout=120)
        assert verified["phase"] == "verified", verified
        assert verified["verify"]["slices"] >= 12, "60 MiB read back in 5 MiB slices"
        (backup,) = ferry.backups("checked")
        assert backup["verification"]["outcome"] == "ok"
        assert backup["verification"]["job_id"] == verified["id"] and backup["verification"]["verified_at"]

        ferry.scheduled("*/5 * * * *", at_ms=VERIFY_TICK)  # only verify_schedule is due at 04:00
        deadline = time.time() + 60
        while (ferry.source("checked")["last_job"] or {}).get("id") == verified["id"] and time.time() < deadline:
            time.sleep(0.2)
        scheduled = ferry.wait_job(ferry.source("checked")["last_job"]["id"], timeout=120)
        assert scheduled["task"] == "verify" and scheduled["trigger"] == "cron", scheduled
        assert scheduled["phase"] == "verified", scheduled
        assert ferry.backups("checked")[0]["verification"]["job_id"] == scheduled["id"]

        headers, body = ferry.artifact(art["key"])
        altered = bytearray(body)
        altered[12345] ^= 0xFF
        ferry.r2_put(art["key"], bytes(altered))
        folder = art["key"].rsplit("/", 1)[0]
        failed = ferry.verify_job("checked", body=json.dumps({"backup": folder}).encode(), timeout=120)
        assert failed["phase"] == "failed", failed
        assert art["key"] in failed["error"] and "SHA-256" in failed["error"], failed["error"]
        (backup,) = ferry.backups("checked")
        assert backup["verification"]["outcome"] == "mismatch"
        assert backup["verification"]["mismatches"][0].startswith(art["key"])

        status, _, payload = ferry.webhook("checked", body=b'{"backup": "someone-else/x"}', action="verify")
        assert status == 400 and "not a backup of" in payload["error"], payload
    finally:
        ferry.stop()


def test_a_job_whose_source_is_removed_fails_cleans_up_and_frees_the_source(world):
    emulator = world["emulator"]
    source = dxp_source("removed", emulator, **ONE_PART_PER_SLICE)
    ferry = Ferry(world["work"] / "removed", [source], secrets=DXP_SECRETS)
    try:
        emulator.control(throttle_kib_per_s=2048)
        status, _, payload = ferry.webhook("removed")
        job_id = payload["job"]["id"]
        wait_for_parts(ferry, job_id, 0)
        ferry.stop(kill=True)
        ferry.write_config([dxp_source("other", emulator)])  # "removed" is gone from the config
        ferry.start()
        deadline = time.time() + 60
        before = len(volume_requests(emulator))
        time.sleep(20)  # the job's alarm fires (the watchdog re-arms within 15 s) and stops it
        assert len(volume_requests(emulator)) - before <= 1, "the removed source's copy went on"
        # Still findable by id while its source is gone, failed with a clear message.
        job = ferry.job(job_id)
        assert job["phase"] == "failed", job
        assert "no longer configured" in job["error"], job["error"]
        ferry.stop()
        ferry.write_config([source])  # back again: nothing of the stopped copy remains
        ferry.start()
        assert ferry.backups("removed") == []
        emulator.control(throttle_kib_per_s=0)
        status, _, payload = ferry.webhook("removed")
        assert status == 202 and time.time() < deadline + 120, payload
        check_volume(ferry, ferry.wait_job(payload["job"]["id"], timeout=120), emulator.backup())
    finally:
        ferry.stop()


def served_volume(emulator) -> bytes:
    """The volume as the emulator serves it now (after any replacement)."""
    url = f"{emulator.url}/backup/download/volume/{emulator.backup()['backupId']}"
    req = urllib.request.Request(url, headers={"dxpcloud-authorization": f"Bearer {DXP_USER_TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read()


@pytest.fixture(scope="module")
def lean(world):
    """One Worker for the copies that cannot resume and the object replaced by a shorter one."""
    emulator = world["emulator"]
    sources = [dxp_source("whole", emulator, slice_max_seconds=1, **ONE_PART_PER_SLICE),
               dxp_source("shrunk", emulator, **ONE_PART_PER_SLICE)]
    ferry = Ferry(world["work"] / "lean", sources, secrets=DXP_SECRETS)
    yield ferry
    ferry.stop()


def test_a_source_that_supports_no_ranges_is_copied_in_one_slice_past_the_slice_budget(world, lean):
    emulator = world["emulator"]
    # 60 MiB at 8 MiB/s: about 7.5 s, many times the 1 s and 5 MiB a slice may take.
    emulator.control(accept_ranges_none=True, throttle_kib_per_s=8192)
    started = time.time()
    job = lean.webhook_job("whole", timeout=120)
    assert time.time() - started > 5, "the source was throttled"
    check_volume(lean, job, emulator.backup())
    assert job.get("restarts", []) == [], f"the copy restarted: {job.get('restarts')}"
    volume = [r for r in volume_requests(emulator) if r["status"] in (200, 206)]
    assert [(r["status"], r["range"]) for r in volume] == [(200, None)], "one download, from zero to the end"


def test_an_object_replaced_by_one_as_long_as_the_copied_bytes_is_copied_again_not_committed_cut(world, lean):
    emulator = world["emulator"]
    # No validators, so no If-Range: the resumed range is served from whatever object is there now.
    emulator.control(no_validators=True, throttle_kib_per_s=4096)
    status, _, payload = lean.webhook("shrunk")
    assert status == 202, payload
    job_id = payload["job"]["id"]
    wait_for_parts(lean, job_id, 1)
    emulator.control(throttle_kib_per_s=1)  # the part in flight cannot finish: the offset holds
    time.sleep(1)
    offset = lean.job(job_id)["copy"]["offset"]
    lean.restart(kill=True)  # the resumed request asks for bytes from `offset`
    emulator.control(replaced_size=offset, throttle_kib_per_s=0)
    job = lean.wait_job(job_id, timeout=120)
    assert job["phase"] == "committed", job
    replaced = served_volume(emulator)
    assert len(replaced) == offset
    (manifest,) = [m for m in lean.backups("shrunk") if m["job_id"] == job_id]
    (art,) = [a for a in manifest["artifacts"] if a["filename"] == "volume.tgz"]
    _, body = lean.artifact(art["key"])
    assert hashlib.sha256(body).hexdigest() == art["sha256"] == hashlib.sha256(replaced).hexdigest(), \
        "the backup holds the old object's first bytes, not the object the source now serves"
    assert any("416" in r for r in job.get("restarts", [])), job.get("restarts")
    refused = [r for r in volume_requests(emulator) if r["status"] == 416]
    assert refused and refused[0]["range"] == f"bytes={offset}-", refused
