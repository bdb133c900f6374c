"""End to end: Neo4j Aura snapshots and logical exports by the built Worker under `wrangler dev`,
and the logical export loaded back into an empty database through the restore tool."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import time
from collections import Counter

import pytest

from harness import AURA_SECRETS, NEO4J_PASSWORD, ROOT, AuraEmulator, Ferry, aura_source

sys.path.insert(0, str(ROOT / "scripts"))
import aura_restore  # noqa: E402

TICK = 1893466800000  # 2030-01-01T03:00:00Z


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("aura-e2e")
    emulator = AuraEmulator(work, nodes=10000, rels=20000, snapshot_polls=2)
    sources = [
        aura_source("graph", emulator),
        aura_source("graph-snapshots", emulator, mode="snapshot", schedule="0 3 * * *"),
        aura_source("graph-logical", emulator, mode="logical"),
        aura_source("graph-wrong-password", emulator, mode="logical", db_password_secret="WRONG_PASSWORD"),
    ]
    ferry = Ferry(work / "ferry", sources, secrets={**AURA_SECRETS, "WRONG_PASSWORD": "nope"})
    yield {"ferry": ferry, "emulator": emulator, "work": work}
    ferry.stop()
    emulator.stop()


@pytest.fixture(autouse=True)
def clean(world):
    world["emulator"].reset()


def canonical(graph: dict) -> tuple[Counter, Counter]:
    """Nodes and relationships compared by content, not by element id."""
    key = {n["id"]: json.dumps([sorted(n["labels"]), n["props"]], sort_keys=True) for n in graph["nodes"]}
    nodes = Counter(key.values())
    rels = Counter(json.dumps([r["type"], key[r["start"]], key[r["end"]], r["props"]], sort_keys=True)
                   for r in graph["relationships"])
    return nodes, rels


def expected_details(emulator) -> dict:
    """The artifact's details: totals, nodes per label and relationships per type of the seeded graph."""
    graph = emulator.graph("neo4j")
    labels, types = Counter(), Counter()
    for node in graph["nodes"]:
        labels.update(node["labels"])
    types.update(r["type"] for r in graph["relationships"])
    return {"format": "ferry-neo4j-jsonl", "nodes": 10000, "relationships": 20000,
            "labels": dict(labels), "types": dict(types)}


def without_values(details: dict) -> dict:
    """The details without the typed values' digests, which are checked for shape: one per label
    and type, each a 128-bit sum in hex (drills compare them; the native tests check their sums)."""
    details = dict(details)
    values = details.pop("values")
    assert set(values["labels"]) == set(details["labels"]) and set(values["types"]) == set(details["types"])
    sums = [d["elements"] for d in [*values["labels"].values(), *values["types"].values()]]
    assert all(len(x) == 32 and int(x, 16) >= 0 for x in sums), sums
    return details


def test_both_mode_records_the_snapshot_and_exports_a_graph_that_restores_identically(world, tmp_path):
    ferry, emulator = world["ferry"], world["emulator"]
    status, _, payload = ferry.webhook("graph")
    assert status == 202
    job = ferry.wait_job(payload["job"]["id"], timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("graph") if m["job_id"] == job["id"]]
    snapshot = manifest["provider"]["snapshot"]
    assert snapshot["status"] == "Completed" and snapshot["snapshot_id"] and snapshot["timestamp"]
    assert snapshot["snapshot_id"] in {s["snapshot_id"] for s in emulator.state()["snapshots"]}
    (art,) = manifest["artifacts"]
    assert art["filename"] == "graph.jsonl.gz"
    assert without_values(art["details"]) == expected_details(emulator)
    assert sum(art["details"]["labels"].values()) >= 10000 and len(art["details"]["types"]) == 4
    headers, body = ferry.artifact(art["key"])
    assert art["sha256"] == hashlib.sha256(body).hexdigest() == headers["x-ferry-sha256"]
    lines = gzip.decompress(body).decode().splitlines()
    assert json.loads(lines[0])["type"] == "header" and json.loads(lines[-1]) == {"type": "footer", "nodes": 10000, "relationships": 20000}
    # Load it back into an empty database through the Query API and compare everything.
    path = tmp_path / "graph.jsonl.gz"
    path.write_bytes(body)
    api = aura_restore.QueryApi(emulator.url, "restored", "neo4j", NEO4J_PASSWORD)
    counts = aura_restore.restore(str(path), api, batch=1000, log=lambda *_: None)
    assert counts == {"nodes": 10000, "relationships": 20000}
    original, restored = emulator.graph("neo4j"), emulator.graph("restored")
    assert len(restored["nodes"]) == 10000 and len(restored["relationships"]) == 20000
    (nodes_a, rels_a), (nodes_b, rels_b) = canonical(original), canonical(restored)
    for name, a, b in (("nodes", nodes_a, nodes_b), ("relationships", rels_a, rels_b)):
        missing, extra = list((a - b).items())[:3], list((b - a).items())[:3]
        assert not missing and not extra, f"{name} differ: missing {missing}, unexpected {extra}"
    assert all("_ferry_id" not in e["props"] for e in restored["nodes"] + restored["relationships"]), \
        "the helper property is removed"
    assert all("_FerryImport" not in n["labels"] for n in restored["nodes"]), "the import label is removed"
    status, _, raw = emulator.http.request("GET", "/__control/database?db=restored")
    info = json.loads(raw)
    assert status == 200 and info["schema"] == [] and info["scans"] == 0, "index lookups only, constraint dropped"
    assert info["statements"][0] == "create_constraint_if_not_exists"


def test_restore_refuses_an_incomplete_export(world, tmp_path):
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"type":"header","format":"ferry-neo4j-jsonl","version":1}\n{"type":"node","id":"a","labels":[],"properties":{}}\n'))
    api = aura_restore.QueryApi(world["emulator"].url, "never", "neo4j", NEO4J_PASSWORD)
    with pytest.raises(SystemExit, match="incomplete"):
        aura_restore.restore(str(truncated), api, log=lambda *_: None)
    assert api.statements == 0


def test_scheduled_snapshot_only_backup_commits_a_manifest_without_files(world):
    ferry = world["ferry"]
    ferry.scheduled("*/5 * * * *", at_ms=TICK)
    job = ferry.wait_last_job("graph-snapshots")
    assert job["phase"] == "committed" and job["trigger"] == "cron", job
    (manifest,) = ferry.backups("graph-snapshots")
    assert manifest["artifacts"] == []
    assert manifest["provider"]["mode"] == "snapshot"
    assert manifest["provider"]["snapshot"]["status"] == "Completed"
    assert ferry.source("graph")["last_job"] is None or ferry.source("graph")["last_job"]["trigger"] == "webhook"


def test_expired_token_is_fetched_again(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(snapshot_polls=15)
    status, _, payload = ferry.webhook("graph-snapshots")
    job_id = payload["job"]["id"]
    deadline = time.time() + 30
    while not emulator.state()["snapshots"] and time.time() < deadline:
        time.sleep(0.1)
    emulator.control(expire_tokens_now=True)  # Aura answers an expired token with 403
    job = ferry.wait_job(job_id, timeout=60)
    assert job["phase"] == "committed", job
    assert emulator.state()["token_requests"] >= 2
    assert job["provider"]["token_fetches"] >= 2
    assert "secret_" not in json.dumps(job)


def test_failed_snapshot_fails_the_job_with_no_manifest(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(snapshot_fail=True)
    job = ferry.webhook_job("graph")
    assert job["phase"] == "failed" and "snapshot" in job["error"] and "failed" in job["error"], job
    assert not [m for m in ferry.backups("graph") if m["job_id"] == job["id"]]


def test_wrong_database_password_fails_with_the_query_api_message(world):
    ferry = world["ferry"]
    job = ferry.webhook_job("graph-wrong-password")
    assert job["phase"] == "failed"
    assert "Neo.ClientError.Security.Unauthorized" in job["error"], job["error"]
    assert ferry.backups("graph-wrong-password") == []


def test_transient_query_errors_are_retried(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(query_error_next=[{"code": "Neo.TransientError.General.DatabaseUnavailable", "message": "busy"}])
    job = ferry.webhook_job("graph-logical", timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups("graph-logical") if m["job_id"] == job["id"]]
    assert manifest["artifacts"][0]["details"]["nodes"] == 10000


def test_a_sliced_export_killed_between_slices_restores_identically(world, tmp_path):
    emulator = world["emulator"]
    source = aura_source("graph-sliced", emulator, mode="logical", slice_max_pages=3)
    ferry = Ferry(tmp_path / "ferry", [source], secrets=AURA_SECRETS)
    try:
        status, _, payload = ferry.webhook("graph-sliced")
        assert status == 202, payload
        job_id = payload["job"]["id"]
        for _ in range(2):  # kill the runtime twice, once a slice has moved the cursor
            deadline = time.time() + 60
            seen = None
            while time.time() < deadline:
                copy = ferry.job(job_id).get("copy") or {}
                cursor = copy.get("cursor") or {}  # the graph writer's cursor
                moved = cursor.get("nodes") or cursor.get("relationships")
                if moved and cursor != seen and seen is not None:
                    break
                seen = seen or (cursor if moved else None)
                time.sleep(0.05)
            ferry.restart(kill=True)
        job = ferry.wait_job(job_id, timeout=180)
        assert job["phase"] == "committed", job
        (art,) = [m for m in ferry.backups("graph-sliced") if m["job_id"] == job_id][0]["artifacts"]
        assert without_values(art["details"]) == expected_details(emulator), "the per-label counts survived the kills"
        _, body = ferry.artifact(art["key"])
        assert body.count(b"\x1f\x8b\x08") >= 5, "one gzip member per slice"
        path = tmp_path / "graph.jsonl.gz"
        path.write_bytes(body)
        api = aura_restore.QueryApi(emulator.url, "restored-sliced", "neo4j", NEO4J_PASSWORD)
        assert aura_restore.restore(str(path), api, batch=1000, log=lambda *_: None) == {"nodes": 10000, "relationships": 20000}
        assert canonical(emulator.graph("neo4j")) == canonical(emulator.graph("restored-sliced"))
    finally:
        ferry.stop()
