#!/usr/bin/env python3
"""Load a Ferry backup of a Dgraph source (Dgraph's export files) into a Dgraph cluster with
Dgraph's live loader.

Ferry's Worker cannot do this itself: the live loader talks to Dgraph over **gRPC**, which a
Cloudflare Worker cannot speak. So this runs wherever `dgraph` (the Dgraph binary, which holds
`dgraph live`) and the cluster's gRPC port are reachable.

Usage::

    # the files of a backup, from Ferry's API (FERRY_API_TOKEN in the environment) ...
    python3 scripts/dgraph_live_load.py --ferry https://ferry.example.workers.dev \\
        --backup graph/2026-11-28T030000Z-0123456789abcdef --out ./restore \\
        --admin-url http://localhost:8080 --alpha localhost:9080 --zero localhost:5080 [--dry-run]
    # ... or straight from R2 with wrangler (`wrangler r2 object get`, --remote by default) ...
    python3 scripts/dgraph_live_load.py --r2-bucket ferry-backups --backup graph/2026-… --out ./restore …
    # ... or files already on disk
    python3 scripts/dgraph_live_load.py --dir ./restore …
    # Dgraph Cloud: the backend's gRPC endpoint and an admin API key (DGRAPH_API_KEY)
    python3 scripts/dgraph_live_load.py --dir ./restore --admin-url https://blue-sky.us-east-1.aws.cloud.dgraph.io \\
        --cloud-grpc blue-sky.grpc.us-east-1.aws.cloud.dgraph.io:443

What it does, in Dgraph's documented order (load the GraphQL schema first, then the data):

1. the files: ``gNN.json.gz`` or ``gNN.rdf.gz`` (data), ``gNN.schema.gz`` (DQL schema and types)
   and ``gNN.gql_schema.gz`` (GraphQL schema), one set per Alpha group, as the backup's manifest
   lists them;
2. for each GraphQL schema in ``gNN.gql_schema.gz`` (a JSON array of ``{"Namespace", "Schema"}``)
   the ``updateGQLSchema`` mutation on ``<admin-url>/admin``, with ``X-Auth-Token`` (and
   ``X-Dgraph-AccessToken`` with ACL);
3. per group: ``dgraph live -f gNN.json.gz -s gNN.schema.gz --alpha … --zero …`` (or
   ``--slash_grpc_endpoint=<host>:443 -t <api key>`` for Dgraph Cloud). Further flags (ACL
   ``--creds``, ``--force-namespace -1`` for an all-namespaces export) go in ``--live-arg=…``, one
   word each (``--live-arg=--force-namespace --live-arg=-1``).

``--dry-run`` downloads and loads nothing: it prints the commands (the downloads as ``curl`` or
``wrangler`` commands, the schema step as a ``curl`` fed by ``--gql-payload``), reading only the
backup's manifest (to know its files) or the files already on disk. Secrets are never printed:
commands name the environment variables (``$DGRAPH_API_KEY``, ``$FERRY_API_TOKEN``).
Only the Python standard library is needed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

UPDATE_GQL_SCHEMA = "mutation($sch: String!) { updateGQLSchema(input: {set: {schema: $sch}}) { gqlSchema { schema } } }"
FILE_RE = re.compile(r"^g(\d+)\.(json|rdf|schema|gql_schema)\.gz$")


def gql_schemas(path: Path) -> list[tuple[int, str]]:
    """The (namespace, schema) pairs of a gql_schema file with a schema to load."""
    entries = json.loads(gzip.decompress(path.read_bytes()) or b"[]")
    return [(int(e.get("Namespace", 0)), e["Schema"]) for e in entries if isinstance(e, dict) and e.get("Schema")]


def gql_payload(path: Path, namespace: int) -> dict:
    schemas = [s for ns, s in gql_schemas(path) if ns == namespace]
    if not schemas:
        raise SystemExit(f"{path} holds no GraphQL schema for namespace {namespace}")
    return {"query": UPDATE_GQL_SCHEMA, "variables": {"sch": schemas[0]}}


def groups_of(names: list[str]) -> dict[int, dict[str, str]]:
    """{group: {"data" | "schema" | "gql_schema": file name}} of Dgraph's export files."""
    groups: dict[int, dict[str, str]] = {}
    for name in names:
        m = FILE_RE.match(name)
        if m:
            kind = "data" if m.group(2) in ("json", "rdf") else m.group(2)
            groups.setdefault(int(m.group(1)), {})[kind] = name
    return dict(sorted(groups.items()))


def cmd(argv: list[str]) -> str:
    """A shell command line; `$VAR` words stay expandable."""
    return " ".join(a if re.fullmatch(r'"[^"`\\]*"|[\w./:@=,+-]+', a) else shlex.quote(a) for a in argv)


class Backup:
    """Where the backup's files come from."""

    def __init__(self, args):
        self.args = args
        if args.dir:
            self.out = Path(args.dir)
        else:
            source, _, folder = args.backup.strip("/").partition("/")
            if not source or not folder or "/" in folder:
                raise SystemExit("--backup must be <source>/<folder>, as GET /v1/sources/{name}/backups lists it")
            self.prefix = f"{source}/{folder}/"
            self.out = Path(args.out or folder)

    def names(self) -> list[str]:
        if self.args.dir:
            return sorted(p.name for p in self.out.iterdir() if FILE_RE.match(p.name))
        manifest = json.loads(self.read(self.prefix + "manifest.json"))
        return [a["filename"] for a in manifest.get("artifacts", []) if FILE_RE.match(a.get("filename", ""))]

    def read(self, key: str) -> bytes:
        """An object of the backup (the manifest), read whatever the mode."""
        if self.args.ferry:
            req = urllib.request.Request(self.url(key), headers=self.auth())
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                raise SystemExit(f"GET {self.url(key)}: HTTP {e.code} {e.read()[:300]!r}")
        out = subprocess.run(self.wrangler(key, ["--pipe"]), capture_output=True)
        if out.returncode != 0:
            raise SystemExit(f"wrangler r2 object get {key} failed: {out.stderr.decode(errors='replace')[-500:]}")
        return out.stdout

    def url(self, key: str) -> str:
        return f"{self.args.ferry.rstrip('/')}/v1/backups/{urllib.parse.quote(key, safe='/')}"

    def auth(self) -> dict:
        token = os.environ.get(self.args.token_env)
        if not token:
            raise SystemExit(f"set {self.args.token_env} to Ferry's API token")
        return {"authorization": f"Bearer {token}"}

    def wrangler(self, key: str, target: list[str]) -> list[str]:
        extra = self.args.wrangler_arg if self.args.wrangler_arg else ["--remote"]
        return ["npx", "wrangler", "r2", "object", "get", f"{self.args.r2_bucket}/{key}", *target, *extra]

    def fetch_commands(self, names: list[str]) -> list[list[str]]:
        if self.args.dir:
            return []
        commands = [["mkdir", "-p", str(self.out)]]
        for name in names:
            dest = str(self.out / name)
            if self.args.ferry:
                commands.append(["curl", "-fsS", "-H", f'"Authorization: Bearer ${self.args.token_env}"', "-o", dest,
                                 self.url(self.prefix + name)])
            else:
                commands.append(self.wrangler(self.prefix + name, ["--file", dest]))
        return commands

    def fetch(self, names: list[str]) -> None:
        if self.args.dir:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in names:
            dest = self.out / name
            if self.args.ferry:
                dest.write_bytes(self.read(self.prefix + name))
            else:
                subprocess.run(self.wrangler(self.prefix + name, ["--file", str(dest)]), check=True)
            print(f"downloaded {dest} ({dest.stat().st_size} bytes)", file=sys.stderr)


def live_command(args, data: Path, schema: Path | None, reveal: bool) -> list[str]:
    argv = ["dgraph", "live", "-f", str(data)]
    if schema is not None:
        argv += ["-s", str(schema)]
    if args.cloud_grpc:
        key = os.environ.get(args.api_key_env, "") if reveal else f'"${args.api_key_env}"'
        argv += [f"--slash_grpc_endpoint={args.cloud_grpc}", "-t", key]
    else:
        argv += ["--alpha", args.alpha]
        if args.zero:
            argv += ["--zero", args.zero]
    return argv + list(args.live_arg or [])


def gql_command(args, path: Path, namespace: int) -> str:
    script = shlex.quote(os.path.relpath(__file__))
    headers = ["-H", "'Content-Type: application/json'", "-H", f'"X-Auth-Token: ${args.api_key_env}"']
    if args.access_token_env:
        headers += ["-H", f'"X-Dgraph-AccessToken: ${args.access_token_env}"']
    return (f"python3 {script} --gql-payload {shlex.quote(str(path))} --namespace {namespace} | "
            f"curl -fsS -X POST {' '.join(headers)} --data-binary @- {shlex.quote(args.admin_url.rstrip('/') + '/admin')}")


def update_gql_schema(args, namespace: int, schema: str) -> None:
    headers = {"content-type": "application/json"}
    if os.environ.get(args.api_key_env):
        headers["x-auth-token"] = os.environ[args.api_key_env]
    if args.access_token_env and os.environ.get(args.access_token_env):
        headers["x-dgraph-accesstoken"] = os.environ[args.access_token_env]
    body = json.dumps({"query": UPDATE_GQL_SCHEMA, "variables": {"sch": schema}}).encode()
    req = urllib.request.Request(args.admin_url.rstrip("/") + "/admin", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read() or b"{}")
    if answer.get("errors"):
        raise SystemExit(f"updateGQLSchema (namespace {namespace}) failed: {answer['errors']}")
    print(f"GraphQL schema of namespace {namespace} loaded", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gql-payload", type=Path, help="print the updateGQLSchema request for this gql_schema file, then exit")
    p.add_argument("--namespace", type=int, default=0, help="with --gql-payload: the namespace whose schema to send")
    src = p.add_argument_group("the backup (one of)")
    src.add_argument("--dir", help="the files are already in this directory")
    src.add_argument("--ferry", help="Ferry's base URL: files come from GET /v1/backups/{key}")
    src.add_argument("--r2-bucket", help="the R2 bucket: files come from `wrangler r2 object get`")
    src.add_argument("--backup", help="<source>/<folder> of the backup (with --ferry or --r2-bucket)")
    src.add_argument("--out", help="where downloaded files go (default: the folder's name)")
    src.add_argument("--token-env", default="FERRY_API_TOKEN", help="variable holding Ferry's API token")
    src.add_argument("--wrangler-arg", action="append", help="wrangler flags instead of --remote (repeat; write --wrangler-arg=--local)")
    dst = p.add_argument_group("the Dgraph cluster")
    dst.add_argument("--alpha", help="an Alpha's gRPC address, host:9080")
    dst.add_argument("--zero", help="a Zero's gRPC address, host:5080")
    dst.add_argument("--cloud-grpc", help="Dgraph Cloud: the backend's gRPC endpoint, <name>.grpc.<region>...:443")
    dst.add_argument("--admin-url", help="the HTTP base for /admin (the GraphQL schema step)")
    dst.add_argument("--api-key-env", default="DGRAPH_API_KEY", help="variable holding an admin API key")
    dst.add_argument("--access-token-env", help="variable holding an ACL accessJWT for /admin")
    dst.add_argument("--live-arg", action="append", help="one more argument for `dgraph live` (repeat; write flags as --live-arg=--flag)")
    p.add_argument("--dry-run", action="store_true", help="print the commands; download and load nothing")
    p.add_argument("--download-only", action="store_true", help="fetch the files, load nothing")
    args = p.parse_args(argv)

    if args.gql_payload:
        print(json.dumps(gql_payload(args.gql_payload, args.namespace)))
        return 0
    if sum(bool(x) for x in (args.dir, args.ferry, args.r2_bucket)) != 1:
        p.error("give exactly one of --dir, --ferry, --r2-bucket")
    if not args.dir and not args.backup:
        p.error("--ferry and --r2-bucket need --backup <source>/<folder>")
    if not args.download_only and not (args.alpha or args.cloud_grpc):
        p.error("give --alpha host:9080 (with --zero host:5080) or --cloud-grpc host:443")

    backup = Backup(args)
    names = backup.names()
    groups = groups_of(names)
    if not any("data" in g for g in groups.values()):
        raise SystemExit(f"no Dgraph data file (gNN.json.gz / gNN.rdf.gz) in the backup: {names}")
    if args.dry_run:
        for c in backup.fetch_commands(names):
            print(cmd(c))
    else:
        backup.fetch(names)
        if args.download_only:
            return 0

    for gid, files in groups.items():
        if "gql_schema" not in files:
            continue
        path = backup.out / files["gql_schema"]
        namespaces = [ns for ns, _ in gql_schemas(path)] if path.exists() else [0]
        if not args.admin_url:
            if namespaces:
                print(f"# skipped: the GraphQL schema in {path} (give --admin-url to load it)", file=sys.stderr)
            continue
        for ns in namespaces:
            if args.dry_run:
                print(gql_command(args, path, ns))
            else:
                update_gql_schema(args, ns, dict(gql_schemas(path))[ns])

    for gid, files in groups.items():
        if "data" not in files:
            continue
        schema = backup.out / files["schema"] if "schema" in files else None
        if args.dry_run:
            print(cmd(live_command(args, backup.out / files["data"], schema, reveal=False)))
        else:
            shown = cmd(live_command(args, backup.out / files["data"], schema, reveal=False))
            print(f"running: {shown}", file=sys.stderr)
            done = subprocess.run(live_command(args, backup.out / files["data"], schema, reveal=True))
            if done.returncode != 0:
                return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
