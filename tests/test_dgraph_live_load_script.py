"""scripts/dgraph_live_load.py: the live-loader path for Ferry's Dgraph exports (gRPC, so outside
the Worker). Dry runs against export files on disk (made by the Dgraph emulator's exporter) and a
download from a stand-in of Ferry's file route."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dgraph_live_load.py"
sys.path.insert(0, str(ROOT / "tests" / "emulators"))
from dgraph import Dataset, build_export_files  # noqa: E402

SECRET = "admin-key-never-printed"


def run(*args, cwd=ROOT, stdin=None):
    env = {**os.environ, "DGRAPH_API_KEY": SECRET, "FERRY_API_TOKEN": "ferry-token-never-printed"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          input=stdin)


@pytest.fixture
def export_dir(tmp_path):
    """A two-group JSON export as Dgraph writes it."""
    d = tmp_path / "dgraph.r123.u1128.0300"
    d.mkdir()
    for name, data in build_export_files(Dataset(acl=False), "json", -1, 2).items():
        (d / name).write_bytes(data)
    return d


def test_dry_run_prints_the_schema_step_then_one_live_load_per_group(export_dir):
    out = run("--dir", str(export_dir), "--alpha", "localhost:9080", "--zero", "localhost:5080",
              "--admin-url", "http://localhost:8080", "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"python3 scripts/dgraph_live_load.py --gql-payload {export_dir}/g01.gql_schema.gz "
                               "--namespace 0 | curl -fsS -X POST")
    assert '"X-Auth-Token: $DGRAPH_API_KEY"' in lines[0] and lines[0].endswith("http://localhost:8080/admin")
    assert lines[1] == (f"dgraph live -f {export_dir}/g01.json.gz -s {export_dir}/g01.schema.gz "
                        "--alpha localhost:9080 --zero localhost:5080")
    assert lines[2] == (f"dgraph live -f {export_dir}/g02.json.gz -s {export_dir}/g02.schema.gz "
                        "--alpha localhost:9080 --zero localhost:5080")
    assert SECRET not in out.stdout + out.stderr


def test_the_printed_schema_payload_is_the_backups_graphql_schema(export_dir):
    out = run("--gql-payload", str(export_dir / "g01.gql_schema.gz"), "--namespace", "0")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    (entry,) = json.loads(gzip.decompress((export_dir / "g01.gql_schema.gz").read_bytes()))
    assert "updateGQLSchema(input: {set: {schema: $sch}})" in payload["query"]
    assert payload["variables"] == {"sch": entry["Schema"]}
    missing = run("--gql-payload", str(export_dir / "g01.gql_schema.gz"), "--namespace", "7")
    assert missing.returncode != 0 and "no GraphQL schema for namespace 7" in missing.stderr


def test_dry_run_for_dgraph_cloud_names_the_key_variable_and_passes_extra_flags(export_dir):
    out = run("--dir", str(export_dir), "--cloud-grpc", "blue.grpc.us-east-1.aws.cloud.dgraph.io:443",
              "--live-arg=--force-namespace", "--live-arg=-1", "--dry-run")
    assert out.returncode == 0, out.stderr
    first = out.stdout.strip().splitlines()[0]
    assert first == (f"dgraph live -f {export_dir}/g01.json.gz -s {export_dir}/g01.schema.gz "
                     "--slash_grpc_endpoint=blue.grpc.us-east-1.aws.cloud.dgraph.io:443 -t \"$DGRAPH_API_KEY\" "
                     "--force-namespace -1")
    assert SECRET not in out.stdout
    assert "skipped: the GraphQL schema" in out.stderr


def test_missing_data_and_missing_target_are_refused(tmp_path, export_dir):
    assert "give --alpha" in run("--dir", str(export_dir), "--dry-run").stderr
    assert "no Dgraph data file" in run("--dir", str(tmp_path), "--alpha", "a:1", "--dry-run").stderr


class FakeFerry(BaseHTTPRequestHandler):
    files: dict = {}
    seen: list = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("authorization")))
        key = self.path.removeprefix("/v1/backups/")
        data = self.files.get(key)
        self.send_response(200 if data is not None else 404)
        self.send_header("content-length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args):
        pass


def test_files_come_from_ferrys_file_route_listed_by_the_manifest(tmp_path, export_dir):
    folder = "graph/2026-11-28T030000Z-0123456789abcdef"
    names = ["g01.json.gz", "g01.schema.gz", "g01.gql_schema.gz"]
    FakeFerry.files = {f"{folder}/{n}": (export_dir / n).read_bytes() for n in names}
    FakeFerry.files[f"{folder}/manifest.json"] = json.dumps(
        {"artifacts": [{"filename": n, "key": f"{folder}/{n}"} for n in names]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeFerry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = run("--ferry", base, "--backup", folder, "--out", str(tmp_path / "dl"), "--alpha", "localhost:9080",
                  "--dry-run")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert lines[1] == (f'curl -fsS -H "Authorization: Bearer $FERRY_API_TOKEN" -o {tmp_path}/dl/g01.json.gz '
                            f"{base}/v1/backups/{folder}/g01.json.gz")
        assert lines[-1] == f"dgraph live -f {tmp_path}/dl/g01.json.gz -s {tmp_path}/dl/g01.schema.gz --alpha localhost:9080"
        assert not (tmp_path / "dl").exists(), "a dry run downloads nothing"
        assert [p for p, _ in FakeFerry.seen] == [f"/v1/backups/{folder}/manifest.json"]
        out = run("--ferry", base, "--backup", folder, "--out", str(tmp_path / "dl"), "--download-only")
        assert out.returncode == 0, out.stderr
        for n in names:
            assert (tmp_path / "dl" / n).read_bytes() == (export_dir / n).read_bytes()
        assert {auth for _, auth in FakeFerry.seen} == {"Bearer ferry-token-never-printed"}
    finally:
        server.shutdown()
