"""End to end: every instance of a Neo4j Aura tenant (`instance_id = "*"`) backed up by the built
Worker under `wrangler dev`, against the Aura emulator: a snapshot and a logical export of each
instance in a job of its own, found again at each run, each its own series.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time

from harness import AURA_SECRETS, NEO4J_PASSWORD, AuraEmulator, Ferry, aura_source

INSTANCES = [f"a1a1a10{n}" for n in range(1, 6)]
FAILING = "a1a1a103"   # its password's Worker secret is not set
ADDED = "a1a1a106"     # created between the two runs


def tenant_round(ferry: Ferry, expected: int) -> dict:
    status, _, payload = ferry.webhook("tenant")
    assert status == 202, payload
    parent = ferry.wait_job(payload["job"]["id"], phases=("dispatched", "failed", "skipped"))
    assert parent["phase"] == "dispatched", parent
    assert len(parent["children"]) == expected, parent
    assert '"secret_' not in json.dumps(parent), "no secret_* field (the token handed to the children) is shown"
    children = [ferry.wait_job(c, timeout=120) for c in parent["children"]]
    return {c["provider"]["instance"]["id"]: c for c in children}


def test_a_whole_aura_tenant_backs_up_each_instance_in_its_own_job_one_failing_stops_none_and_a_new_one_joins(
        tmp_path):
    emulator = AuraEmulator(tmp_path, nodes=60, rels=90, instances=tuple(INSTANCES))
    tenant = emulator.state()["instances"][0]["tenant_id"]
    source = aura_source("tenant", emulator, instance_id="*", tenant_id=tenant,
                         db_password_secret_prefix="NEO_PW_", retention={"keep_last": 1})
    del source["db_password_secret"]
    secrets = {k: v for k, v in AURA_SECRETS.items() if k != "NEO4J_PASSWORD"}
    secrets.update({f"NEO_PW_{i.upper()}": NEO4J_PASSWORD for i in INSTANCES + [ADDED] if i != FAILING})
    ferry = Ferry(tmp_path / "ferry", [source], secrets=secrets)
    try:
        first = tenant_round(ferry, len(INSTANCES))
        assert sorted(first) == INSTANCES
        broken = first[FAILING]
        assert broken["phase"] == "failed" and f"NEO_PW_{FAILING.upper()}" in broken["error"], broken
        for inst, job in first.items():
            if inst != FAILING:
                assert job["phase"] == "committed", (job["error"], job.get("last_error"))
        # Each committed member has a snapshot of its own instance and the graph's export.
        backups = ferry.backups("tenant")
        assert sorted(b["member"] for b in backups) == [i for i in INSTANCES if i != FAILING]
        snapshots = emulator.state()["snapshots"]
        for backup in backups:
            inst = backup["member"]
            assert backup["provider"]["instance_id"] == inst
            sid = backup["provider"]["snapshot"]["snapshot_id"]
            assert any(s["snapshot_id"] == sid and s["instance_id"] == inst for s in snapshots), (inst, snapshots)
            (art,) = backup["artifacts"]
            _, body = ferry.artifact(art["key"])
            assert art["sha256"] == hashlib.sha256(body).hexdigest()
            lines = gzip.decompress(body).decode().splitlines()
            assert json.loads(lines[-1]) == {"type": "footer", "nodes": 60, "relationships": 90}
        report = ferry.source("tenant")
        assert report["health"]["light"] == "amber", report["health"]
        assert report["health"]["reason"].startswith(f"instance {FAILING}: "), report["health"]
        assert {m: v["health"]["light"] for m, v in report["members"].items()} == \
            {i: ("amber" if i == FAILING else "green") for i in INSTANCES}

        # An instance created between runs joins the next one; the failing one still fails alone.
        status, _, body = emulator.http.request("POST", "/__control/instances",
                                                json.dumps({"id": ADDED, "name": "Instance06"}).encode(),
                                                {"content-type": "application/json"})
        assert status == 200, body
        second = tenant_round(ferry, len(INSTANCES) + 1)
        assert second[FAILING]["phase"] == "failed"
        assert all(job["phase"] == "committed" for inst, job in second.items() if inst != FAILING), second
        newest = {inst: job["id"] for inst, job in second.items() if inst != FAILING}
        deadline = time.time() + 60
        while time.time() < deadline:
            kept = {b["member"]: b["job_id"] for b in ferry.backups("tenant")}
            if kept == newest and len(ferry.backups("tenant")) == len(newest):
                break
            time.sleep(1)
        kept = sorted((b["member"], b["job_id"]) for b in ferry.backups("tenant"))
        assert kept == sorted(newest.items()), "each instance keeps its own newest backup (keep_last = 1)"
        status, _, metrics = ferry.api("/metrics")
        text = metrics.decode()
        assert f'ferry_member_healthy{{source="tenant",member="{ADDED}"}} 1' in text
        assert f'ferry_member_healthy{{source="tenant",member="{FAILING}"}} 0' in text
        # A restore of a whole-tenant backup is refused before any job, saying what to do instead.
        folder = ferry.backups("tenant")[0]["artifacts"][0]["key"].rsplit("/", 1)[0]
        status, answer = ferry.restore(folder, {"mode": "snapshot", "confirm": "x"})
        assert status == 400 and "scripts/aura_restore.py" in answer["error"], answer
    finally:
        ferry.stop()
        emulator.stop()
