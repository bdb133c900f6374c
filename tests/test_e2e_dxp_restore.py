"""End to end: DXP Cloud restores by the built Worker under `wrangler dev`: a backup's database and
volume archives go back to the backup service emulator as one streamed `multipart/form-data`
upload, which becomes a new backup of type `Uploaded`.

The volume spans several multipart parts in R2 (part_size_mib = 5, a 12 MiB volume), so the
upload streams multi-part objects out of R2 into one request of known length.
"""

from __future__ import annotations

import json

import pytest

from harness import DXP_SECRETS, DxpEmulator, Ferry, dxp_source

PART_MIB = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("dxp-restore-e2e")
    emulator = DxpEmulator(work, volume_mib=12, backups=2)
    ferry = Ferry(work / "ferry", [dxp_source("portal", emulator, part_size_mib=PART_MIB)], secrets=DXP_SECRETS)
    original = emulator.backup(-1)
    job = ferry.webhook_job("portal", timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("portal") if m["job_id"] == job["id"]]
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    yield {"ferry": ferry, "emulator": emulator, "original": original, "manifest": manifest, "folder": folder}
    ferry.stop()
    emulator.stop()


@pytest.fixture(autouse=True)
def clean(world):
    world["emulator"].reset()


def restore(world, body: dict, folder: str | None = None):
    return world["ferry"].restore(folder or world["folder"], body)


def restored(world, body: dict | None = None, timeout: float = 120) -> dict:
    status, answer = restore(world, body or {})
    assert status == 202, answer
    return world["ferry"].wait_job(answer["job"]["id"], timeout=timeout)


def uploaded(world) -> list:
    return [b for b in world["emulator"].state()["backups"] if b["type"] == "Uploaded"]


def upload_requests(world) -> list:
    return [r for r in world["emulator"].state()["requests"] if r["path"] == "/backup/upload"]


def test_the_volume_spans_several_parts_in_r2(world):
    by_name = {a["filename"]: a for a in world["manifest"]["artifacts"]}
    assert by_name["volume.tgz"]["parts"] > 1, "the volume must span more than one part"


def test_a_restore_uploads_both_archives_byte_for_byte_as_a_new_uploaded_backup(world):
    job = restored(world)
    assert job["phase"] == "restored", job
    (new,) = uploaded(world)
    original = world["original"]
    assert new["database"]["sha256"] == original["database"]["sha256"]
    assert new["volume"]["sha256"] == original["volume"]["sha256"]
    assert new["volume"]["size"] == original["volume"]["size"]
    assert new["upload"]["chunked"] is False and new["upload"]["content_length"] > original["volume"]["size"]
    assert new["upload"]["filenames"] == {"database": "database.gz", "volume": "volume.tgz"}
    listed = [b["backupId"] for b in world["emulator"].state()["backups"]]
    assert new["backupId"] in listed
    note = job["note"]
    assert new["backupId"] in note and "Restore to" in note and "nothing was overwritten" in note, note
    assert [r["status"] for r in upload_requests(world)] == [200]


def test_a_second_restore_right_after_waits_out_the_services_interval(world):
    world["emulator"].control(upload_interval_s=4)
    first = restored(world)
    assert first["phase"] == "restored", first
    second = restored(world, timeout=60)
    assert second["phase"] == "restored", second
    assert len(uploaded(world)) == 2
    uploads = upload_requests(world)
    assert [r["status"] for r in uploads][0] == 200 and uploads[-1]["status"] == 200
    assert 429 in [r["status"] for r in uploads], "the second upload came within the interval and was refused"
    accepted = [r["t"] for r in uploads if r["status"] == 200]
    assert accepted[1] - accepted[0] >= 3.5
    assert second["error"] is None


def test_an_upload_refused_by_the_service_fails_the_job_with_its_message(world):
    world["emulator"].control(faults=[{"step": "upload", "fault": "provider_error", "times": 1}])
    job = restored(world)
    assert job["phase"] == "failed", job
    assert "HTTP 400" in job["error"] and "GCS enabled for Document Library Store" in job["error"], job["error"]
    assert uploaded(world) == []
    assert len(upload_requests(world)) == 1, "a refusal is not retried"


def test_an_expired_user_token_fails_the_restore_naming_the_secret_to_renew(world):
    world["emulator"].control(expired_tokens=True)
    job = restored(world)
    assert job["phase"] == "failed", job
    assert "user token in the Worker secret DXP_USER_TOKEN has expired (HTTP 401: Token expired)" in job["error"], job
    assert "wrangler secret put DXP_USER_TOKEN" in job["error"], job
    assert not upload_requests(world) and not uploaded(world)


def test_a_backup_without_a_volume_fails_clearly_without_uploading(world):
    ferry, manifest = world["ferry"], dict(world["manifest"])
    folder = "portal/2026-01-01T000000Z-00000000000000ff/"
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["filename"] == "database.gz"]
    ferry.r2_put(folder + "manifest.json", json.dumps(manifest).encode())
    status, answer = restore(world, {}, folder=folder)
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "failed", job
    assert "volume archive" in job["error"] and "nothing was uploaded" in job["error"], job["error"]
    assert upload_requests(world) == []


def test_drills_and_targets_are_refused_before_anything_starts(world):
    status, answer = restore(world, {"target": {"database_id": "x"}})
    assert status == 400 and "target" in answer["error"]
    status, answer = restore(world, {"mode": "overwrite"})
    assert status == 400 and "upload" in answer["error"]
    status, answer = world["ferry"].api_post("/v1/sources/portal/drill", {})
    assert status == 400 and "no restore drill" in answer["error"]
