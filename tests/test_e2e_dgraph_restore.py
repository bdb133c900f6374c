"""End to end: Dgraph Cloud restores by the built Worker under `wrangler dev`, against the Dgraph
emulator's own backups (snapshots of a backend's data) on a dedicated backend.

The proof that a restore put the data back: an export after the restore lands files in R2 that
are byte-identical to those of the Ferry backup taken while the data was as the restored Dgraph
backup holds it.
"""

from __future__ import annotations

import json
import time

import pytest

from harness import DGRAPH_SECRETS, DgraphEmulator, Ferry, dgraph_source


def stamp(offset_s: float) -> str:
    """A listBackups timestamp, `offset_s` seconds from now."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(time.time() + offset_s))


def emulator_post(emulator: DgraphEmulator, path: str, body: dict) -> dict:
    status, _, raw = emulator.http.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
    assert status == 200, raw
    return json.loads(raw)


def uid_of(emulator: DgraphEmulator) -> str:
    (default,) = [b for b in emulator.state()["backends"] if b["name"] == "default"]
    return default["uid"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("dgraph-restore-e2e")
    dedicated = DgraphEmulator(work)
    (work / "shared").mkdir()
    shared = DgraphEmulator(work / "shared")  # its own log file, so its own READY line
    shared.control(non_dedicated_backends=["default"])
    ferry = Ferry(work / "ferry", [dgraph_source("graph", dedicated), dgraph_source("graph-shared", shared)],
                  secrets=DGRAPH_SECRETS)
    yield {"ferry": ferry, "dedicated": dedicated, "shared": shared}
    ferry.stop()
    dedicated.stop()
    shared.stop()


def backup(ferry: Ferry, source: str) -> tuple[dict, str]:
    job = ferry.webhook_job(source, timeout=90)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups(source) if m["job_id"] == job["id"]]
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0]
    return manifest, folder


def restore(ferry: Ferry, folder: str, body: dict):
    return ferry.restore(folder, body)


def stored(ferry: Ferry, manifest: dict) -> dict:
    """Each file of a backup as R2 holds it, by file name."""
    return {a["filename"]: ferry.r2_get(a["key"]) for a in manifest["artifacts"]}


def restore_ops(emulator: DgraphEmulator) -> list:
    return [r for r in emulator.state()["requests"] if r.get("op") == "restore" or r.get("step") == "restore"]


def test_a_restore_puts_back_the_dgraph_backup_taken_before_the_ferry_backup(world):
    ferry, emu = world["ferry"], world["dedicated"]
    emu.reset()
    full = emulator_post(emu, "/__control/backup", {"type": "full", "timestamp": stamp(-60)})
    first, folder = backup(ferry, "graph")
    files = stored(ferry, first)
    assert {"g01.json.gz", "g01.schema.gz", "g01.gql_schema.gz"} <= set(files)
    # The data changes; Dgraph backs it up after the Ferry backup finished (not the one to
    # restore), then it changes again.
    emulator_post(emu, "/__control/data", {"extra_people": 5})
    emulator_post(emu, "/__control/backup", {"type": "incremental", "timestamp": stamp(3600)})
    emulator_post(emu, "/__control/data", {"extra_people": 9})
    uid = uid_of(emu)

    # Refused with 400 before anything is touched: no confirm, a wrong one, no deployment uid.
    for body in ({"deployment_uid": uid}, {"deployment_uid": uid, "confirm": "0x1"}, {"confirm": "graph"}):
        status, answer = restore(ferry, folder, body)
        assert status == 400, answer
        assert "confirm" in answer["error"] or "deployment_uid" in answer["error"]
    assert restore_ops(emu) == [] and emu.state()["restores"] == []
    assert ferry.source("graph")["last_job"]["task"] == "export", "no job was started"

    status, answer = restore(ferry, folder, {"deployment_uid": uid, "confirm": uid})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=90)
    assert job["phase"] == "restored", job
    assert job["task"] == "restore"
    assert f"{full['folder']} #1 (full, taken {full['timestamp']})" in job["note"], job["note"]
    assert "at or before Ferry backup" in job["note"]
    (done,) = emu.state()["restores"]
    assert (done["uid"], done["backupFolder"], done["backupNum"], done["status"]) == (uid, full["folder"], 1, "OK")
    assert "secret_" not in json.dumps(job)

    # An export after the restore is byte for byte the first backup's.
    second, _ = backup(ferry, "graph")
    assert second["job_id"] != first["job_id"]
    again = stored(ferry, second)
    assert set(again) == set(files)
    for name, data in files.items():
        assert data is not None and again[name] == data, f"{name} differs from the first backup's"


def test_a_restore_from_a_non_dedicated_backend_fails_with_the_services_message(world):
    ferry, emu = world["ferry"], world["shared"]
    _, folder = backup(ferry, "graph-shared")
    uid = uid_of(emu)
    status, answer = restore(ferry, folder, {"deployment_uid": uid, "confirm": "graph-shared"})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "failed", job
    assert "only available for dedicated backends" in job["error"], job["error"]
    assert "nothing was touched" in job["error"]
    assert restore_ops(emu) == [], "no restore mutation was sent"
    assert [r for r in emu.state()["requests"] if r.get("op") == "listBackups"]
