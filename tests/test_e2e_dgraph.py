"""End to end: Dgraph Cloud exports by the built Worker under `wrangler dev`."""

from __future__ import annotations

import gzip
import hashlib
import json
import time

import pytest

from harness import DGRAPH_SECRETS, DgraphEmulator, Ferry, dgraph_source

TICK = 1893466800000  # 2030-01-01T03:00:00Z


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("dgraph-e2e")
    plain = DgraphEmulator(work)
    acl = DgraphEmulator(work, acl=True)
    sources = [
        dgraph_source("graph", plain, schedule="0 3 * * *"),
        dgraph_source("graph-rdf", plain, format="rdf"),
        dgraph_source("graph-acl", acl, acl=True),
        dgraph_source("graph-failing", plain),
    ]
    ferry = Ferry(work / "ferry", sources, secrets=DGRAPH_SECRETS)
    yield {"ferry": ferry, "plain": plain, "acl": acl}
    ferry.stop()
    plain.stop()
    acl.stop()


@pytest.fixture(autouse=True)
def clean(world):
    world["plain"].reset()
    world["acl"].reset()


def check_dgraph_backup(ferry: Ferry, job: dict, emulator: DgraphEmulator, suffix: str) -> dict:
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups(job["source"]) if m["job_id"] == job["id"]]
    task_id = manifest["provider"]["task_id"]
    (export,) = [e for e in emulator.state()["exports"] if e["taskId"] == task_id]
    expected = {f["name"] for f in export["files"]}
    assert {a["filename"] for a in manifest["artifacts"]} == expected
    assert f"g01.{suffix}.gz" in expected and "g01.schema.gz" in expected and "g01.gql_schema.gz" in expected
    for art in manifest["artifacts"]:
        headers, body = ferry.artifact(art["key"])
        assert body == emulator.file(task_id, art["filename"]), f"{art['filename']} differs"
        assert art["sha256"] == hashlib.sha256(body).hexdigest() == headers["x-ferry-sha256"]
        assert body[:2] == b"\x1f\x8b", "stored as the gzip Dgraph served"
    data = gzip.decompress(ferry.artifact(next(a["key"] for a in manifest["artifacts"] if a["filename"] == f"g01.{suffix}.gz"))[1])
    if suffix == "json":
        assert isinstance(json.loads(data), list)
    else:
        assert data.decode().splitlines()[0].endswith(" .")
    return manifest


def test_scheduled_export_lands_every_file_byte_for_byte(world):
    ferry, plain = world["ferry"], world["plain"]
    ferry.scheduled("*/5 * * * *", at_ms=TICK)
    job = ferry.wait_last_job("graph")
    manifest = check_dgraph_backup(ferry, job, plain, "json")
    assert manifest["provider"]["status"] == "Success" and manifest["provider"]["format"] == "json"
    assert ferry.source("graph-rdf")["last_job"] is None


def test_webhook_rdf_export(world):
    ferry, plain = world["ferry"], world["plain"]
    status, _, payload = ferry.webhook("graph-rdf")
    assert status == 202
    check_dgraph_backup(ferry, ferry.wait_job(payload["job"]["id"]), plain, "rdf")


def test_acl_login_and_refresh_when_the_access_token_expires_mid_export(world):
    ferry, acl = world["ferry"], world["acl"]
    acl.control(access_ttl=1, status_sequence=["Queued"] * 8 + ["Running", "Success"])
    job = ferry.webhook_job("graph-acl", timeout=90)
    manifest = check_dgraph_backup(ferry, job, acl, "json")
    assert manifest["provider"]["namespace"] == -1
    logins = [r for r in acl.state()["requests"] if r.get("op") == "login"]
    assert len(logins) >= 2, "the expired access token was refreshed"
    assert job["provider"]["logins"] >= 2
    text = json.dumps(job)
    assert "secret_" not in text and "accessJWT" not in text


def test_unknown_status_values_keep_polling(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(status_sequence=["Queued", "Paused", "Running", "Success"])
    status, _, payload = ferry.webhook("graph-failing")
    check_dgraph_backup(ferry, ferry.wait_job(payload["job"]["id"]), plain, "json")


def test_the_export_answer_printed_in_dgraph_clouds_docs_is_followed_to_a_backup(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(export_answer_form="docs_example")
    job = ferry.webhook_job("graph-failing")
    manifest = check_dgraph_backup(ferry, job, plain, "json")
    (export,) = plain.state()["exports"]
    assert manifest["provider"]["export_id"] == export["exportId"]


def test_an_export_answer_without_a_task_id_fails_the_job_and_queues_no_second_export(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(export_answer_form="unrecognised")
    job = ferry.webhook_job("graph-failing")
    assert job["phase"] == "failed" and "does not recognise" in job["error"], job
    assert len(plain.state()["exports"]) == 1, "the export mutation was sent once"


def test_a_gateway_error_answering_the_export_fails_the_job_quoting_it_and_queues_no_second_export(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(export_answer_form="gateway_timeout")
    job = ferry.webhook_job("graph-failing")
    assert job["phase"] == "failed" and "HTTP 504" in job["error"] and "Gateway Time-out" in job["error"], job
    assert len(plain.state()["exports"]) == 1, "the export mutation was sent once"


def test_failed_export_fails_the_job_with_no_manifest(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(status_sequence=["Queued", "Running", "Failed"])
    job = ferry.webhook_job("graph-failing")
    assert job["phase"] == "failed" and "failed" in job["error"], job
    assert not [m for m in ferry.backups("graph-failing") if m["job_id"] == job["id"]]


def test_graphql_errors_fail_the_job_with_their_messages(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(graphql_error_next=["Only guardian of galaxy can export all namespaces"])
    job = ferry.webhook_job("graph-failing")
    assert job["phase"] == "failed"
    assert job["error"] == "Dgraph export failed: Only guardian of galaxy can export all namespaces"


def test_server_errors_are_retried(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(fail_next=[{"status": 503}, {"status": 429, "retry_after": "1"}])
    job = ferry.webhook_job("graph-failing")
    check_dgraph_backup(ferry, job, plain, "json")


def test_a_login_redirected_to_another_origin_never_carries_the_password_there(world):
    ferry, acl = world["ferry"], world["acl"]
    acl.control(faults=[{"step": "login", "fault": "redirect_307", "times": None}])
    job = ferry.webhook_job("graph-acl")
    assert job["phase"] == "failed", job
    assert f"{acl.url} answered HTTP 307" in job["error"] and "to another origin, http://127.0.0.1:" in job["error"], \
        job["error"]
    assert acl.state()["login_requests"] == [], "nothing, and no password, reached the other origin"
    assert DGRAPH_SECRETS["DGRAPH_PASSWORD"] not in json.dumps(job)


def test_provider_files_named_like_ferrys_records_neither_pin_the_backup_nor_are_overwritten(world):
    ferry, plain = world["ferry"], world["plain"]
    records = {"pin.json": "not a pin", "verification.json": "not a verification", "drill.json": "not a drill",
               "manifest.json": "not a manifest"}
    plain.control(extra_export_files=records)
    job = ferry.webhook_job("graph-failing")
    manifest = check_dgraph_backup(ferry, job, plain, "json")
    stored = {a["filename"]: a["key"].rsplit("/", 1)[1] for a in manifest["artifacts"]}
    for name in records:
        assert stored[name] == f"artifact-{name}", stored
    (backup,) = [b for b in ferry.backups("graph-failing") if b["job_id"] == job["id"]]
    assert backup["pinned"] is False and backup["verification"] is None and backup["drill"] is None, backup
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0]
    verified = ferry.verify_job("graph-failing", body=json.dumps({"backup": folder}).encode())
    assert verified["phase"] == "verified", verified
    (backup,) = [b for b in ferry.backups("graph-failing") if b["job_id"] == job["id"]]
    assert backup["verification"]["outcome"] == "ok", backup
    # The verification record went beside the provider's file of that name, not over it.
    check_dgraph_backup(ferry, job, plain, "json")


def test_malformed_answer_fails_clearly(world):
    ferry, plain = world["ferry"], world["plain"]
    plain.control(malformed_next=1)
    job = ferry.webhook_job("graph-failing")
    assert job["phase"] == "failed" and "malformed" in job["error"], job


def account_round(ferry: Ferry) -> tuple[dict, dict]:
    """Backs up the account once: the dispatching job and its children by backend."""
    status, _, payload = ferry.webhook("account")
    assert status == 202
    parent = ferry.wait_job(payload["job"]["id"], phases=("dispatched", "failed"))
    assert parent["phase"] == "dispatched", parent
    children = [ferry.wait_job(c, timeout=90) for c in parent["children"]]
    return parent, {c["provider"]["backend"]["name"]: c for c in children}


def test_account_mode_backs_up_every_backend_in_its_own_job_and_a_failure_stops_none(tmp_path):
    cerebro = DgraphEmulator(tmp_path, cerebro_email="ops@example.com", cerebro_password="cerebro-pw",
                             deployments="alpha,beta,gamma")
    # Retention and health are per backend: with keep_last = 1 every backend keeps its own newest.
    source = {"name": "account", "kind": "dgraph", "schedule": "0 0 1 1 *",
              "cerebro_url": f"{cerebro.url}/cerebro/graphql", "cerebro_email": "ops@example.com",
              "cerebro_password_secret": "CEREBRO_PASSWORD", "poll_interval_ms": 200,
              "retry": {"max_attempts": 2, "base_ms": 200, "max_delay_ms": 500}, "retention": {"keep_last": 1}}
    ferry = Ferry(tmp_path / "ferry", [source], secrets={"CEREBRO_PASSWORD": "cerebro-pw"})
    try:
        cerebro.control(failing_backends=["beta"])
        status, _, payload = ferry.webhook("account")
        assert status == 202
        parent = ferry.wait_job(payload["job"]["id"], phases=("dispatched", "failed"))
        assert parent["phase"] == "dispatched", parent
        assert len(parent["children"]) == 3
        assert "secret_" not in json.dumps(parent)
        children = [ferry.wait_job(c, timeout=90) for c in parent["children"]]
        by_backend = {c["provider"]["backend"]["name"]: c for c in children}
        assert by_backend["beta"]["phase"] == "failed", by_backend["beta"]
        manifests = ferry.backups("account")
        assert {m["provider"]["backend"]["name"] for m in manifests} == {"alpha", "gamma"}
        for name in ("alpha", "gamma"):
            job = by_backend[name]
            assert job["parent"] == parent["id"]
            manifest = check_dgraph_backup(ferry, job, cerebro, "json")
            assert manifest["provider"]["endpoint"].endswith(f"/backends/{name}")
        folders = {m["artifacts"][0]["key"].rsplit("/", 1)[0] for m in manifests}
        assert len(folders) == 2, "each backend has its own folder"
        assert {m["member"] for m in manifests} == {"alpha", "gamma"}, "the listing names each backup's backend"
        report = ferry.source("account")
        assert report["current_job_id"] is None
        # One backend failed: the source is not green though two others just committed.
        assert report["health"]["light"] == "amber", report["health"]
        assert report["health"]["reason"].startswith("backend beta: "), report["health"]
        assert {m: v["health"]["light"] for m, v in report["members"].items()} == \
            {"alpha": "green", "beta": "amber", "gamma": "green"}
        # The listing filtered by backend: its own backups; a known backend without any gets none,
        # an unknown one is a 404 naming it, an empty name a 400 naming the parameter.
        only = ferry.api_json("/v1/sources/account/backups?member=alpha")
        assert [m["job_id"] for m in only["backups"]] == [by_backend["alpha"]["id"]], only
        assert ferry.api_json("/v1/sources/account/backups?member=beta")["backups"] == []
        status, _, body = ferry.api("/v1/sources/account/backups?member=zeta")
        assert status == 404 and "zeta" in json.loads(body)["error"], body
        status, _, body = ferry.api("/v1/sources/account/backups?member=")
        assert status == 400 and '"member"' in json.loads(body)["error"], body

        # The source is free again; a second round where every backend commits.
        cerebro.control(failing_backends=[])
        _, second = account_round(ferry)
        assert all(c["phase"] == "committed" for c in second.values()), second
        newest = {name: c["id"] for name, c in second.items()}
        deadline = time.time() + 30
        while time.time() < deadline:
            kept = {m["member"]: m["job_id"] for m in ferry.backups("account")}
            if kept == newest and len(ferry.backups("account")) == 3:
                break
            time.sleep(0.5)
        kept = [(m["member"], m["job_id"]) for m in ferry.backups("account")]
        assert sorted(kept) == sorted(newest.items()), "each backend keeps its own newest backup, none another's"
        plan = ferry.api_json("/v1/sources/account/retention")
        assert {d["member"] for d in plan["backups"]} == {"alpha", "beta", "gamma"}, plan
        report = ferry.source("account")
        assert report["health"]["light"] == "green", report["health"]
        status, _, metrics = ferry.api("/metrics")
        assert status == 200
        for name in ("alpha", "beta", "gamma"):
            assert f'ferry_member_healthy{{source="account",member="{name}"}} 1' in metrics.decode()
            assert f'ferry_backups_retained{{source="account",member="{name}"}} 1' in metrics.decode()
    finally:
        ferry.stop()
        cerebro.stop()
