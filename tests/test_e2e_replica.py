"""End to end: the second copy (`replica`), by the built Worker under `wrangler dev`.

A DXP source (two files per backup: `database.gz` of 6 MiB and `volume.tgz` of 24 MiB) copies
with 5 MiB parts and 5 MiB slices, with `replica = { bucket_binding = "BACKUPS_REPLICA" }`. After
the export commits, its replicate job (the export's child) copies every file from the primary
bucket into the local `ferry-backups-replica` bucket; both buckets are read back behind Ferry's
back with wrangler's own R2 CLI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import DXP_SECRETS, DxpEmulator, Ferry, dxp_source

REPLICA = {"bucket_binding": "BACKUPS_REPLICA"}
SMALL = {"part_size_mib": 5, "slice_max_mib": 5}
HOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


class Alerts:
    """A webhook receiver keeping every alert Ferry delivers."""

    def __init__(self):
        self.payloads: list[dict] = []
        received = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers.get("content-length") or 0))))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, predicate, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in list(self.payloads):
                if predicate(p):
                    return p
            time.sleep(0.2)
        raise AssertionError(f"no such alert among {self.payloads}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("replica-e2e")
    emulator = DxpEmulator(work, volume_mib=24, backups=3, database_kib=6 * 1024)
    sources = [
        dxp_source("portal", emulator, replica=REPLICA, **SMALL),
        dxp_source("portal-tampered", emulator, replica=REPLICA, **SMALL),
        dxp_source("portal-kept", emulator, replica=REPLICA, retention={"keep_last": 1}, **SMALL),
        dxp_source("portal-single", emulator, **SMALL),
        dxp_source("portal-unbound", emulator, replica={"bucket_binding": "BACKUPS_NOWHERE"}, **SMALL),
        # A second binding to the primary's own bucket: its name passes, its bucket must not.
        dxp_source("portal-aliased", emulator, replica={"bucket_binding": "BACKUPS_ALIAS"}, **SMALL),
    ]
    alerts = Alerts()
    hook = {"name": "ops", "kind": "webhook", "url": alerts.url, "secret_secret": "HOOK_SECRET", "events": ["failed"]}
    ferry = Ferry(work / "ferry", sources, secrets={**DXP_SECRETS, "HOOK_SECRET": HOOK_SECRET}, alerts=[hook],
                  r2_aliases={"BACKUPS_ALIAS": "ferry-backups"})
    yield {"ferry": ferry, "emulator": emulator, "alerts": alerts}
    ferry.stop()
    emulator.stop()
    alerts.server.shutdown()


@pytest.fixture(autouse=True)
def clean(world):
    world["emulator"].reset()


def replica_of(ferry: Ferry, export: dict) -> str:
    assert export["phase"] == "committed", export
    (child,) = export["children"]
    return child


def manifest_of(ferry: Ferry, export: dict) -> dict:
    (manifest,) = [m for m in ferry.backups(export["source"]) if m["job_id"] == export["id"]]
    return manifest


def check_replica(ferry: Ferry, export: dict, replica: dict) -> dict:
    """Every file of the export's backup is byte-identical in the replica bucket, and the
    replica's manifest is the primary's with `replica_of`."""
    assert replica["task"] == "replicate" and replica["phase"] == "committed", replica
    manifest = manifest_of(ferry, export)
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    raw = ferry.r2_get(folder + "manifest.json", bucket="ferry-backups-replica")
    assert raw is not None, "the replica has its own manifest"
    copy = json.loads(raw)
    note = copy.pop("replica_of")
    assert note["manifest_key"] == folder + "manifest.json" and note["replica_job_id"] == replica["id"], note
    assert note["bucket_binding"] == "BACKUPS"
    primary = json.loads(ferry.r2_get(folder + "manifest.json"))
    assert copy == primary, "the replica's manifest is the primary's, plus replica_of"
    assert len(copy["artifacts"]) == 2
    for art in copy["artifacts"]:
        mine = ferry.r2_get(art["key"], bucket="ferry-backups-replica")
        theirs = ferry.r2_get(art["key"])
        assert mine is not None, art["key"]
        assert mine == theirs, f"{art['key']} differs between the buckets"
        assert hashlib.sha256(mine).hexdigest() == art["sha256"] and len(mine) == art["size"]
    return copy


def tamper_first_file(ferry: Ferry, emulator: DxpEmulator, source: str) -> tuple[str, dict]:
    """Starts an export of `source` and, once its first file (`database.gz`) is stored and while
    the volume still copies, alters that file in the primary bucket behind Ferry's back (same
    length). Returns the export's id and the altered file's artifact."""
    emulator.control(throttle_kib_per_s=2048)  # the volume takes about 12 s
    status, _, payload = ferry.webhook(source)
    assert status == 202, payload
    export_id = payload["job"]["id"]
    deadline = time.time() + 120
    while True:
        job = ferry.job(export_id)
        if job["artifacts"]:
            break
        assert time.time() < deadline and job["phase"] not in ("committed", "failed"), job
        time.sleep(0.1)
    (database,) = job["artifacts"]
    assert database["filename"] == "database.gz"
    original = ferry.r2_get(database["key"])
    ferry.r2_put(database["key"], bytes([original[0] ^ 0xFF]) + original[1:])
    emulator.control(throttle_kib_per_s=0)
    return export_id, database


def between_volume_parts(ferry: Ferry, replica_id: str, timeout: float = 120) -> dict | None:
    """Polls a replicate job until it has stored a part of the volume and has more to copy (between
    two of its slices); its copy state then, or `None` if it was never seen so."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = ferry.job(replica_id)
        copy = job.get("copy") or {}
        if job["phase"] == "transferring" and copy.get("key", "").endswith("volume.tgz") and copy["parts_stored"] >= 1:
            return copy
        assert job["phase"] in ("queued", "transferring"), job.get("error") or job
        time.sleep(0.02)
    return None


def replicate_killed_between_slices(ferry: Ferry, source: str) -> tuple[dict, dict]:
    """Backs up `source` and kills the runtime once its replica stored a part of the volume and
    has more to copy (between two of its slices); the replica resumes after the parts it stored,
    in the same upload, without restarting. Returns the export and the ended replica."""
    status, _, payload = ferry.webhook(source)
    assert status == 202, payload
    export = ferry.wait_job(payload["job"]["id"], timeout=240)
    replica_id = replica_of(ferry, export)
    killed = between_volume_parts(ferry, replica_id)
    assert killed, "the replica was never seen between slices"
    ferry.restart(kill=True)
    resumed = ferry.job(replica_id)
    if resumed["phase"] == "transferring":
        assert resumed["copy"]["parts_stored"] >= killed["parts_stored"], (killed, resumed["copy"])
        assert resumed["copy"]["upload_id"] == killed["upload_id"], "the same upload goes on"
    replica = ferry.wait_job(replica_id, timeout=240)
    assert replica["parent"] == export["id"]
    assert not replica.get("restarts"), replica["restarts"]
    return export, replica


def test_a_replica_lands_byte_identical_in_the_second_bucket_with_its_own_manifest_after_a_kill(world):
    ferry = world["ferry"]
    export, replica = replicate_killed_between_slices(ferry, "portal")
    check_replica(ferry, export, replica)
    # A trigger after the replica committed starts a job again (the replica held the source only
    # while it ran).
    history = ferry.source("portal")
    assert history["current_job_id"] is None, history


def test_a_tampered_primary_object_fails_the_replica_naming_it_and_leaves_nothing_in_the_second_bucket(world):
    ferry = world["ferry"]
    export_id, database = tamper_first_file(ferry, world["emulator"], "portal-tampered")
    export = ferry.wait_job(export_id, timeout=240)
    assert ferry.job(export_id)["phase"] == "committed", "the primary backup itself is untouched"
    replica = ferry.wait_job(replica_of(ferry, export), timeout=240)
    assert replica["phase"] == "failed", replica
    assert database["key"] in replica["error"] and "SHA-256" in replica["error"], replica["error"]
    folder = database["key"].rsplit("/", 1)[0] + "/"
    for name in ("database.gz", "volume.tgz", "manifest.json"):
        assert ferry.r2_get(folder + name, bucket="ferry-backups-replica") is None, f"{name} was left in the replica"
    # The failure is the source's latest job, reported as a replicate job, and raised the same
    # `failed` alert as a failed backup, saying it is the replica.
    last = ferry.source("portal-tampered")["last_job"]
    assert (last["id"], last["task"], last["phase"]) == (replica["id"], "replicate", "failed")
    alert = world["alerts"].wait(lambda p: p["data"].get("job_id") == replica["id"])
    assert alert["type"] == "ferry.backup.failed", alert
    assert alert["data"]["task"] == "replicate" and database["key"] in alert["data"]["error"], alert


def test_retention_applies_to_the_replica_bucket_too(world):
    ferry, emulator = world["ferry"], world["emulator"]
    folders = []
    for index in (0, 1):
        body = json.dumps({"backup_id": emulator.backup(index)["backupId"]}).encode()
        status, _, payload = ferry.webhook("portal-kept", body=body)
        assert status == 202, payload
        export = ferry.wait_job(payload["job"]["id"], timeout=240)
        replica = ferry.wait_job(replica_of(ferry, export), timeout=240)
        check_replica(ferry, export, replica)
        folders.append(manifest_of(ferry, export)["artifacts"][0]["key"].rsplit("/", 1)[0] + "/")
    # keep_last = 1: the first backup is gone from both buckets, the second stays in both (each
    # pass runs right after its commit, so it may still be under way).
    deadline = time.time() + 60
    while ferry.r2_get(folders[0] + "manifest.json", bucket="ferry-backups-replica") is not None:
        assert time.time() < deadline, "the replica's retention pass never deleted the older backup"
        time.sleep(0.5)
    assert ferry.r2_get(folders[0] + "manifest.json") is None
    assert ferry.r2_get(folders[0] + "volume.tgz", bucket="ferry-backups-replica") is None
    assert ferry.r2_get(folders[1] + "manifest.json", bucket="ferry-backups-replica") is not None


def test_the_daily_retention_pass_thins_the_replica_bucket_too(world, tmp_path):
    """Backups made before a policy existed are thinned in both buckets by the next day's pass."""
    emulator = world["emulator"]
    source = lambda **extra: dxp_source("portal-daily", emulator, schedule="0 0 1 1 *", replica=REPLICA, **SMALL, **extra)
    ferry = Ferry(tmp_path / "ferry", [source()], secrets=DXP_SECRETS)
    try:
        folders = []
        for index in (0, 1):
            body = json.dumps({"backup_id": emulator.backup(index)["backupId"]}).encode()
            export = ferry.webhook_job("portal-daily", body=body, timeout=240)
            replica = ferry.wait_job(replica_of(ferry, export), timeout=240)
            check_replica(ferry, export, replica)
            folders.append(manifest_of(ferry, export)["artifacts"][0]["key"].rsplit("/", 1)[0] + "/")
        ferry.stop()
        ferry.write_config([source(retention={"keep_last": 1})])
        ferry.start()
        # A tick at which no backup is due: its daily pass applies the new policy to both buckets.
        ferry.scheduled("*/5 * * * *", at_ms=int(time.time() * 1000) + 86_400_000)
        deadline = time.time() + 60
        while ferry.r2_get(folders[0] + "manifest.json", bucket="ferry-backups-replica") is not None:
            assert time.time() < deadline, f"the daily pass never thinned the replica bucket\n{ferry.log()}"
            time.sleep(0.5)
        assert ferry.r2_get(folders[0] + "manifest.json") is None, "and the primary"
        assert ferry.r2_get(folders[1] + "manifest.json", bucket="ferry-backups-replica") is not None
        assert ferry.r2_get(folders[1] + "manifest.json") is not None
        assert ferry.source("portal-daily")["last_job"]["task"] == "replicate", "the tick started no job"
    finally:
        ferry.stop()


def test_a_source_without_a_replica_queues_no_replicate_job(world):
    ferry = world["ferry"]
    status, _, payload = ferry.webhook("portal-single")
    assert status == 202, payload
    export = ferry.wait_job(payload["job"]["id"], timeout=240)
    assert export["phase"] == "committed" and export.get("children", []) == [], export
    folder = manifest_of(ferry, export)["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    assert ferry.r2_get(folder + "manifest.json", bucket="ferry-backups-replica") is None


def test_a_replica_whose_bucket_is_not_bound_fails_saying_so_and_frees_the_source(world):
    ferry = world["ferry"]
    status, _, payload = ferry.webhook("portal-unbound")
    assert status == 202, payload
    export = ferry.wait_job(payload["job"]["id"], timeout=240)
    replica = ferry.wait_job(replica_of(ferry, export), timeout=60)
    assert replica["phase"] == "failed", replica
    assert "no R2 bucket is bound as BACKUPS_NOWHERE" in replica["error"], replica["error"]
    assert ferry.job(export["id"])["phase"] == "committed"
    deadline = time.time() + 30
    while ferry.source("portal-unbound")["current_job_id"] is not None:
        assert time.time() < deadline, "the source stayed busy"
        time.sleep(0.2)


def test_a_replica_bound_to_the_primary_bucket_fails_naming_it_and_leaves_the_primary_backup_whole(world):
    ferry = world["ferry"]
    export = ferry.webhook_job("portal-aliased", timeout=240)
    replica = ferry.wait_job(replica_of(ferry, export), timeout=60)
    assert replica["phase"] == "failed", replica
    assert "BACKUPS_ALIAS is the primary bucket BACKUPS" in replica["error"], replica["error"]
    assert ferry.job(export["id"])["phase"] == "committed"
    manifest = manifest_of(ferry, export)
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    stored = json.loads(ferry.r2_get(folder + "manifest.json"))
    assert "replica_of" not in stored and stored == {k: v for k, v in manifest.items() if k in stored}, stored
    for art in manifest["artifacts"]:
        body = ferry.r2_get(art["key"])
        assert body is not None and hashlib.sha256(body).hexdigest() == art["sha256"], art["key"]
    assert ferry.r2_get(f"_ferry/replica-probe/{replica['id']}-1") is None, "the probe was deleted"
