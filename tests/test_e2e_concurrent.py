"""End to end: sources of every downloading kind copying at once in one Worker, each manifest's
hashes equal to what its provider served.

Durable Objects of one class may share an isolate and its globals ("A given instance of a Durable
Object may share global memory with other instances defined in the same Worker code",
https://developers.cloudflare.com/durable-objects/reference/in-memory-state/), and `wrangler dev`
runs every source's object in one isolate. One cron tick starts six sources (four D1, one Dgraph
Cloud, one Liferay DXP Cloud) whose files span several 5 MiB parts, so their reads and their
yields to the event loop interleave. Every committed manifest must then carry, for every file,
the SHA-256 (and for a SQL dump the MD5 and rows per table) of the bytes its own provider sent,
computed here from the emulators' side.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from emulators.d1_dump import dump_sql
from harness import (DGRAPH_SECRETS, DXP_SECRETS, D1Emulator, DgraphEmulator, DxpEmulator, Ferry, d1_source,
                     dgraph_source, dxp_source)

TICK = 1893466800000  # 2030-01-01T03:00:00Z
SMALL_PARTS = {"part_size_mib": 5, "parts_in_flight": 1, "schedule": "0 3 * * *"}
D1_DATABASES = 4
DUMP_MIB = 13


def make_db(path: Path, seed: int, mib: int) -> Path:
    """A database of random rows whose dump spans several parts; `seed` makes its rows its own."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, data TEXT)")
    db.execute("CREATE TABLE tags (id INTEGER PRIMARY KEY, tag TEXT)")
    row = 8 * 1024
    count = mib * 1024 * 1024 // row + seed
    db.executemany("INSERT INTO rows (data) VALUES (?)", ((os.urandom(row // 2).hex(),) for _ in range(count)))
    db.executemany("INSERT INTO tags (tag) VALUES (?)", ((f"db{seed}-{i}",) for i in range(seed * 11)))
    db.commit()
    db.close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("concurrent-e2e")
    paths = {f"db{i}-uuid": make_db(work / f"db{i}.sqlite", i + 1, DUMP_MIB) for i in range(D1_DATABASES)}
    d1 = D1Emulator(work, paths, active_polls=1, cancel_after=120)
    dgraph = DgraphEmulator(work)
    dgraph.control(extra_people=20000, status_sequence=["Queued", "Success"])
    dxp = DxpEmulator(work, volume_mib=DUMP_MIB, backups=1, database_kib=3 * 1024)
    sources = [d1_source(f"d1-{i}", d1, f"db{i}-uuid", **SMALL_PARTS) for i in range(D1_DATABASES)]
    sources += [dgraph_source("graph", dgraph, **SMALL_PARTS), dxp_source("portal", dxp, **SMALL_PARTS)]
    ferry = Ferry(work / "ferry", sources, secrets={**DGRAPH_SECRETS, **DXP_SECRETS})
    yield {"ferry": ferry, "d1": d1, "dgraph": dgraph, "dxp": dxp, "paths": paths, "sources": sources}
    ferry.stop()
    for emulator in (d1, dgraph, dxp):
        emulator.stop()


def served_by_d1(path: Path) -> dict:
    """What the D1 emulator serves for this database: the dump's SHA-256, MD5 and rows per table."""
    db = sqlite3.connect(path)
    try:
        dump = dump_sql(db).encode()
        rows = {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in ("rows", "tags")}
    finally:
        db.close()
    return {"sha256": hashlib.sha256(dump).hexdigest(), "md5": hashlib.md5(dump).hexdigest(), "rows": rows,
            "size": len(dump)}


def test_sources_copying_at_once_each_commit_the_hashes_of_their_own_bytes(world):
    ferry = world["ferry"]
    ferry.scheduled("*/5 * * * *", at_ms=TICK)
    jobs = {s["name"]: ferry.wait_last_job(s["name"], timeout=240) for s in world["sources"]}
    for name, job in jobs.items():
        assert job["phase"] == "committed", (name, job.get("error"))
    # They really ran at the same time: every copy began before any ended.
    starts = [j["started_at"] for j in jobs.values()]
    ends = [j["finished_at"] for j in jobs.values()]
    assert max(starts) < min(ends), (starts, ends)

    def manifest_of(job: dict) -> dict:
        (manifest,) = [m for m in ferry.backups(job["source"]) if m["job_id"] == job["id"]]
        return manifest

    for i in range(D1_DATABASES):
        (art,) = manifest_of(jobs[f"d1-{i}"])["artifacts"]
        served = served_by_d1(world["paths"][f"db{i}-uuid"])
        assert art["parts"] >= 2, art
        assert art["size"] == served["size"]
        assert art["sha256"] == served["sha256"], f"d1-{i}: the manifest's SHA-256 is not of the dump D1 served"
        assert art["md5"] == served["md5"], f"d1-{i}: the manifest's MD5 is not of the dump D1 served"
        assert art["row_counts"] == served["rows"], f"d1-{i}"

    graph = manifest_of(jobs["graph"])
    task_id = graph["provider"]["task_id"]
    assert graph["artifacts"]
    for art in graph["artifacts"]:
        served = world["dgraph"].file(task_id, art["filename"])
        assert art["size"] == len(served)
        assert art["sha256"] == hashlib.sha256(served).hexdigest(), f"graph: {art['filename']}"

    portal = manifest_of(jobs["portal"])
    (backup,) = world["dxp"].state()["backups"]
    by_name = {a["filename"]: a for a in portal["artifacts"]}
    for name, part in (("database.gz", "database"), ("volume.tgz", "volume")):
        assert by_name[name]["size"] == backup[part]["size"]
        assert by_name[name]["sha256"] == backup[part]["sha256"], f"portal: {name}"
    assert by_name["volume.tgz"]["parts"] >= 2
