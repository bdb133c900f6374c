#!/usr/bin/env python3
"""Benchmark: Ferry's copy against a minimal JS pass-through Worker and a plain download.

One command, one run, one build, one local source. Against the DXP emulator
(tests/emulators/dxp.py) serving one backup whose volume.tgz has ``--size-mib`` MiB and a
Content-Length, it measures, best of ``--runs`` each:

  1. the plain-download floor: Python reading the volume URL and discarding the bytes (and once
     more while hashing with SHA-256, what checksumming alone costs);
  2. the JS pass-through Worker (bench/js_passthrough/worker.js, ``env.BUCKET.put(key, (await
     fetch(src)).body)``, the approach of Cloudflare's D1 backup example) under ``wrangler dev``,
     timed from its request to its answer;
  3. Ferry (the built Worker, a snapshot of build/ taken at start) under ``wrangler dev``, backing up
     that DXP source through the signed webhook, timed from the trigger to the committed job, once
     per ``--parts-in-flight`` value, each value in a fresh ``wrangler dev``. While Ferry copies, a
     thread samples ``GET /v1/jobs/{id}`` every ~100 ms (p50/p99/max latency), and after each job the
     peak wasm memory is read from the Worker's log (``wasm memory N MiB``; "n/a" when absent).

Every copy is verified: size and SHA-256 of what R2 holds (read back through Ferry's
``GET /v1/backups/{key}``, or the JS Worker's read-back route) equal the emulator's file.
It prints the machine, a table, and the ratio Ferry / JS Worker (best vs best; target <= 1.0).

``--big`` (opt-in) also copies a 6144 MiB volume (more than one R2 put can store) and a 100 MiB
volume with the same settings, each in a fresh ``wrangler dev``, checks both byte for byte and
prints both peak wasm memories and whether they are equal.

Usage (the Worker must be built first: bash scripts/build.sh):
  python3 bench/transfer.py [--size-mib 1024] [--runs 3] [--parts-in-flight 1,2,4,6]
                            [--part-size-mib N] [--slice-max-mib N] [--slice-max-seconds N]
                            [--big | --big-only] [--keep] [--baseline OTHER/build] [--encrypt]
                            [--sealed-kill-only]
``--baseline`` runs Ferry once more from another checkout's build/ (e.g. the previous commit,
built in a git worktree) in the same run, and prints this build's time over it.
``--sealed-kill-only`` copies the volume encrypted in slices of ``--slice-max-mib`` (default 128),
kills the Worker after three slices, starts it again and checks the committed age file with
``age -d``.
``--encrypt`` runs Ferry once more with every file encrypted to an age recipient (a key made by
``age-keygen``), checks each file by decrypting it with Debian's ``age``, and prints encrypted /
unencrypted.
The Ferry source fields part_size_mib, parts_in_flight, slice_max_mib and slice_max_seconds are
sent only when given here, so the script also runs against an engine that does not know them.
Volumes are built once and cached (``--cache-dir``, default ~/.cache/ferry-bench). Every process
started here is stopped at the end, on Ctrl-C and on errors too; each Worker runs with its own
temporary --persist-to folder, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import (  # noqa: E402
    API_TOKEN, DXP_MASTER_TOKEN, DXP_PASSWORD, DXP_SECRETS, DXP_USER, DXP_USER_TOKEN,
    FERRY_WRANGLER_FLAGS, NODE22_BIN, TERMINAL, WRANGLER, Emulator, Ferry, Http,
    Process, dxp_source, free_port, tool_env,
)

MIB = 1 << 20
READ_CHUNK = 1 << 20
# The same credential for all three: the DXP master token, sent as `Authorization: Bearer`.
SOURCE_AUTH = {"authorization": f"Bearer {DXP_MASTER_TOKEN}"}
RE_WASM_MEMORY = re.compile(r"wasm memory\D{0,5}(\d+)\s*MiB")


# ----- processes -------------------------------------------------------------------------------
class Cleanup:
    """Everything started here, stopped in reverse order whatever happens."""

    def __init__(self):
        self.items: list = []

    def add(self, item):
        self.items.append(item)
        return item

    def discard(self, item) -> None:
        if item in self.items:
            self.items.remove(item)

    def stop_all(self) -> None:
        while self.items:
            item = self.items.pop()
            try:
                item.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {item!r}: {e}", file=sys.stderr)


class DxpSource(Emulator):
    """The DXP emulator with one backup whose volume has `volume_mib` MiB, artifacts cached."""

    script = "dxp.py"

    def __init__(self, workdir: Path, cache: Path, volume_mib: int):
        cache.mkdir(parents=True, exist_ok=True)
        args = ["--workdir", str(cache), "--user", DXP_USER, "--password", DXP_PASSWORD,
                "--user-token", DXP_USER_TOKEN, "--master-token", DXP_MASTER_TOKEN, "--backups", "1",
                "--volume-mib", str(volume_mib), "--database-kib", "1"]
        # Building a multi-GiB volume the first time takes minutes; it is cached afterwards.
        try:
            super().__init__(workdir, args, f"dxp-emulator-{volume_mib}.log", ready_timeout=3600)
        except BaseException:
            if getattr(self, "process", None) is not None:
                self.stop()
            raise
        self.backup = self.state()["backups"][-1]
        self.volume = self.backup["volume"]
        self.volume_url = f"{self.url}/backup/download/volume/{self.backup['backupId']}"

    def stop(self) -> None:
        # SIGINT first: while it is still building a volume, the emulator then deletes its
        # unfinished temporary file (SIGTERM would leave it in the cache folder).
        if self.process.alive():
            try:
                os.killpg(self.process.proc.pid, signal.SIGINT)
                self.process.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.process.stop()

    def __repr__(self):
        return f"<DXP emulator :{getattr(self, 'port', None)}>"


class WranglerDev:
    """`wrangler dev` on a free port with its own persist folder, like tests/harness.py's Ferry."""

    def __init__(self, workdir: Path, config: Path, ready_path: str = "/", need_200: bool = True):
        self.workdir = workdir
        self.config = config
        self.persist = workdir / "state"
        self.port = free_port()
        self.http = Http(f"http://127.0.0.1:{self.port}")
        env = tool_env(WRANGLER_LOG_PATH=str(workdir / "wrangler-logs"))
        args = [str(WRANGLER), "dev", "--config", str(config), "--ip", "127.0.0.1", "--port", str(self.port),
                "--persist-to", str(self.persist), *FERRY_WRANGLER_FLAGS]
        self.process = Process(args, workdir / "wrangler.log", cwd=workdir, env=env)
        try:
            deadline = time.time() + 90
            while time.time() < deadline:
                if not self.process.alive():
                    raise RuntimeError(f"wrangler dev exited:\n{self.process.tail()}")
                try:
                    status = self.http.request("GET", ready_path, timeout=2)[0]
                    if status == 200 or not need_200:
                        return
                except OSError:
                    pass
                time.sleep(0.25)
            raise RuntimeError(f"wrangler dev did not become ready:\n{self.process.tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def log_text(self) -> str:
        paths = [self.workdir / "wrangler.log", *sorted((self.workdir / "wrangler-logs").glob("*.log"))]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())


class JsWorker(WranglerDev):
    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        for name in ("worker.js", "wrangler.toml"):
            shutil.copy2(ROOT / "bench" / "js_passthrough" / name, workdir / name)
        super().__init__(workdir, workdir / "wrangler.toml", need_200=False)

    def __repr__(self):
        return f"<JS worker :{self.port}>"


class BenchFerry(Ferry):
    """tests/harness.py's Ferry, but on a snapshot of the bundle (build/ may be rebuilt meanwhile)
    and never building it."""

    def __init__(self, workdir: Path, sources: list, bundle: Path):
        try:
            super().__init__(workdir, sources, secrets=DXP_SECRETS, bundle=bundle)
        except BaseException:
            self.stop()  # harness.Ferry.start leaves a process that never became ready running
            raise

    def log_text(self) -> str:
        paths = [self.workdir / "wrangler.log", *sorted((self.workdir / "wrangler-logs").glob("*.log"))]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def __repr__(self):
        return f"<Ferry :{self.port}>"


# ----- measurements ----------------------------------------------------------------------------
def stream(url: str, headers: dict, hash_it: bool, timeout: float = 600) -> tuple[float, int, str | None, dict]:
    """GETs `url`, reading the body 1 MiB at a time: (seconds, bytes, sha256 or None, headers)."""
    req = urllib.request.Request(url, headers=headers)
    h = hashlib.sha256() if hash_it else None
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    size = 0
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        got_headers = {k.lower(): v for k, v in resp.headers.items()}
        while n := resp.readinto(buf):
            size += n
            if h is not None:
                h.update(view[:n])
    return time.perf_counter() - start, size, (h.hexdigest() if h else None), got_headers


class Run:
    """One measured copy."""

    def __init__(self, seconds: float | None = None, error: str | None = None):
        self.seconds = seconds
        self.error = error
        self.latencies: list[float] = []
        self.wasm_mib: int | None = None
        self.verified = ""


class Row:
    """A line of the table: a method, its runs."""

    def __init__(self, label: str, nbytes: int):
        self.label = label
        self.nbytes = nbytes
        self.runs: list[Run] = []
        self.wasm_mib: int | None = None  # peak over the row's Worker process
        self.note = ""

    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.error is None and r.seconds is not None]

    def best(self) -> float | None:
        ok = self.ok()
        return min(r.seconds for r in ok) if ok else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class StatusSampler(threading.Thread):
    """Asks Ferry for the job every `interval` s (back to back when an answer takes longer) until
    the job ends; keeps the latency of each answer given while the job was still copying."""

    def __init__(self, ferry: Ferry, job_id: str, timeout: float, interval: float = 0.1):
        super().__init__(daemon=True)
        self.ferry, self.job_id, self.timeout, self.interval = ferry, job_id, timeout, interval
        self.samples: list[tuple[str, float]] = []  # (phase, seconds)
        self.job: dict | None = None
        self.ended_at: float | None = None
        self.error: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.perf_counter() + self.timeout
        failures = 0
        while not self.halt.is_set():
            if time.perf_counter() > deadline:
                self.error = f"job {self.job_id} did not end within {self.timeout:.0f} s"
                return
            t0 = time.perf_counter()
            try:
                status, _, body = self.ferry.api(f"/v1/jobs/{self.job_id}", timeout=max(1.0, self.timeout))
            except OSError as e:
                failures += 1
                if failures >= 20:
                    self.error = f"status requests keep failing: {e}"
                    return
                time.sleep(self.interval)
                continue
            t1 = time.perf_counter()
            if status != 200:
                self.error = f"GET /v1/jobs/{self.job_id} answered {status}: {body[:300]!r}"
                return
            job = json.loads(body)
            if job["phase"] in TERMINAL or job["phase"] == "dispatched":
                self.job, self.ended_at = job, t1
                return
            self.samples.append((job["phase"], t1 - t0))
            time.sleep(max(0.0, self.interval - (t1 - t0)))

    def copy_latencies(self) -> list[float]:
        copying = [s for p, s in self.samples if p == "transferring"]
        return copying or [s for _, s in self.samples]


def wasm_peak(worker, previous_matches: int, wait: float = 5.0) -> tuple[int | None, int]:
    """The largest `wasm memory N MiB` logged so far (wasm memory never shrinks, so in a fresh
    process that is its peak), waiting up to `wait` s for a line newer than `previous_matches`."""
    deadline = time.time() + wait
    while True:
        found = [int(m) for m in RE_WASM_MEMORY.findall(worker.log_text())]
        if len(found) > previous_matches or time.time() > deadline:
            return (max(found) if found else None), len(found)
        time.sleep(0.2)


def verify_ferry(ferry: BenchFerry, source: str, job: dict, emu: DxpSource) -> str:
    """Checks the committed backup's volume (and database) against the emulator's files."""
    (manifest,) = [m for m in ferry.backups(source) if m["job_id"] == job["id"]]
    by_name = {a["filename"]: a for a in manifest["artifacts"]}
    parts = "?"
    for name, expected in (("volume.tgz", emu.backup["volume"]), ("database.gz", emu.backup["database"])):
        art = by_name[name]
        url = f"{ferry.http.base}/v1/backups/{urllib.parse.quote(art['key'])}"
        _, size, sha, headers = stream(url, {"authorization": f"Bearer {API_TOKEN}"}, hash_it=True)
        if (size, sha) != (expected["size"], expected["sha256"]):
            raise AssertionError(f"{name}: R2 holds {size} bytes sha256 {sha}, the source served "
                                 f"{expected['size']} bytes sha256 {expected['sha256']}")
        if art["sha256"] != sha or headers.get("x-ferry-sha256", sha) != sha or art["size"] != size:
            raise AssertionError(f"{name}: manifest/header disagree with the bytes: {art}, {headers.get('x-ferry-sha256')}")
        if name == "volume.tgz":
            parts = art.get("parts", "?")
    return f"ok, {parts} parts"


def verify_sealed(ferry: BenchFerry, source: str, job: dict, emu: DxpSource, key_file: Path) -> str:
    """An encrypted backup: each file, read back from R2 and decrypted by Debian's `age`, is the
    emulator's file; the manifest records the encrypted bytes and the plaintext inside."""
    (manifest,) = [m for m in ferry.backups(source) if m["job_id"] == job["id"]]
    by_name = {a["filename"]: a for a in manifest["artifacts"]}
    for name, expected in (("volume.tgz", emu.backup["volume"]), ("database.gz", emu.backup["database"])):
        art = by_name[name + ".age"]
        url = f"{ferry.http.base}/v1/backups/{urllib.parse.quote(art['key'])}"
        req = urllib.request.Request(url, headers={"authorization": f"Bearer {API_TOKEN}"})
        age = subprocess.Popen(["age", "-d", "-i", str(key_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        sealed, plain, size = hashlib.sha256(), hashlib.sha256(), 0

        def drain():
            nonlocal size
            while chunk := age.stdout.read(1 << 20):
                plain.update(chunk)
                size += len(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        with urllib.request.urlopen(req, timeout=600) as resp:
            while chunk := resp.read(1 << 20):
                sealed.update(chunk)
                age.stdin.write(chunk)
        age.stdin.close()
        reader.join()
        if age.wait() != 0:
            raise AssertionError(f"{name}.age: age -d failed")
        if (size, plain.hexdigest()) != (expected["size"], expected["sha256"]):
            raise AssertionError(f"{name}.age decrypts to {size} bytes sha256 {plain.hexdigest()}, not the source's")
        if art["sha256"] != sealed.hexdigest():
            raise AssertionError(f"{name}.age: the manifest's sha256 is not the encrypted file's")
        if art["details"]["encryption"]["plaintext"]["sha256"] != expected["sha256"]:
            raise AssertionError(f"{name}.age: the manifest's plaintext sha256 is not the source's")
    return "ok, age -d"


def verify_js(js: JsWorker, key: str, emu: DxpSource) -> str:
    _, size, sha, _ = stream(f"{js.http.base}/?key={urllib.parse.quote(key)}", {}, hash_it=True)
    if (size, sha) != (emu.volume["size"], emu.volume["sha256"]):
        raise AssertionError(f"R2 holds {size} bytes sha256 {sha}, the source served "
                             f"{emu.volume['size']} bytes sha256 {emu.volume['sha256']}")
    return "ok"


def run_floor(emu: DxpSource, runs: int) -> tuple[Row, Row]:
    plain = Row("plain download (Python, discard)", emu.volume["size"])
    hashed = Row("plain download + sha256 (Python)", emu.volume["size"])
    for _ in range(runs):
        for row, hash_it in ((plain, False), (hashed, True)):
            seconds, size, sha, _ = stream(emu.volume_url, SOURCE_AUTH, hash_it)
            run = Run(seconds)
            if size != emu.volume["size"] or (hash_it and sha != emu.volume["sha256"]):
                run.error = f"read {size} bytes sha256 {sha}"
            else:
                run.verified = "ok" if hash_it else "size ok"
            row.runs.append(run)
    return plain, hashed


def run_js(emu: DxpSource, work: Path, runs: int, cleanup: Cleanup, timeout: float) -> Row:
    row = Row("JS Worker: put(key, (await fetch(src)).body)", emu.volume["size"])
    js = cleanup.add(JsWorker(work / "js"))
    try:
        for i in range(runs):
            key = f"bench/run-{i}/volume.tgz"
            query = urllib.parse.urlencode({"src": emu.volume_url, "key": key})
            start = time.perf_counter()
            status, _, body = js.http.request("POST", f"/copy?{query}", b"", SOURCE_AUTH, timeout=timeout)
            seconds = time.perf_counter() - start
            run = Run(seconds)
            if status != 200:
                run.error = f"HTTP {status}: {body[:200].decode(errors='replace')}"
            else:
                try:
                    run.verified = verify_js(js, key, emu)
                except Exception as e:
                    run.error = f"verification failed: {e}"
            row.runs.append(run)
            print(f"  JS Worker run {i + 1}: {fmt_run(run)}", flush=True)
    finally:
        cleanup.discard(js)
        js.stop()
    return row


def ferry_fields(args, parts_in_flight: int | None) -> dict:
    fields = {}
    if args.part_size_mib is not None:
        fields["part_size_mib"] = args.part_size_mib
    if parts_in_flight is not None:
        fields["parts_in_flight"] = parts_in_flight
    if args.slice_max_mib is not None:
        fields["slice_max_mib"] = args.slice_max_mib
    if args.slice_max_seconds is not None:
        fields["slice_max_seconds"] = args.slice_max_seconds
    return fields


def describe(fields: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items()) or "default settings"


def run_ferry(emu: DxpSource, work: Path, bundle: Path, fields: dict, runs: int, cleanup: Cleanup,
              timeout: float, label: str | None = None, key_file: Path | None = None) -> Row:
    """`runs` backups of the same backup (one source each: a source never copies a backup twice) in
    one fresh `wrangler dev`, so the peak wasm memory logged is this configuration's."""
    total = emu.backup["volume"]["size"] + emu.backup["database"]["size"]
    row = Row(label or f"Ferry, {describe(fields)}", total)
    names = [f"bench-{i}" for i in range(runs)]
    sources = [dxp_source(n, emu, auth="master_token", **fields) for n in names]
    ferry = cleanup.add(BenchFerry(work, sources, bundle))
    try:
        status, _, body = ferry.api("/v1/sources")
        if status != 200:
            row.note = f"Ferry refused the configuration: HTTP {status} {body[:300].decode(errors='replace')}"
            print(f"  {row.label}: {row.note}", flush=True)
            return row
        matches = 0
        for i, name in enumerate(names):
            run = Run()
            start = time.perf_counter()
            status, _, payload = ferry.webhook(name, body=b"{}")
            if status != 202:
                run.error = f"webhook answered {status}: {payload}"
                row.runs.append(run)
                continue
            sampler = StatusSampler(ferry, payload["job"]["id"], timeout)
            sampler.start()
            try:
                sampler.join()
            except KeyboardInterrupt:
                sampler.halt.set()
                raise
            run.latencies = sampler.copy_latencies()
            job = sampler.job
            if sampler.error or job is None:
                run.error = sampler.error or "no answer"
            elif job["phase"] != "committed":
                run.error = f"job {job['phase']}: {job.get('error') or job.get('note')}"
            else:
                run.seconds = sampler.ended_at - start
                try:
                    if key_file is not None:
                        run.verified = verify_sealed(ferry, name, job, emu, key_file)
                    else:
                        run.verified = verify_ferry(ferry, name, job, emu)
                except Exception as e:
                    run.error = f"verification failed: {e}"
            run.wasm_mib, matches = wasm_peak(ferry, matches)
            row.runs.append(run)
            print(f"  {row.label} run {i + 1}: {fmt_run(run)}", flush=True)
        peaks = [r.wasm_mib for r in row.runs if r.wasm_mib is not None]
        row.wasm_mib = max(peaks) if peaks else None
    finally:
        cleanup.discard(ferry)
        ferry.stop()
    return row


# ----- reporting -------------------------------------------------------------------------------
def fmt_run(run: Run) -> str:
    if run.error:
        return f"FAILED: {run.error}"
    extra = []
    if run.latencies:
        extra.append(f"status p50 {percentile(run.latencies, 50) * 1000:.0f} ms, "
                     f"p99 {percentile(run.latencies, 99) * 1000:.0f} ms ({len(run.latencies)} samples)")
    if run.wasm_mib is not None:
        extra.append(f"wasm memory {run.wasm_mib} MiB")
    if run.verified:
        extra.append(f"verified {run.verified}")
    return f"{run.seconds:.2f} s" + (", " + ", ".join(extra) if extra else "")


def print_table(rows: list[Row]) -> None:
    head = f"{'what':<46} {'best s':>8} {'MiB/s':>8}  {'all runs (s)':<22} {'status ms p50/p99/max (n)':<26} {'wasm peak':>9}  verified"
    print(head)
    print("-" * len(head))
    for row in rows:
        best = row.best()
        runs = " ".join("FAIL" if r.error else f"{r.seconds:.2f}" for r in row.runs) or "-"
        lat = [x for r in row.ok() for x in r.latencies]
        lat_s = (f"{percentile(lat, 50) * 1000:.0f}/{percentile(lat, 99) * 1000:.0f}/{max(lat) * 1000:.0f} ({len(lat)})"
                 if lat else "-")
        is_ferry = row.label.startswith("Ferry")
        wasm = f"{row.wasm_mib} MiB" if row.wasm_mib is not None else ("n/a" if is_ferry else "-")
        verified = "; ".join(sorted({r.verified for r in row.ok() if r.verified})) or "-"
        if best is None:
            print(f"{row.label:<46} {'FAILED':>8} {'':>8}  {runs:<22} {lat_s:<26} {wasm:>9}  {verified}")
        else:
            print(f"{row.label:<46} {best:8.2f} {row.nbytes / MIB / best:8.1f}  {runs:<22} {lat_s:<26} {wasm:>9}  {verified}")
    for row in rows:
        for i, r in enumerate(row.runs):
            if r.error:
                print(f"  ! {row.label}, run {i + 1}: {r.error}")
        if row.note:
            print(f"  ! {row.label}: {row.note}")


def command_output(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=tool_env(), cwd=ROOT)
        return (out.stdout.strip() or out.stderr.strip()).splitlines()[-1]
    except Exception as e:
        return f"unknown ({e})"


def machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    os_name = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    node = NODE22_BIN / "node"
    return [
        f"date:     {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"machine:  {cpu}, {cores} cores ({usable} usable), {mem} RAM",
        f"os:       {os_name}, {platform.system()} {platform.release()} {platform.machine()}",
        f"tools:    wrangler {command_output([str(WRANGLER), '--version'])} (local mode), "
        f"Node {command_output([str(node), '--version']) if node.exists() else 'n/a'}, Python {platform.python_version()}",
    ]


def snapshot_build(work: Path, build: Path = ROOT / "build", name: str = "bundle") -> tuple[Path, str]:
    """Copies a build/ folder so that a rebuild during the run cannot change what is measured;
    the checkout it came from is the git work tree around it."""
    if not (build / "index.js").exists():
        sys.exit(f"{build}/index.js is missing: build the Worker first (bash scripts/build.sh)")
    bundle = work / name
    shutil.copytree(build, bundle)
    wasm = sorted(bundle.rglob("*.wasm"))
    digest = hashlib.sha256(wasm[0].read_bytes()).hexdigest()[:12] if wasm else "no wasm"
    built = dt.datetime.fromtimestamp((build / "index.js").stat().st_mtime, dt.timezone.utc)
    checkout = build.resolve().parent
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=checkout).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                           capture_output=True, text=True, cwd=checkout).stdout.strip()
    return bundle, (f"{build} from {built:%Y-%m-%d %H:%M UTC}, wasm sha256 {digest}…; checkout {git}"
                    + (" with uncommitted changes in src/" if dirty else ""))


def parse_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def main() -> int:
    p = argparse.ArgumentParser(description="Ferry vs a minimal JS pass-through Worker vs a plain download, side by side")
    p.add_argument("--size-mib", type=int, default=1024, help="volume size (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="runs of each method; the best counts (default 3)")
    p.add_argument("--parts-in-flight", type=parse_list, default=None, metavar="N[,N…]",
                   help="Ferry's parts_in_flight values to sweep (default: not sent, the engine's default)")
    p.add_argument("--part-size-mib", type=int, help="Ferry's part_size_mib (default: not sent)")
    p.add_argument("--slice-max-mib", type=int, help="Ferry's slice_max_mib (default: not sent)")
    p.add_argument("--slice-max-seconds", type=int, help="Ferry's slice_max_seconds (default: not sent)")
    p.add_argument("--big", action="store_true", help="also: a --big-mib volume and a --big-small-mib one, same settings, "
                   "byte identity and peak wasm memory compared")
    p.add_argument("--big-only", action="store_true", help="only the --big check")
    p.add_argument("--big-mib", type=int, default=6144, help="the large volume of --big (default 6144)")
    p.add_argument("--big-small-mib", type=int, default=100, help="the small volume of --big (default 100)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one copy (default 3600)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ferry-bench",
                   help="where the emulator's volumes are built and kept (default ~/.cache/ferry-bench)")
    p.add_argument("--encrypt", action="store_true",
                   help="also run Ferry with age_recipients (needs Debian's age) and print encrypted / unencrypted")
    p.add_argument("--sealed-kill-only", action="store_true",
                   help="only: an encrypted --size-mib copy in slices of --slice-max-mib (default 128), the Worker "
                        "killed after 3 slices and started again; the one age file checked with age -d")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, R2 state) for debugging")
    p.add_argument("--baseline", type=Path, metavar="BUILD_DIR",
                   help="another checkout's build/ folder (for example the previous commit's, built in a git "
                        "worktree): Ferry is run once more on it in the same run, and this build's time is "
                        "compared with it")
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if not WRANGLER.exists():
        sys.exit(f"{WRANGLER} is missing: run bash scripts/setup.sh first")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)

    work = Path(tempfile.mkdtemp(prefix="ferry-transfer-"))
    cleanup = Cleanup()
    failed = False
    try:
        bundle, build_info = snapshot_build(work)
        print("\n".join(machine()))
        print(f"build:    {build_info}")
        baseline = None
        if args.baseline:
            baseline, baseline_info = snapshot_build(work, args.baseline, "baseline-bundle")
            print(f"baseline: {baseline_info}")
        pif_values = args.parts_in_flight or [None]
        if args.sealed_kill_only:
            return 1 if sealed_kill_check(args, work, bundle, cleanup) else 0
        if not args.big_only:
            failed |= main_comparison(args, work, bundle, pif_values, cleanup, baseline)
        if args.big or args.big_only:
            failed |= big_check(args, work, bundle, pif_values[0], cleanup)
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        cleanup.stop_all()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main_comparison(args, work: Path, bundle: Path, pif_values: list, cleanup: Cleanup,
                    baseline: Path | None = None) -> bool:
    print(f"source:   DXP emulator, one backup, volume of {args.size_mib} MiB (building it if not cached in {args.cache_dir})",
          flush=True)
    emu = cleanup.add(DxpSource(work, args.cache_dir, args.size_mib))
    vol = emu.volume
    print(f"artifact: volume.tgz {vol['size'] / MIB:.1f} MiB ({vol['size']} bytes, served with Content-Length), "
          f"sha256 {vol['sha256'][:16]}…; Ferry also copies database.gz ({emu.backup['database']['size']} bytes); "
          f"best of {args.runs}", flush=True)
    rows = list(run_floor(emu, args.runs))
    print(f"  plain download best: {rows[0].best():.2f} s", flush=True)
    js = run_js(emu, work, args.runs, cleanup, args.timeout)
    rows.append(js)
    ferry_rows = []
    for i, pif in enumerate(pif_values):
        fields = ferry_fields(args, pif)
        row = run_ferry(emu, work / f"ferry-{i}", bundle, fields, args.runs, cleanup, args.timeout)
        ferry_rows.append(row)
        rows.append(row)
        if not args.keep:
            shutil.rmtree(work / f"ferry-{i}", ignore_errors=True)
    sealed_row = None
    if args.encrypt:
        # The same copy with every file encrypted to an age recipient, side by side in this run.
        key_file = work / "age-key.txt"
        subprocess.run(["age-keygen", "-o", str(key_file)], check=True, capture_output=True)
        recipient = next(line.split(": ", 1)[1].strip() for line in key_file.read_text().splitlines()
                         if line.startswith("# public key:"))
        fields = {**ferry_fields(args, pif_values[0]), "age_recipients": [recipient]}
        sealed_row = run_ferry(emu, work / "ferry-sealed", bundle, fields, args.runs, cleanup, args.timeout,
                               label=f"Ferry encrypted (age), {describe(ferry_fields(args, pif_values[0]))}",
                               key_file=key_file)
        rows.append(sealed_row)
    base_row = None
    if baseline is not None:
        fields = ferry_fields(args, pif_values[0])
        base_row = run_ferry(emu, work / "ferry-baseline", baseline, fields, args.runs, cleanup, args.timeout,
                             label=f"Ferry baseline, {describe(fields)}")
        rows.append(base_row)
    cleanup.discard(emu)
    emu.stop()

    print()
    print_table(rows)
    print()
    js_best = js.best()
    for row in ferry_rows:
        best = row.best()
        if best is None or js_best is None:
            print(f"ratio Ferry / JS Worker ({row.label[7:]}): n/a (a side failed)")
        else:
            print(f"ratio Ferry / JS Worker ({row.label[7:]}): {best / js_best:.2f}x  (target <= 1.0; best vs best)")
    floor = rows[0].best()
    timed = [(r.best(), r) for r in ferry_rows if r.best() is not None]
    if timed and floor:
        best, row = min(timed, key=lambda t: t[0])
        print(f"ratio Ferry / plain download ({row.label[7:]}): {best / floor:.1f}x")
    if js_best and floor:
        print(f"ratio JS Worker / plain download: {js_best / floor:.1f}x")
    if sealed_row is not None:
        this, sealed = ferry_rows[0].best(), sealed_row.best()
        if this is None or sealed is None:
            print("ratio encrypted / unencrypted Ferry: n/a (a side failed)")
        else:
            print(f"ratio encrypted / unencrypted Ferry: {sealed / this:.2f}x  (best vs best; the cost of age "
                  "encryption in the Worker, each file checked with age -d)")
    if base_row is not None:
        this, before = ferry_rows[0].best(), base_row.best()
        if this is None or before is None:
            print("ratio this build / baseline: n/a (a side failed)")
        else:
            print(f"ratio this build / baseline: {this / before:.2f}x  (best vs best; <= 1.0 is no slower)"
                  + (f"; baseline / JS Worker {before / js_best:.2f}x" if js_best else ""))
    print("Ferry is timed from the signed webhook to the job seen committed (polled every ~100 ms), and copies"
          " database.gz besides the volume; the JS Worker from its request to its answer. Status latency: GET"
          " /v1/jobs/{id} while the job was transferring.")
    return any(r.best() is None or any(run.error for run in r.runs) for r in rows)


def sealed_kill_check(args, work: Path, bundle: Path, cleanup: Cleanup) -> bool:
    """An encrypted copy of the --size-mib volume, cut in slices, the Worker killed (SIGKILL) once
    it has run three of them and started again: the job must commit one age file that Debian's
    `age -d` decrypts to the source's exact bytes. Returns True when it failed."""
    emu = cleanup.add(DxpSource(work, args.cache_dir, args.size_mib))
    key_file = work / "age-key.txt"
    subprocess.run(["age-keygen", "-o", str(key_file)], check=True, capture_output=True)
    recipient = next(line.split(": ", 1)[1].strip() for line in key_file.read_text().splitlines()
                     if line.startswith("# public key:"))
    slice_mib = args.slice_max_mib or 128
    source = dxp_source("sealed-kill", emu, auth="master_token", age_recipients=[recipient], slice_max_mib=slice_mib)
    ferry = cleanup.add(BenchFerry(work / "ferry-sealed-kill", [source], bundle))
    try:
        start = time.perf_counter()
        status, _, payload = ferry.webhook("sealed-kill", body=b"{}")
        if status != 202:
            print(f"sealed kill check: webhook answered {status}: {payload}")
            return True
        job_id = payload["job"]["id"]
        deadline = time.time() + args.timeout
        slices = 0
        while time.time() < deadline:
            job = ferry.job(job_id)
            slices = (job.get("copy") or {}).get("slices", 0)
            if slices >= 3 or job["phase"] in ("committed", "failed"):
                break
            time.sleep(0.5)
        offset = (job.get("copy") or {}).get("offset", 0)
        print(f"  killing the Worker after {slices} slices ({offset / MIB:.0f} MiB of the age file stored)", flush=True)
        ferry.stop(kill=True)
        ferry.start()
        job = ferry.wait_job(job_id, timeout=args.timeout)
        seconds = time.perf_counter() - start
        if job["phase"] != "committed":
            print(f"sealed kill check: FAILED, job {job['phase']}: {job.get('error')}")
            return True
        verified = verify_sealed(ferry, "sealed-kill", job, emu, key_file)
        (manifest,) = [m for m in ferry.backups("sealed-kill") if m["job_id"] == job["id"]]
        volume = next(a for a in manifest["artifacts"] if a["filename"] == "volume.tgz.age")
        print(f"sealed kill check: committed in {seconds:.1f} s (kill and restart included), {volume['parts']} parts, "
              f"{volume['size']} bytes encrypted for {emu.volume['size']} plaintext; {verified}: one valid age file")
        return False
    finally:
        cleanup.discard(ferry)
        ferry.stop()
        cleanup.discard(emu)
        emu.stop()


def big_check(args, work: Path, bundle: Path, pif, cleanup: Cleanup) -> bool:
    fields = ferry_fields(args, pif)
    print(f"\n--big: {args.big_mib} MiB and {args.big_small_mib} MiB volumes, Ferry with {describe(fields)}, "
          "each in a fresh wrangler dev", flush=True)
    results = {}
    for mib in (args.big_mib, args.big_small_mib):
        print(f"  source: volume of {mib} MiB (building it if not cached in {args.cache_dir})", flush=True)
        emu = cleanup.add(DxpSource(work, args.cache_dir, mib))
        try:
            row = run_ferry(emu, work / f"big-{mib}", bundle, fields, 1, cleanup, args.timeout,
                            label=f"Ferry, {mib} MiB volume")
            results[mib] = (row, emu.volume["size"])
        finally:
            cleanup.discard(emu)
            emu.stop()
        if not args.keep:
            shutil.rmtree(work / f"big-{mib}", ignore_errors=True)
    print()
    print_table([row for row, _ in results.values()])
    big, small = results[args.big_mib][0], results[args.big_small_mib][0]
    identical = bool(big.ok()) and bool(small.ok())
    print(f"\n{args.big_mib} MiB volume ({results[args.big_mib][1]} bytes): "
          f"{'committed byte-identical (sha256 and size checked)' if big.ok() else 'NOT committed'}"
          f"{'; more than one R2 put can store (5 GiB)' if results[args.big_mib][1] > 5 * (1 << 30) else ''}")
    wb = f"{big.wasm_mib} MiB" if big.wasm_mib is not None else "n/a"
    ws = f"{small.wasm_mib} MiB" if small.wasm_mib is not None else "n/a"
    equal = big.wasm_mib is not None and big.wasm_mib == small.wasm_mib
    print(f"peak wasm memory: {wb} for {args.big_mib} MiB, {ws} for {args.big_small_mib} MiB: "
          f"{'EQUAL' if equal else 'NOT equal' if big.wasm_mib is not None and small.wasm_mib is not None else 'unknown'}")
    return not (identical and equal)


if __name__ == "__main__":
    sys.exit(main())
