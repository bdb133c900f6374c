"""End to end: a second copy outside Cloudflare, in an S3-compatible bucket.

The built Worker under `wrangler dev` copies each committed DXP backup (`database.gz` of 6 MiB and
`volume.tgz` of 24 MiB, 5 MiB parts and slices) into a bucket of a real S3-compatible server that
checks every request's SigV4 signature and the key's IAM policy (moto's server, see
tests/s3_server.py), given as `replica = { endpoint, region, bucket, credentials_secret }`. The
bucket is read back behind Ferry's back with boto3.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from harness import DXP_SECRETS, DxpEmulator, Ferry, dxp_source
from s3_server import S3Server
from test_e2e_replica import (between_volume_parts, manifest_of, replica_of, replicate_killed_between_slices,
                              tamper_first_file)
from test_e2e_sweep import DAY_MS, do_keys, fire, lose_job_record

SMALL = {"part_size_mib": 5, "slice_max_mib": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("replica-s3-e2e")
    s3 = S3Server(work, part_delay_s=0.3)  # 0.3 s a part: the tests see a copy between its parts
    emulator = DxpEmulator(work, volume_mib=24, backups=3, database_kib=6 * 1024)

    def replica(secret: str) -> dict:
        return {"endpoint": s3.endpoint, "region": s3.region, "bucket": s3.bucket, "credentials_secret": secret}

    sources = [
        dxp_source("portal", emulator, replica=replica("S3_KEYS"), **SMALL),
        dxp_source("portal-tampered", emulator, replica=replica("S3_KEYS"), **SMALL),
        dxp_source("portal-kept", emulator, replica=replica("S3_KEYS"), retention={"keep_last": 1}, **SMALL),
        dxp_source("portal-wrong-secret", emulator, replica=replica("S3_WRONG_KEYS"), **SMALL),
        dxp_source("portal-swept", emulator, replica=replica("S3_KEYS"), **SMALL),
    ]
    secrets = {
        **DXP_SECRETS,
        "S3_KEYS": f"{s3.access_key_id}:{s3.secret_access_key}",
        "S3_WRONG_KEYS": f"{s3.access_key_id}:{s3.secret_access_key[:-4]}XXXX",
    }
    ferry = Ferry(work / "ferry", sources, secrets=secrets)
    yield {"ferry": ferry, "emulator": emulator, "s3": s3}
    ferry.stop()
    emulator.stop()
    s3.stop()


@pytest.fixture(autouse=True)
def clean(world):
    world["emulator"].reset()


def folder_of(manifest: dict) -> str:
    return manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"


def check_replica(world, export: dict, replica: dict) -> None:
    """Every file of the backup is byte-identical in the S3 bucket, and the replica's manifest
    there is the primary's plus `replica_of`."""
    ferry, s3 = world["ferry"], world["s3"]
    assert replica["task"] == "replicate" and replica["phase"] == "committed", replica
    folder = folder_of(manifest_of(ferry, export))
    copy = json.loads(s3.get(folder + "manifest.json"))
    note = copy.pop("replica_of")
    assert note["manifest_key"] == folder + "manifest.json" and note["replica_job_id"] == replica["id"], note
    assert copy == json.loads(ferry.r2_get(folder + "manifest.json")), "the primary's manifest, plus replica_of"
    assert len(copy["artifacts"]) == 2
    for art in copy["artifacts"]:
        mine, theirs = s3.get(art["key"]), ferry.r2_get(art["key"])
        assert mine == theirs, f"{art['key']} differs between R2 and S3"
        assert hashlib.sha256(mine).hexdigest() == art["sha256"] and len(mine) == art["size"]
    assert sorted(s3.keys(folder)) == sorted([a["key"] for a in copy["artifacts"]] + [folder + "manifest.json"])
    assert s3.open_uploads() == [], "every multipart upload was completed"


def test_an_s3_replica_lands_byte_identical_with_its_own_manifest_after_a_kill_between_slices(world):
    # The runtime is killed once the replica stored a part of the volume in S3; the same S3
    # upload goes on.
    export, replica = replicate_killed_between_slices(world["ferry"], "portal")
    check_replica(world, export, replica)
    # Every request Ferry sent was signed and accepted: the server refused none.
    refused = [r for r in world["s3"].requests_log() if r[2] in (401, 403)]
    assert refused == [], refused


def test_a_wrong_secret_is_refused_by_the_s3_service_and_fails_the_replica_saying_so(world):
    ferry, s3 = world["ferry"], world["s3"]
    export = ferry.webhook_job("portal-wrong-secret", timeout=240)
    replica = ferry.wait_job(replica_of(ferry, export), timeout=60)
    assert replica["phase"] == "failed", replica
    assert "SignatureDoesNotMatch" in replica["error"], replica["error"]
    assert "S3_WRONG_KEYS" not in replica["error"] or "XXXX" not in replica["error"], "the secret never shows"
    assert ferry.job(export["id"])["phase"] == "committed", "the primary backup is untouched"
    assert s3.keys(folder_of(manifest_of(ferry, export))) == [], "nothing was written with the wrong key"


def test_a_tampered_primary_fails_the_s3_replica_naming_the_file_and_leaves_nothing_there(world):
    ferry, s3 = world["ferry"], world["s3"]
    export_id, database = tamper_first_file(ferry, world["emulator"], "portal-tampered")
    export = ferry.wait_job(export_id, timeout=240)
    replica = ferry.wait_job(replica_of(ferry, export), timeout=240)
    assert replica["phase"] == "failed", replica
    assert database["key"] in replica["error"] and "SHA-256" in replica["error"], replica["error"]
    folder = database["key"].rsplit("/", 1)[0] + "/"
    assert s3.keys(folder) == [], "the failed replica's files were removed from S3"
    assert s3.open_uploads() == [], "its multipart upload was aborted"
    assert ferry.job(export["id"])["phase"] == "committed", "the primary backup itself is untouched"


def test_retention_applies_to_the_s3_replica_too(world):
    ferry, emulator, s3 = world["ferry"], world["emulator"], world["s3"]
    folders = []
    for index in (0, 1):
        body = json.dumps({"backup_id": emulator.backup(index)["backupId"]}).encode()
        export = ferry.webhook_job("portal-kept", body=body, timeout=240)
        ferry.wait_job(replica_of(ferry, export), timeout=240)
        folders.append(folder_of(manifest_of(ferry, export)))
    # keep_last = 1: once the second replica committed, the first backup goes from S3 too.
    deadline = time.time() + 60
    while s3.keys(folders[0]):
        assert time.time() < deadline, s3.keys(folders[0])
        time.sleep(0.5)
    assert folders[1] + "manifest.json" in s3.keys(folders[1])
    assert ferry.r2_get(folders[1] + "manifest.json") is not None


def test_the_daily_sweep_aborts_an_s3_replicas_upload_its_job_left_open(world):
    """A replicate job killed mid-copy whose record is then lost (see tests/test_e2e_sweep.py)
    leaves its S3 multipart upload open; the sweep two days later aborts it in the S3 bucket."""
    ferry, s3 = world["ferry"], world["s3"]
    export = ferry.webhook_job("portal-swept", timeout=240)
    replica_id = replica_of(ferry, export)
    open_copy = between_volume_parts(ferry, replica_id)
    assert open_copy, "the replica was never seen between slices"
    ferry.stop(kill=True)
    upload = (open_copy["key"], open_copy["upload_id"])
    assert do_keys(ferry, f"upload:{replica_id}:") == [f"upload:{replica_id}:{open_copy['upload_id']}"]
    lose_job_record(ferry, replica_id)
    ferry.start()
    deadline = time.time() + 60
    while ferry.source("portal-swept")["current_job_id"] is not None:
        assert time.time() < deadline, "the job without a record is released"
        time.sleep(0.5)
    assert upload in s3.open_uploads(), "the S3 upload is still open"
    # A stray folder of a source in the S3 bucket (no manifest), and what the killed job stored.
    stray = "portal-swept/2026-01-01T000000Z-00000000000000f1/"
    s3.put(stray + "stray.bin", b"x" * 1000)
    folder = open_copy["key"].rsplit("/", 1)[0] + "/"
    leftovers = s3.keys(folder)
    assert leftovers, "the killed job's first file is in its folder"
    committed = [k for k in s3.keys() if k.endswith("/manifest.json")]
    backups = [k for k in s3.keys() if any(k.startswith(m.rsplit("/", 1)[0] + "/") for m in committed)]
    now_ms = int(time.time() * 1000)
    report = fire(ferry, (now_ms // DAY_MS + 2) * DAY_MS + 30 * 60 * 1000)
    assert upload not in s3.open_uploads(), "the sweep aborted the upload in the S3 bucket"
    # The walk of the S3 bucket removed the stray folder and the killed job's, and kept every backup.
    assert s3.keys(stray) == [] and s3.keys(folder) == [], s3.keys()
    assert set(backups) <= set(s3.keys()), "every replica with a manifest is whole"
    removed = {r["folder"] for r in report["removed"]}
    assert {stray, folder} <= removed, report
    aborted = [a for a in report["uploads_aborted"] if a["upload_id"] == open_copy["upload_id"]]
    assert aborted and aborted[0]["job_id"] == replica_id, report
    assert do_keys(ferry, f"upload:{replica_id}:") == [], "its record is settled"
