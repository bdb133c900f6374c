"""End to end: a source with `age_recipients` stores every artifact as an age file, encrypted in
the Worker under `wrangler dev` as it is copied in slices, that Debian's `age` decrypts to the
provider's exact bytes; verify needs no key; a restore and a drill decrypt as they stream, with
the identity held as a Worker secret, and stop before touching anything without it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import sqlite3
from contextlib import closing

from harness import D1Emulator, Ferry, d1_source
from test_e2e_d1 import expected_dump, make_app_db, make_big_db, rows_of

PART_MIB = 5


def age_key(work: Path) -> tuple[Path, str]:
    """A key made by Debian's age-keygen, and its recipient."""
    if not shutil.which("age") or not shutil.which("age-keygen"):
        pytest.fail("Debian's age is missing: bash scripts/setup.sh installs it")
    key = work / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = next(line.split(": ", 1)[1] for line in key.read_text().splitlines() if line.startswith("# public key:"))
    return key, recipient.strip()


def test_an_encrypted_backup_killed_between_slices_is_one_age_file_that_age_decrypts_and_ferry_restores_and_drills(
        tmp_path):
    key, recipient = age_key(tmp_path)
    big = make_big_db(tmp_path / "big.sqlite", mib=3 * PART_MIB + 2)
    expected = expected_dump(big)
    small = make_app_db(tmp_path / "small.sqlite")
    target = tmp_path / "target.sqlite"
    sqlite3.connect(target).close()
    emulator = D1Emulator(tmp_path, {"big-uuid": big, "small-uuid": small, "target-uuid": target},
                          active_polls=1, cancel_after=60)
    # Two 2 MiB pages per slice: the 17 MiB dump takes several slices.
    source = d1_source("sealed", emulator, "big-uuid", part_size_mib=PART_MIB, slice_max_pages=2,
                       age_identity_secret="FERRY_AGE_IDENTITY", drill_schedule="0 4 * * *")
    keyless = d1_source("keyless", emulator, "small-uuid")
    identity = next(line for line in key.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-1"))
    # Both sources take their recipients from FERRY_DEFAULTS.
    ferry = Ferry(tmp_path / "ferry", [source, keyless], secrets={"FERRY_AGE_IDENTITY": identity},
                  defaults={"age_recipients": [recipient]})
    try:
        emulator.control(download_delay_ms=20)
        status, _, payload = ferry.webhook("sealed")
        assert status == 202, payload
        job_id = payload["job"]["id"]
        ferry.wait_job(job_id, phases=("transferring",), timeout=60)
        deadline = time.time() + 60
        while emulator.state()["downloads"] < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert emulator.state()["downloads"] >= 3, "a few pages read before the kill"
        ferry.stop(kill=True)
        emulator.control(download_delay_ms=0)
        ferry.start()
        job = ferry.wait_job(job_id, timeout=180)
        assert job["phase"] == "committed", job
        assert '"secret_' not in str(job), "no key material is shown"

        (manifest,) = ferry.backups("sealed")
        (art,) = manifest["artifacts"]
        assert art["filename"].endswith(".sql.age") and art["key"].endswith(".sql.age"), art
        _, body = ferry.artifact(art["key"])
        assert art["size"] == len(body) and art["sha256"] == hashlib.sha256(body).hexdigest(), \
            "the manifest records what R2 holds: the encrypted file"
        assert art["parts"] >= 3
        assert body.startswith(b"age-encryption.org/v1\n")
        assert expected not in body and b"INSERT INTO" not in body, "nothing of the dump is readable in R2"
        encrypted = tmp_path / "dump.sql.age"
        encrypted.write_bytes(body)
        plain = subprocess.run(["age", "-d", "-i", str(key), str(encrypted)], check=True, capture_output=True).stdout
        assert plain == expected, "age decrypts the file to the provider's exact dump"
        inside = art["details"]["encryption"]["plaintext"]
        assert inside["size"] == len(expected) and inside["sha256"] == hashlib.sha256(expected).hexdigest()
        assert inside["md5"] == hashlib.md5(expected).hexdigest()
        assert inside["row_counts"]["blobs"] > 0
        assert emulator.state()["downloads"] > 4, "the copy read the dump by range pages, and again after the kill"

        # Verify re-reads R2 and needs no key.
        verified = ferry.verify_job("sealed")
        assert verified["phase"] == "verified", verified

        # A restore decrypts as it streams: the empty target gets every row of the source back.
        folder = art["key"].rsplit("/", 1)[0]
        status, answer = ferry.restore(folder, {"target": {"database_id": "target-uuid"}, "confirm": "target-uuid"})
        assert status == 202, answer
        restore = ferry.wait_job(answer["job"]["id"], timeout=180)
        assert restore["phase"] == "restored", restore
        with closing(sqlite3.connect(big)) as a, closing(sqlite3.connect(target)) as b:
            assert rows_of(b) == rows_of(a), "the restored database equals the source, row for row"

        # A drill of the encrypted backup reads its plaintext's MD5, imports it into a scratch
        # database and counts every table's rows.
        status, answer = ferry.api_post("/v1/sources/sealed/drill", {})
        assert status == 202, answer
        drill = ferry.wait_job(answer["job"]["id"], timeout=180)
        assert drill["phase"] == "restored", drill

        # A signed URL that expires mid-copy is renewed and the encrypted copy goes on from where
        # it was: still one age file of the exact dump.
        emulator.control(signed_url_ttl_s=2, download_delay_ms=20)
        renewed = ferry.webhook_job("sealed", timeout=240)
        emulator.control(signed_url_ttl_s=3600, download_delay_ms=0)
        assert renewed["phase"] == "committed", renewed
        assert renewed["renewals"] >= 1, renewed
        (again,) = [m for m in ferry.backups("sealed") if m["job_id"] == renewed["id"]]
        _, body = ferry.artifact(again["artifacts"][0]["key"])
        encrypted.write_bytes(body)
        plain = subprocess.run(["age", "-d", "-i", str(key), str(encrypted)], check=True, capture_output=True).stdout
        assert plain == expected

        # A source without an identity cannot read its encrypted backup: the restore stops before
        # touching the target, naming the setting.
        keyless_job = ferry.webhook_job("keyless", timeout=120)
        assert keyless_job["phase"] == "committed", keyless_job
        (small_backup,) = ferry.backups("keyless")
        imports_before = len(emulator.state()["imports"])
        status, answer = ferry.restore(small_backup["artifacts"][0]["key"].rsplit("/", 1)[0],
                                       {"target": {"database_id": "target-uuid"}, "confirm": "target-uuid",
                                        "replace": True})
        assert status == 202, answer
        refused = ferry.wait_job(answer["job"]["id"], timeout=60)
        assert refused["phase"] == "failed" and "age_identity_secret" in refused["error"], refused
        assert len(emulator.state()["imports"]) == imports_before, "nothing was imported"
    finally:
        ferry.stop()
        emulator.stop()


def test_an_encrypted_aura_graph_export_across_slices_opens_with_age_and_ferrys_drill_loads_it(tmp_path):
    import gzip
    import json

    from harness import AURA_SECRETS, AuraEmulator, aura_source

    key, recipient = age_key(tmp_path)
    identity = next(line for line in key.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-1"))
    emulator = AuraEmulator(tmp_path, nodes=120, rels=200, snapshot_polls=1)
    # Pages of 20 elements, one page per slice: the encrypted file is written over many slices,
    # the inner export's cursor carried in the encrypted copy's.
    source = aura_source("graph", emulator, mode="logical", drill_database="scratch", page_size=20,
                         slice_max_pages=1, age_recipients=[recipient], age_identity_secret="FERRY_AGE_IDENTITY")
    ferry = Ferry(tmp_path / "ferry", [source], secrets={**AURA_SECRETS, "FERRY_AGE_IDENTITY": identity})
    try:
        job = ferry.webhook_job("graph", timeout=180)
        assert job["phase"] == "committed", job
        (manifest,) = ferry.backups("graph")
        (art,) = manifest["artifacts"]
        assert art["filename"] == "graph.jsonl.gz.age"
        assert art["details"]["labels"], "the export's own details are kept next to details.encryption"
        _, body = ferry.artifact(art["key"])
        encrypted = tmp_path / "graph.jsonl.gz.age"
        encrypted.write_bytes(body)
        plain = subprocess.run(["age", "-d", "-i", str(key), str(encrypted)], check=True, capture_output=True).stdout
        assert hashlib.sha256(plain).hexdigest() == art["details"]["encryption"]["plaintext"]["sha256"]
        lines = gzip.decompress(plain).decode().splitlines()
        assert json.loads(lines[-1]) == {"type": "footer", "nodes": 120, "relationships": 200}

        status, answer = ferry.api_post("/v1/sources/graph/drill", {})
        assert status == 202, answer
        drill = ferry.wait_job(answer["job"]["id"], timeout=180)
        assert drill["phase"] == "restored", drill
        assert emulator.graph("scratch") == {"nodes": [], "relationships": []}, "the drill emptied its database"
    finally:
        ferry.stop()
        emulator.stop()
