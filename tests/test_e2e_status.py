"""End to end: what operators see — progress of a running copy, each source's health, and the
Prometheus metrics — under `wrangler dev` against the DXP emulator."""

from __future__ import annotations

import time

import pytest

from harness import DXP_SECRETS, DxpEmulator, Ferry, dxp_source


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("status-e2e")
    emulator = DxpEmulator(work, volume_mib=24, backups=1)
    sources = [
        dxp_source("shop", emulator, part_size_mib=5, slice_max_mib=5),
        dxp_source("locked", emulator, auth="basic", password_secret="WRONG_PASSWORD"),
    ]
    ferry = Ferry(work / "ferry", sources, secrets={**DXP_SECRETS, "WRONG_PASSWORD": "nope"})
    yield {"ferry": ferry, "emulator": emulator}
    ferry.stop()
    emulator.stop()


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_running_copy_reports_bytes_total_rate_and_eta_and_then_the_source_is_green(world):
    ferry, emulator = world["ferry"], world["emulator"]
    emulator.control(throttle_kib_per_s=4096)
    try:
        status, _, payload = ferry.webhook("shop")
        assert status == 202, payload
        job_id = payload["job"]["id"]
        seen = []
        deadline = time.time() + 60
        while time.time() < deadline:
            source = ferry.source("shop")
            progress = source.get("progress")
            if progress and progress["bytes_copied"] > 0:
                seen.append(progress)
                if len(seen) >= 2 and seen[-1]["bytes_copied"] > seen[0]["bytes_copied"]:
                    break
            if source["current_job_id"] is None and source["last_job"]["phase"] in ("committed", "failed"):
                break
            time.sleep(0.3)
        assert len(seen) >= 2 and seen[-1]["bytes_copied"] > seen[0]["bytes_copied"], seen
        moving = seen[-1]
        assert moving["file"] in ("database.gz", "volume.tgz"), moving
        assert moving["bytes_per_second"] and moving["bytes_per_second"] > 0, moving
        if moving["file"] == "volume.tgz":  # the last file: the total is known, so is the time left
            assert moving["bytes_total"] >= moving["bytes_copied"] and moving["eta_seconds"] is not None, moving
        job = ferry.job(job_id)
        assert job["phase"] in ("transferring", "committed"), job
    finally:
        emulator.control(throttle_kib_per_s=0)
    job = ferry.wait_job(job_id, timeout=120)
    assert job["phase"] == "committed", job
    source = ferry.source("shop")
    assert source["health"]["light"] == "green", source["health"]
    assert source["progress"] is None and source["current_job"] is None
    (last,) = [h for h in source["history"] if h["id"] == job_id]
    assert last["phase"] == "committed" and last["bytes"] == sum(a["size"] for a in job["artifacts"])
    assert source["outcomes"]["committed"] >= 1


def test_a_failing_source_is_amber_with_the_providers_words(world):
    ferry = world["ferry"]
    job = ferry.webhook_job("locked")
    assert job["phase"] == "failed", job
    health = ferry.source("locked")["health"]
    assert health["light"] == "amber", health
    assert "no backup yet" in health["reason"] and job["error"][:40] in health["reason"], health


def test_metrics_are_prometheus_text_behind_the_bearer_token(world):
    ferry = world["ferry"]
    if not any(h["phase"] == "committed" for h in ferry.source("shop")["history"]):
        ferry.webhook_job("shop", timeout=120)
    assert ferry.api("/metrics", token=None)[0] == 401
    assert ferry.api("/metrics", token="wrong-token-0123456789abcdef0123456789")[0] == 401
    status, headers, body = ferry.api("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    committed = [h for h in ferry.source("shop")["history"] if h["phase"] == "committed"][-1]
    assert metric(text, "ferry_last_backup_size_bytes", source="shop") == committed["bytes"]
    assert metric(text, "ferry_jobs_total", source="shop", outcome="committed") >= 1
    assert metric(text, "ferry_jobs_total", source="locked", outcome="failed") >= 1
    assert metric(text, "ferry_source_healthy", source="shop") == 1
    assert metric(text, "ferry_source_healthy", source="locked") == 0
    assert metric(text, "ferry_backups_retained", source="shop") == len(ferry.backups("shop"))
    assert metric(text, "ferry_job_in_flight", source="shop") == 0
    assert metric(text, "ferry_last_success_timestamp_seconds", source="shop") > 1.7e9
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert f"# HELP {name} " in text, name
