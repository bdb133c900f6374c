"""End to end: Neo4j Aura snapshot restores, logical loads and drills by the built Worker under
`wrangler dev`, against the Aura emulator (management API and Query API)."""

from __future__ import annotations

import base64
import gzip
import json
import time

import pytest

from harness import (AURA_ID, AURA_INSTANCE, AURA_SECRET, AURA_SECRETS, NEO4J_PASSWORD, AuraEmulator, Ferry,
                     aura_source)
from test_e2e_aura import canonical

import sys
from harness import ROOT
sys.path.insert(0, str(ROOT / "scripts"))
import aura_restore  # noqa: E402


def mgmt(emulator, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A call to the emulator's Aura API with a fresh token."""
    auth = base64.b64encode(f"{AURA_ID}:{AURA_SECRET}".encode()).decode()
    status, _, raw = emulator.http.request("POST", "/oauth/token", b"grant_type=client_credentials", {
        "Authorization": f"Basic {auth}", "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, raw
    token = json.loads(raw)["access_token"]
    status, _, raw = emulator.http.request(method, path, None if body is None else json.dumps(body).encode(), {
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return status, json.loads(raw)


def make_spare(emulator) -> dict:
    """A spare instance made as a user would (POST /v1/instances), once it is running."""
    tenant = mgmt(emulator, "GET", "/v1/tenants")[1]["data"][0]["id"]
    status, answer = mgmt(emulator, "POST", "/v1/instances", {
        "version": "5", "region": "europe-west1", "memory": "1GB", "name": "spare", "type": "professional-db",
        "tenant_id": tenant, "cloud_provider": "gcp"})
    assert status == 202, answer
    spare = answer["data"]
    deadline = time.time() + 20
    while mgmt(emulator, "GET", f"/v1/instances/{spare['id']}")[1]["data"]["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.1)
    return spare


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("aura-restore-e2e")
    emulator = AuraEmulator(work, nodes=300, rels=600, snapshot_polls=1, restore_polls=2)
    emulator.control(create_seconds=0.5, destroy_seconds=0.3)
    spare = make_spare(emulator)
    # Pages of 50 elements, one page per export slice: the export is about 18 gzip members, and
    # the load steps resume from a member's start with a ranged read.
    source = aura_source("graph", emulator, drill_database="scratch", page_size=50, slice_max_pages=1)
    # Drills into a scratch instance made for each drill, and into the spare instance.
    scratch = aura_source("graph-scratch", emulator, mode="logical", drill_scratch={"memory": "1GB"})
    spare_src = aura_source("graph-spare", emulator, mode="logical", drill_instance=spare["id"],
                            drill_password_secret="SPARE_PASSWORD",
                            drill_query_api_base="http://" + spare["connection_url"].split("://", 1)[1])
    ferry = Ferry(work / "ferry", [source, scratch, spare_src],
                  secrets={**AURA_SECRETS, "SPARE_PASSWORD": spare["password"]})
    original = emulator.graph("neo4j")
    started = {}
    for name in ("graph", "graph-scratch", "graph-spare"):
        status, _, payload = ferry.webhook(name)
        assert status == 202, payload
        started[name] = payload["job"]["id"]
    for name, job_id in started.items():
        job = ferry.wait_job(job_id, timeout=180)
        assert job["phase"] == "committed", job
    job = ferry.job(started["graph"])
    (manifest,) = [m for m in ferry.backups("graph") if m["job_id"] == job["id"]]
    _, body = ferry.artifact(manifest["artifacts"][0]["key"])
    assert body.count(b"\x1f\x8b\x08") >= 10, "one gzip member per export slice"
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    yield {"ferry": ferry, "emulator": emulator, "original": original, "manifest": manifest, "folder": folder,
           "spare": spare}
    ferry.stop()
    emulator.stop()


def restore(world, body: dict):
    return world["ferry"].restore(world["folder"], body)


def node_count(emulator, db: str) -> int:
    status, _, body = emulator.http.request("GET", f"/__control/graph?db={db}")
    return len(json.loads(body)["nodes"]) if status == 200 else 0


def requests_since(world, n: int) -> list:
    return world["emulator"].state()["requests"][n:]


def database(emulator, db: str) -> dict:
    status, _, body = emulator.http.request("GET", f"/__control/database?db={db}")
    assert status == 200, body
    return json.loads(body)


NODE_LOADS = ("merge_nodes", "merge_nodes_set_labels")
LOADS = NODE_LOADS + ("merge_labelled_rels",)


def assert_loaded_through_the_import_label(emulator, db: str, since: int = 0):
    """The import constraint was made before the first node statement and dropped after the last
    statement that needs it; every lookup was an index lookup; nothing of the load is left.
    ``since``: the statements run in that database before the job (by the test itself)."""
    info = database(emulator, db)
    names = info["statements"][since:]
    assert "merge_rels" not in names and "clean_nodes" not in names, "the statements keyed by the import label"
    creates = [i for i, n in enumerate(names) if n == "create_constraint_if_not_exists"]
    drops = [i for i, n in enumerate(names) if n == "drop_constraint_if_exists"]
    loads = [i for i, n in enumerate(names) if n in LOADS]
    cleans = [i for i, n in enumerate(names) if n == "clean_label"]
    assert creates and drops and loads and cleans, names
    assert creates[0] < min(i for i, n in enumerate(names) if n in NODE_LOADS), "the constraint came first"
    assert drops[-1] == len(names) - 1, "the drop is the load's (or drill's) last statement"
    assert drops[0] > max(loads + cleans), "dropped after the last load and cleanup statement"
    assert info["schema"] == [], "the constraint is gone"
    assert since or info["scans"] == 0, "every node lookup was served by the constraint's index"
    g = emulator.graph(db)
    assert not any("_FerryImport" in n["labels"] for n in g["nodes"])
    assert not any("_ferry_id" in e["props"] for e in g["nodes"] + g["relationships"])


def test_refusals_touch_nothing(world):
    emulator = world["emulator"]
    before = len(emulator.state()["requests"])
    for body in ({"mode": "snapshot"}, {"mode": "snapshot", "confirm": "neo4j"},
                 {"mode": "logical", "target": {"database": "copy"}, "confirm": AURA_INSTANCE},
                 {"mode": "logical", "confirm": "copy"}, {"confirm": AURA_INSTANCE}):
        status, answer = restore(world, body)
        assert status == 400, answer
    assert requests_since(world, before) == [], "the emulator saw no restore and no query"


def test_a_snapshot_restore_brings_the_graph_back(world):
    ferry, emulator = world["ferry"], world["emulator"]
    api = aura_restore.QueryApi(emulator.url, "neo4j", "neo4j", NEO4J_PASSWORD)
    api.run(aura_restore.node_statement(("Intruder",)), {"rows": [{"id": "x", "props": {"a": 1}}]})
    assert canonical(emulator.graph("neo4j")) != canonical(world["original"])
    before = len(emulator.state()["requests"])
    status, answer = restore(world, {"mode": "snapshot", "confirm": AURA_INSTANCE})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "restored", job
    assert world["manifest"]["provider"]["snapshot"]["snapshot_id"] in job["note"]
    log = requests_since(world, before)
    posts = [r for r in log if r["path"].endswith("/restore")]
    polls = [r for r in log if r["path"] == f"/v1/instances/{AURA_INSTANCE}" and r["method"] == "GET"]
    assert len(posts) == 1 and len(polls) >= 3, "restoring twice, then running"
    assert canonical(emulator.graph("neo4j")) == canonical(world["original"])


def test_a_logical_load_in_tiny_batches_across_many_alarm_steps_equals_the_original(world):
    ferry, emulator = world["ferry"], world["emulator"]
    merges_before = emulator.state()["merge_matches"]
    status, answer = restore(world, {"mode": "logical", "target": {"database": "copy"}, "confirm": "copy",
                                     "batch_size": 20, "step_statements": 4})
    assert status == 202, answer
    job_id = answer["job"]["id"]
    seen = set()
    deadline = time.time() + 120
    while time.time() < deadline and ferry.job(job_id)["phase"] not in ("restored", "failed"):
        seen.add(node_count(emulator, "copy"))
        time.sleep(0.05)
    assert len(seen) > 3, "the load advanced in several steps"
    job = ferry.wait_job(job_id, timeout=180)
    assert job["phase"] == "restored", job
    copy = emulator.graph("copy")
    assert len(copy["nodes"]) == 300 and len(copy["relationships"]) == 600
    assert canonical(copy) == canonical(world["original"])
    assert_loaded_through_the_import_label(emulator, "copy")
    assert emulator.state()["merge_matches"] == merges_before, \
        "steps resumed from gzip members sent no element twice (no line read again as new)"


def elements(emulator, db: str) -> int:
    status, _, body = emulator.http.request("GET", f"/__control/graph?db={db}")
    if status != 200:
        return 0
    g = json.loads(body)
    return len(g["nodes"]) + len(g["relationships"])


def test_killing_the_runtime_while_statements_are_unanswered_duplicates_nothing(world):
    """Each kill lands after Neo4j ran a statement and before its answer came back (the emulator
    holds every answer for a while): the statement is sent again after the restart, and MERGE on
    `_ferry_id` finds what it made."""
    ferry, emulator = world["ferry"], world["emulator"]
    merges_before = emulator.state()["merge_matches"]
    emulator.control(query_reply_delay_s=1.5)
    kills = []
    try:
        status, answer = restore(world, {"mode": "logical", "target": {"database": "killed"}, "confirm": "killed",
                                         "batch_size": 40, "step_statements": 3})
        assert status == 202, answer
        job_id = answer["job"]["id"]
        last = 0
        deadline = time.time() + 240
        while len(kills) < 3 and time.time() < deadline:
            now = elements(emulator, "killed")
            if now != last:
                # A statement just ran and its answer is held: kill the runtime waiting for it.
                ferry.restart(kill=True)
                kills.append(now)
                last = elements(emulator, "killed")
                continue
            assert ferry.job(job_id)["phase"] not in ("restored", "failed"), "finished before three kills"
            time.sleep(0.02)
    finally:
        emulator.control(query_reply_delay_s=0)
    assert len(kills) == 3, kills
    assert 0 < kills[0] and kills[-1] < 900, "the kills fell in the middle of the load"
    job = ferry.wait_job(job_id, timeout=180)
    assert job["phase"] == "restored", job
    assert emulator.state()["merge_matches"] > merges_before, "unanswered statements were sent again"
    copy = emulator.graph("killed")
    assert len(copy["nodes"]) == 300 and len(copy["relationships"]) == 600
    assert canonical(copy) == canonical(world["original"])
    assert_loaded_through_the_import_label(emulator, "killed")


def test_a_logical_load_into_a_database_that_is_not_empty_fails_and_writes_nothing(world):
    ferry, emulator = world["ferry"], world["emulator"]
    api = aura_restore.QueryApi(emulator.url, "busy", "neo4j", NEO4J_PASSWORD)
    api.run(aura_restore.node_statement(("Mine",)), {"rows": [{"id": "m", "props": {}}]})
    before = emulator.graph("busy")
    status, answer = restore(world, {"mode": "logical", "target": {"database": "busy"}, "confirm": "busy"})
    assert status == 202, answer
    job = ferry.wait_job(answer["job"]["id"], timeout=60)
    assert job["phase"] == "failed" and "not empty (1 nodes)" in job["error"], job
    assert emulator.graph("busy") == before


def start_drill(world, source: str = "graph") -> str:
    status, answer = world["ferry"].api_post(f"/v1/sources/{source}/drill", {"batch_size": 100})
    assert status == 202, answer
    return answer["job"]["id"]


def drill(world, source: str = "graph") -> dict:
    return world["ferry"].wait_job(start_drill(world, source), timeout=120)


def drill_record(world, source: str = "graph") -> dict:
    backups = world["ferry"].backups(source)
    if source == "graph":
        (backup,) = [b for b in backups if b["job_id"] == world["manifest"]["job_id"]]
    else:
        backup = backups[0]
    return backup["drill"]


def test_a_drill_passes_and_leaves_the_drill_database_empty(world):
    emulator = world["emulator"]
    api = aura_restore.QueryApi(emulator.url, "scratch", "neo4j", NEO4J_PASSWORD)
    api.run(aura_restore.node_statement(("Leftover",)), {"rows": [{"id": "l", "props": {}}]})
    since = len(database(emulator, "scratch")["statements"])
    scans = database(emulator, "scratch")["scans"]
    job = drill(world)
    assert job["phase"] == "restored", job
    record = drill_record(world)
    assert record["passed"] is True and record["job_id"] == job["id"]
    persons = sum(1 for n in world["original"]["nodes"] if "Person" in n["labels"])
    assert record["labels"]["Person"] == {"backup": persons, "restored": persons}
    assert "Leftover" not in record["labels"], "the drill database was emptied first"
    assert "_FerryImport" not in record["labels"], "the import label was gone before counting"
    assert set(record["labels"]) == {label for n in world["original"]["nodes"] for label in n["labels"]}
    assert emulator.graph("scratch") == {"nodes": [], "relationships": []}
    names = database(emulator, "scratch")["statements"]
    assert names.index("label_counts") > max(i for i, n in enumerate(names) if n == "clean_label")
    assert database(emulator, "scratch")["scans"] == scans, "the drill's load looked nodes up by index only"
    assert_loaded_through_the_import_label(emulator, "scratch", since)


def altered_export(ferry, manifest: dict) -> tuple[dict, bytes, bytes, int]:
    """The export without its Company nodes and their relationships, with a footer rewritten to
    match: (artifact, original bytes, altered bytes, Company nodes the manifest counted)."""
    (art,) = [a for a in manifest["artifacts"] if a["filename"] == "graph.jsonl.gz"]
    companies = art["details"]["labels"]["Company"]
    assert companies > 0
    _, body = ferry.artifact(art["key"])
    lines = [json.loads(line) for line in gzip.decompress(body).decode().splitlines()]
    gone = {e["id"] for e in lines if e["type"] == "node" and "Company" in e["labels"]}
    kept = [e for e in lines if not (e["id"] in gone if e["type"] == "node" else
                                     e["type"] == "relationship" and (e["start"] in gone or e["end"] in gone))]
    nodes = sum(1 for e in kept if e["type"] == "node")
    rels = sum(1 for e in kept if e["type"] == "relationship")
    kept[-1] = {"type": "footer", "nodes": nodes, "relationships": rels}
    assert nodes == 300 - len(gone) and rels < 600
    return art, body, gzip.compress(("\n".join(json.dumps(e) for e in kept) + "\n").encode()), companies


def test_a_drill_of_an_altered_export_fails_naming_the_label_and_still_empties_the_drill_database(world):
    """The export loses its Company nodes and their relationships, with a footer rewritten to match:
    the file is consistent, but the counts the manifest recorded at backup time are not met."""
    ferry, emulator = world["ferry"], world["emulator"]
    art, body, altered, companies = altered_export(ferry, world["manifest"])
    try:
        ferry.r2_put(art["key"], altered)
        job = drill(world)
        assert job["phase"] == "failed", job
        assert f'label "Company": 0 nodes restored, {companies} in the backup' in job["error"], job["error"]
        assert "footer" not in job["error"], "the file itself is consistent"
        record = drill_record(world)
        assert record["passed"] is False and record["backup_counts_from"] == "manifest"
        assert record["labels"]["Company"] == {"backup": companies, "restored": None}
        assert emulator.graph("scratch") == {"nodes": [], "relationships": []}
        assert database(emulator, "scratch")["schema"] == [], "a failed drill drops the constraint too"
        assert database(emulator, "scratch")["statements"][-1] == "drop_constraint_if_exists"
    finally:
        ferry.r2_put(art["key"], body)


# ----- item 13: a restore whose status lags the POST ----------------------------------------------------

def instance_state(emulator, instance: str) -> dict:
    (inst,) = [i for i in emulator.state()["instances"] if i["id"] == instance]
    return inst


def test_a_snapshot_restore_whose_status_lags_the_post_waits_for_restoring(world):
    """Aura answers the restore POST while the instance still says `running`: the restore has not
    begun, and the job may not end before it did."""
    ferry, emulator = world["ferry"], world["emulator"]
    done_before = instance_state(emulator, AURA_INSTANCE)["restores_done"]
    emulator.control(restore_lag_polls=2)
    try:
        status, answer = restore(world, {"mode": "snapshot", "confirm": AURA_INSTANCE})
        assert status == 202, answer
        job = ferry.wait_job(answer["job"]["id"], timeout=60)
    finally:
        emulator.control(restore_lag_polls=0)
    assert job["phase"] == "restored", job
    inst = instance_state(emulator, AURA_INSTANCE)
    assert not inst["restore_pending"], "the job ended before the restore began"
    assert inst["restores_done"] == done_before + 1, "the job ended before the restore finished"
    assert "never reported" not in job["note"], job["note"]


# ----- item 15: drills into a scratch instance and into a spare instance ---------------------------------

def scratch_name(job_id: str) -> str:
    return f"ferry-drill-{job_id}"


def wait_gone(emulator, instance: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while instance in [i["id"] for i in emulator.state()["instances"]]:
        assert time.time() < deadline, f"instance {instance} was not deleted"
        time.sleep(0.1)
    assert instance in emulator.state()["instances_gone"]


def created_instances(emulator) -> list:
    return [i for i in emulator.state()["instances"] if i["created"]]


def test_a_drill_into_a_scratch_instance_passes_and_deletes_the_instance(world):
    ferry, emulator = world["ferry"], world["emulator"]
    before = emulator.state()
    job = drill(world, "graph-scratch")
    assert job["phase"] == "restored", job
    record = drill_record(world, "graph-scratch")
    assert record["passed"] is True and record["job_id"] == job["id"], record
    scratch = record["drill_instance"]
    assert scratch["kind"] == "scratch" and scratch["name"] == scratch_name(job["id"])
    assert scratch["deleted"] == [scratch["id"]]
    persons = sum(1 for n in world["original"]["nodes"] if "Person" in n["labels"])
    assert record["labels"]["Person"] == {"backup": persons, "restored": persons}
    after = emulator.state()
    assert after["instances_created"][len(before["instances_created"]):] == [scratch["id"]], "created once"
    assert after["instance_deletes"][len(before["instance_deletes"]):] == [scratch["id"]], "deleted once, only it"
    wait_gone(emulator, scratch["id"])
    assert "secret_password" not in json.dumps(ferry.job(job["id"])), "the scratch password is never shown"


def test_a_scratch_drill_of_an_altered_backup_fails_naming_the_label_and_still_deletes_the_instance(world):
    ferry, emulator = world["ferry"], world["emulator"]
    (manifest,) = ferry.backups("graph-scratch")[:1]
    art, body, altered, companies = altered_export(ferry, manifest)
    try:
        ferry.r2_put(art["key"], altered)
        job = drill(world, "graph-scratch")
    finally:
        ferry.r2_put(art["key"], body)
    assert job["phase"] == "failed", job
    assert f'label "Company": 0 nodes restored, {companies} in the backup' in job["error"], job["error"]
    record = drill_record(world, "graph-scratch")
    assert record["passed"] is False and record["drill_instance"]["deleted"] == [record["drill_instance"]["id"]]
    wait_gone(emulator, record["drill_instance"]["id"])
    assert created_instances(emulator) == [i for i in created_instances(emulator) if i["id"] == world["spare"]["id"]]


def test_a_scratch_drill_killed_after_the_create_post_finds_its_instance_again_and_deletes_it(world):
    """The runtime is killed while Aura holds the create's answer: the instance exists, its
    password is lost with the answer. After the restart the drill finds it by name, deletes it,
    creates another and passes; nothing is left behind."""
    ferry, emulator = world["ferry"], world["emulator"]
    created_before = len(emulator.state()["instances_created"])
    emulator.control(create_reply_delay_s=4)
    try:
        job_id = start_drill(world, "graph-scratch")
        deadline = time.time() + 60
        while not [i for i in created_instances(emulator) if i["name"] == scratch_name(job_id)]:
            assert time.time() < deadline, "the create never came"
            time.sleep(0.05)
        (first,) = [i["id"] for i in created_instances(emulator) if i["name"] == scratch_name(job_id)]
        ferry.restart(kill=True)
    finally:
        emulator.control(create_reply_delay_s=0)
    job = ferry.wait_job(job_id, timeout=120)
    assert job["phase"] == "restored", job
    record = drill_record(world, "graph-scratch")
    second = record["drill_instance"]["id"]
    assert second != first and sorted(record["drill_instance"]["deleted"]) == sorted([first, second]), record
    assert emulator.state()["instances_created"][created_before:] == [first, second], \
        "created again only after the first was found and deleted"
    wait_gone(emulator, first)
    wait_gone(emulator, second)
    assert not [i for i in created_instances(emulator) if i["name"].startswith("ferry-drill-")], "no leak"


def test_a_drill_into_a_spare_instance_passes(world):
    emulator, spare = world["emulator"], world["spare"]
    job = drill(world, "graph-spare")
    assert job["phase"] == "restored", job
    record = drill_record(world, "graph-spare")
    assert record["passed"] is True and record["drill_instance"] == {"kind": "spare", "id": spare["id"]}, record
    status, _, raw = emulator.http.request("GET", f"/__control/graph?db=neo4j&instance={spare['id']}")
    assert status == 200 and json.loads(raw) == {"nodes": [], "relationships": []}, "emptied after the drill"
    status, _, raw = emulator.http.request("GET", f"/__control/database?db=neo4j&instance={spare['id']}")
    names = json.loads(raw)["statements"]
    assert "label_counts" in names and names[-1] == "drop_constraint_if_exists", names
    assert spare["id"] in [i["id"] for i in emulator.state()["instances"]], "a spare instance is never deleted"
