#!/usr/bin/env python3
"""Local emulator of the Cloudflare D1 REST export API (provider-apis.md §1.1, §1.3, §1.4, §6.1).

Run::

    python3 tests/emulators/d1.py --port 0 --account ACCOUNT --token TOKEN \\
        --database DBID=/path/to/db.sqlite [--database ...] \\
        [--host 127.0.0.1] [--cancel-after 30] [--active-polls 2] [--url-ttl 3600] [--hold-ms 0]

``--url-ttl`` is the default of the ``signed_url_ttl_s`` switch.

It prints one line ``READY <port>`` once it listens.

What is emulated
----------------
* ``POST /client/v4/accounts/{a}/d1/database/{id}/export`` — the polling export
  state machine: the first call (no ``current_bookmark``) snapshots a dump of the
  SQLite file and answers **202** ``status:"active"`` with a fixed ``at_bookmark``;
  later calls with that bookmark answer 202 until ``active_polls`` polls have been
  made in total, then **200** ``status:"complete"`` with ``result:{filename,
  signed_url}`` (or ``status:"error"``, or wrangler's ``{success:false, error}``
  PollingFailure shape).  ``messages`` carries only the log lines that are new
  since the previous poll ("Generating <f>", "Uploaded part 2", "Uploaded part 1",
  ..., "Finished uploading <f> in N parts.").  One export per database at a time:
  a call without a bookmark while a task is active is refused with 200 ``status:"error"``,
  "Cannot start a new export until that completes or times out" (``workers-sdk#9578``; the
  answer's shape is assumed, the text is the issue's).  An active task that is not polled
  within ``cancel_after`` seconds is cancelled.
* While an export of a database is active, and for ``refused_export_block_s`` seconds after
  D1 refused one for its virtual tables, every query of that database is refused with
  "D1_ERROR: Currently processing a long-running export." (D1 docs: "your D1 will be
  unavailable to serve queries" while exporting; ``workers-sdk#9519``: after the virtual-table
  refusal the database answers every query so until the export times out), and so is a new
  export (``#9578``).
* ``POST …/query`` answers pass integers through a JavaScript number, as D1's query API (a
  Worker) does: beyond 2^53 they come back rounded (the dump does the same, ``d1_dump.py``).
* ``GET /client/v4/accounts/{a}/d1/database/{id-or-name}`` (with ``fields=``) and
  ``GET /client/v4/accounts/{a}/d1/database`` (``name``, ``page``, ``per_page``).
* ``GET /__signed/<token>/<filename>?X-Amz-Algorithm=…&X-Amz-Credential=…&X-Amz-Date=<issue
  time>&X-Amz-Expires=<ttl>&X-Amz-SignedHeaders=host&X-Amz-Signature=…`` — the unauthenticated
  signed download URL (shaped like the R2 presigned GET it most likely is), valid
  ``signed_url_ttl_s`` seconds from issue (exactly, fractions included), then **403**
  ``application/xml`` ``<Error><Code>AccessDenied</Code><Message>Request has expired</Message>
  </Error>``.  An altered query is 403 ``SignatureDoesNotMatch``, an unknown token or file 404
  ``NoSuchKey`` (``common.Presigner``).  Every poll of a completed task's bookmark answers with a
  fresh signed URL for the same dump (an assumption: the docs only say a URL lasts one hour), so
  a client can renew an expired URL and resume; older URLs stay valid until their own expiry.
* Downloads serve byte ranges like an object store (``common.serve_download``): ``ETag`` (strong)
  and ``Last-Modified`` of the export (bookmark, file and encoding, not the URL: a renewed URL
  has the same validators), ``Accept-Ranges: bytes``, ``Range`` → 206 with ``Content-Range``, past
  the end → 416 ``bytes */TOTAL``, malformed/multi-range → 200 whole, ``If-Range`` mismatch →
  200 whole.
* The response envelope ``{success, errors, messages, result}``, integer error
  codes ≥ 1000, ``Authorization: Bearer`` or ``X-Auth-Email``+``X-Auth-Key``
  authentication, the ``Ratelimit``/``Ratelimit-Policy`` headers, and the
  documented "exceed the limit → 429 and block every call" rate limiting per token (1,200 per
  5 minutes, or what the ``rate_limit`` switch sets), with ``x-ratelimit-limit``,
  ``x-ratelimit-remaining`` and ``x-ratelimit-reset`` on every answer.

Documented quirks reproduced
----------------------------
* The dump is miniflare's dumpSql algorithm (see ``d1_dump.py``), including the
  ``tables`` filter applying to index/trigger/view names themselves, the
  ``CREATE TABLE IF NOT EXISTS`` rewrite for quoted names, and the refusal of
  virtual tables ("D1 Export error: cannot export databases with Virtual Tables
  (fts5)"), which ends the task with 200 ``status:"error"``.
* "Uploaded part" lines are reported out of order (2 before 1).
* ``at_bookmark`` never changes during a task; ``filename`` is
  ``<database_id>-<at_bookmark>.sql`` as in wrangler's test mock.
* A ``Retry-After`` on 429 (delta-seconds, or an HTTP-date on request).
* Non-JSON (WAF-style) bodies on demand, for the client's "malformed response" path.

Fault switches live under ``/__control`` (``POST`` merges JSON into the switches,
``POST /__control/reset`` restores the defaults and forgets all tasks, ``GET
/__control/state`` reports switches, tasks, the last 2000 requests and counters; ``POST
/__control/databases`` ``{"uuid", "path"}`` adds a database to the account, as creating one in
the dashboard would).  The
outcome switches ``export_error``, ``export_errors`` (``{database_id: message}``: one database's
exports fail, the others' do not) and ``polling_failure`` are sampled when a task is created; the pacing switches (``active_polls``, ``cancel_after``, ...) are read
live.  The download switches:

* ``signed_url_ttl_s`` (seconds ≥ 0, default ``--url-ttl`` = 3600; ``url_ttl`` is the same
  switch under its older name): the lifetime of each signed URL issued from now on.
* ``ignore_range`` (bool): answer every download 200 with the whole body.
* ``etag_generation`` (int ≥ 0): part of the ETag and Last-Modified; bump it and the dump looks
  replaced (an ``If-Range`` with the old ETag gets a full 200; the bytes stay the same).
* ``throttle_kib_per_s`` (number ≥ 0, 0 = unlimited): pace download bodies (read live).
* ``truncate_after_bytes`` (int ≥ 0, 0 = off): every download declares its full
  ``Content-Length`` but the connection closes after that many body bytes (from the range start).
* ``download_delay_ms`` (a pause between 64 KiB chunks), ``download_fail_status`` (answer
  downloads with that status), ``gzip`` (serve ``Content-Encoding: gzip``; another object, with
  its own ETag), ``no_content_length`` (chunked).

Export switches: ``refused_export_block_s`` (seconds a virtual-table refusal keeps the database
busy, default 30) and ``active_status`` (the status a running export reports, default ``active``).

Injected faults (``faults``, see ``common.py``): steps ``export`` (the first POST, no bookmark),
``poll`` (a POST with ``current_bookmark``), ``create`` (``POST …/d1/database``) and ``download``
(the signed URL).  ``provider_error``
at ``export`` is a 4xx failure envelope; at ``poll`` the task ends 200 ``status:"error"`` with the
message (default: the documented virtual-table refusal); ``stuck`` at ``poll`` keeps the task
``active`` (and alive) for as long as the fault is set.  Every request-log entry names its
``step``.

Each download's request-log entry has ``method``, ``path`` (no query), ``status``, ``t``,
``range``, ``if_range``, ``accept_encoding`` (request headers as received, null when absent),
``served_start``, ``served_end`` (the byte span served, end exclusive, null when nothing was) and
``sent`` (body bytes actually written).
"""

from __future__ import annotations

import argparse
import copy
import email.utils
import gzip
import json
import math
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (API_FAULTS, BaseHandler, RANGE_SWITCHES, REQUEST_LOG_SIZE, SIGNED_DOWNLOAD_FAULTS,  # noqa: E402
                    LoginOrigin, Presigner, Reply, answer_fault, bind_server, fault_active, faults_problem,
                    gzip_once_more, log_snapshot, range_switch_problem, s3_error_body, s3_error_reply,
                    serve_download, serve_main, take_fault, ttl_switch_changes, write_cut_reply)
from d1_dump import VIRTUAL_TABLE_ERROR, DumpError, dump_sql  # noqa: E402
import d1_restore  # noqa: E402
from d1_restore import (RE_IMPORT, RE_QUERY, RE_TT_BOOKMARK, RE_TT_RESTORE, RE_UPLOAD,  # noqa: E402
                        RESTORE_SWITCHES, RestoreMixin)

API_PREFIX = "/client/v4"
# The limits page's example values, sent with injected fault answers (which count no call).
RATELIMIT_HEADERS = (
    ("Ratelimit", '"default";r=50;t=30'),
    ("Ratelimit-Policy", '"burst";q=100;w=60'),
)
# Cloudflare's documented limit: 1,200 requests per 5 minutes per token, then a 5-minute block.
DOCUMENTED_RATE_LIMIT = {"limit": 1200, "window": 300, "block": 300}
DOWNLOAD_CHUNK = 64 * 1024
PART_SIZE = 5 * 1024 * 1024

RE_EXPORT = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/export/?$")
RE_DATABASE = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/?$")
RE_DATABASES = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/?$")
RE_SIGNED = re.compile(r"^/__signed/([^/]+)/(.+)$")

# The provider steps faults can be injected at, and what each takes (common.py, "Injected faults").
FAULT_STEPS = {
    "export": API_FAULTS | {"provider_error"},
    "poll": API_FAULTS | {"provider_error", "stuck"},
    "download": SIGNED_DOWNLOAD_FAULTS,
    # POST …/d1/database {name}: a ``truncate`` fault creates the database and loses the answer; a
    # second create of the name is then refused 400 code 7502 "A database with that name already
    # exists" (the code wrangler names so, workers-sdk#2143; cloudflare-typescript
    # ``src/resources/d1/database.ts`` ``create``), and ``GET …/d1/database?name=`` finds it.
    "create": API_FAULTS,
}
PROVIDER_ERRORS = {
    # The export call refused with the failure envelope (the documented "4XX Poll failed").
    "export": "Export failed: database is currently being imported",
    # The task ends with status "error" (the documented refusal of virtual tables).
    "poll": "D1 Export error: cannot export databases with Virtual Tables (fts5)",
}
FAIL_NEXT_DEFAULTS = {"status": 500, "retry_after": None, "body": None,
                      "code": 7500, "message": "Internal error (injected by the D1 emulator)"}


class ApiError(Exception):
    """A failure answered with the Cloudflare failure envelope."""

    def __init__(self, status: int, code: int, message: str, headers=()):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, list(headers)


def envelope(result, errors=(), success=True) -> dict:
    return {"success": success, "errors": list(errors), "messages": [], "result": result}


def json_reply(status: int, payload, headers=()) -> Reply:
    return Reply(status, json.dumps(payload).encode(), "application/json", list(headers))


def failure_reply(status: int, code: int, message: str, headers=()) -> Reply:
    body = envelope(None, [{"code": code, "message": message}], success=False)
    return json_reply(status, body, headers)


def xml_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, s3_error_body(code, message), "application/xml")


def fmt_seconds(value: float) -> str:
    return f"{value:g}"


@dataclass
class Database:
    uuid: str
    path: str
    created_at: str

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def connect(self) -> sqlite3.Connection:
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        return sqlite3.connect(uri, uri=True)

    def info(self) -> dict:
        num_tables = 0
        try:
            with closing(self.connect()) as conn:
                num_tables = conn.execute(
                    "SELECT count(*) FROM sqlite_schema WHERE type='table' "
                    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_cf\\_%' ESCAPE '\\'"
                ).fetchone()[0]
        except sqlite3.Error:
            pass
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        return {"uuid": self.uuid, "name": self.name, "created_at": self.created_at,
                "version": "production", "num_tables": num_tables, "file_size": size}


@dataclass
class Task:
    database_id: str
    at_bookmark: str
    filename: str
    fate: str                      # "complete" | "error" | "polling_failure"
    error: str | None
    dump: bytes | None
    log: list                      # every message line the task will ever emit
    uploads: int                   # number of "Uploaded part" lines in log
    created: float
    last_poll: float
    polls: int = 1
    delivered: int = 0             # log lines already sent
    status: str = "active"         # active | complete | error | polling_failure | cancelled
    signed_url: str | None = None  # the URL issued by the latest poll
    refused_until: float = 0.0     # a virtual-table refusal blocks the database until then
    gzipped: bytes | None = None   # the dump gzip-compressed, made on the first gzip download

    def take_new_lines(self, upto: int) -> list:
        upto = max(self.delivered, min(upto, len(self.log)))
        lines = self.log[self.delivered:upto]
        self.delivered = upto
        return lines

    def summary(self) -> dict:
        return {"database_id": self.database_id, "at_bookmark": self.at_bookmark,
                "status": self.status, "polls": self.polls, "filename": self.filename,
                "dump_size": len(self.dump) if self.dump is not None else None,
                "error": self.error if self.status != "complete" else None}


class Emulator(RestoreMixin):
    """All emulator state; every method is called with HTTP-level inputs."""

    def __init__(self, account: str, token: str, databases: dict, defaults: dict):
        self.account = account
        self.token = token
        self.databases = databases
        self.defaults = defaults
        self.lock = threading.RLock()
        self.bookmark_counter = 0
        self._reset_state()

    # ----- state and control -------------------------------------------------
    def _reset_state(self):
        self.switches = copy.deepcopy(self.defaults)
        self.tasks: dict[str, Task] = {}
        self.presigner = Presigner()
        self.requests = deque(maxlen=REQUEST_LOG_SIZE)
        self.downloads = 0
        self.export_calls = 0
        self.api_calls: dict[str, deque] = {}       # caller token -> call times in the window
        self.blocked_until: dict[str, float] = {}   # caller token -> end of its block
        self.api_calls_total = 0                    # calls counted while rate_limit is set
        self.rate_limited = 0                       # 429s that started a block
        self.blocked_hits = 0                       # calls that arrived during a block
        self.faults_injected: list = []
        self._reset_restore_state()

    def add_database(self, uuid: str, path: str) -> dict:
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        with self.lock:
            if uuid in self.databases:
                raise ApiError(409, 7409, f"a database {uuid} exists already")
            self.databases[uuid] = Database(uuid, path, created)
            return self.databases[uuid].info()

    def reset(self) -> dict:
        with self.lock:
            self._reset_state()
            LoginOrigin.clear()
            return {"switches": self.switches}

    def update_switches(self, changes) -> dict:
        if not isinstance(changes, dict):
            raise ApiError(400, 10400, "control body must be a JSON object")
        unknown = sorted(set(changes) - set(self.defaults))
        if unknown:
            raise ApiError(400, 10400, f"unknown switch(es): {', '.join(unknown)}")
        if "fail_next" in changes and not isinstance(changes["fail_next"], list):
            raise ApiError(400, 10400, "fail_next must be a list")
        if changes.get("rate_limit") is not None and not isinstance(changes["rate_limit"], dict):
            raise ApiError(400, 10400, "rate_limit must be an object or null")
        for key, value in changes.items():
            problem = range_switch_problem(key, value)
            if problem:
                raise ApiError(400, 10400, problem)
        changes, problem = ttl_switch_changes(changes)
        if problem:
            raise ApiError(400, 10400, problem)
        if "faults" in changes:
            faults, problem = faults_problem(changes["faults"], FAULT_STEPS, PROVIDER_ERRORS)
            if problem:
                raise ApiError(400, 10400, problem)
            changes = {**changes, "faults": faults}
        with self.lock:
            self.switches.update(copy.deepcopy(changes))
            return {"switches": self.switches}

    def state(self) -> dict:
        with self.lock:
            now = time.monotonic()
            for task in self.tasks.values():
                self._maybe_cancel(task, now)
            return {"switches": self.switches,
                    "tasks": [t.summary() for t in self.tasks.values()],
                    "requests": log_snapshot(self.requests),
                    "downloads": self.downloads,
                    "export_calls": self.export_calls,
                    "rate_limit_state": {"calls": self.api_calls_total, "rate_limited": self.rate_limited,
                                         "blocked_hits": self.blocked_hits},
                    "faults_injected": [dict(f) for f in self.faults_injected],
                    "login_requests": LoginOrigin.snapshot(),
                    **self.restore_state()}

    def take_fault(self, step: str | None) -> dict | None:
        with self.lock:
            return take_fault(self.switches, step, self.faults_injected)

    def record_request(self, method: str, path: str, status: int, step: str | None = None) -> dict:
        entry = {"method": method, "path": path, "status": status, "t": time.time(), "step": step}
        with self.lock:
            self.requests.append(entry)
        return entry

    # ----- API gatekeeping ---------------------------------------------------
    def check_rate_limit(self, headers) -> list:
        """Count one API call of the caller's token and return the answer's rate-limit headers, or
        raise 429 once the scaled-down limit is exceeded.

        Cloudflare's API allows 1,200 requests per 5 minutes per user or account token, and once
        that is exceeded "all API calls for the next five minutes will be blocked, receiving a HTTP
        429 response" (developers.cloudflare.com/fundamentals/api/reference/limits/).  The limit,
        window and block are the ``rate_limit`` switch (``{"limit", "window", "block"}``, seconds),
        so tests can make them tiny (unset: the documented 1,200 / 300 s / 300 s); every caller token (``Authorization: Bearer`` or
        ``X-Auth-Key``) has its own count.  Every answer carries the limits page's headers:
        ``x-ratelimit-limit``, ``x-ratelimit-remaining``, ``x-ratelimit-reset`` (an RFC 1123 date:
        when the oldest call of the sliding window leaves it, or the block ends) and the IETF
        draft's ``Ratelimit: "default";r=<remaining>;t=<seconds>`` and ``Ratelimit-Policy:
        "default";q=<limit>;w=<window>`` (changelog 2025-09-03).  A call during a block is
        refused and counted in ``rate_limit_state.blocked_hits``."""
        key = api_key_of(headers)
        with self.lock:
            rule = self.switches.get("rate_limit") or DOCUMENTED_RATE_LIMIT
            now = time.monotonic()
            limit = int(rule.get("limit", 1200))
            window = float(rule.get("window", 300))
            block = float(rule.get("block", 300))
            calls = self.api_calls.setdefault(key, deque())
            while calls and calls[0] <= now - window:
                calls.popleft()
            blocked = self.blocked_until.get(key, 0.0)
            if now < blocked:
                self.blocked_hits += 1
                raise self._rate_limited(blocked - now, rule, limit_headers(0, limit, window, blocked - now))
            calls.append(now)
            self.api_calls_total += 1
            if len(calls) > limit:
                self.blocked_until[key] = now + block
                self.rate_limited += 1
                calls.clear()
                raise self._rate_limited(block, rule, limit_headers(0, limit, window, block))
            reset_in = calls[0] + window - now if len(calls) >= limit else window
            return limit_headers(limit - len(calls), limit, window, reset_in)

    def _rate_limited(self, remaining: float, rule: dict, headers: list) -> ApiError:
        if rule.get("retry_after_http_date") or self.switches.get("retry_after_http_date"):
            retry_after = email.utils.formatdate(time.time() + math.ceil(remaining), usegmt=True)
        else:
            retry_after = str(max(1, math.ceil(remaining)))
        return ApiError(429, 10429, "Rate limited. Please wait and consider throttling your request speed",
                        headers + [("Retry-After", retry_after)])

    def pop_fail_next(self) -> Reply | None:
        with self.lock:
            queue = self.switches.get("fail_next") or []
            if not queue:
                return None
            spec = {**FAIL_NEXT_DEFAULTS, **queue.pop(0)}
        headers = []
        retry_after = spec["retry_after"]
        if spec["status"] == 429 and retry_after is None:
            retry_after = "1"
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        if spec["body"] is not None:
            return Reply(int(spec["status"]), str(spec["body"]).encode(), "text/html", headers)
        return failure_reply(int(spec["status"]), int(spec["code"]), spec["message"], headers)

    def authorise(self, headers):
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer ") and secrets.compare_digest(auth[7:].strip(), self.token):
            return
        email_, key = headers.get("X-Auth-Email"), headers.get("X-Auth-Key")
        if email_ and key and secrets.compare_digest(key, self.token):
            return
        raise ApiError(403, 10000, "Authentication error")

    def check_account(self, account: str):
        if account != self.account:
            raise ApiError(404, 7404, f"Could not route to account {account}: not found")

    def find_database(self, ident: str, by_name: bool = False) -> Database:
        db = self.databases.get(ident)
        if db is None and by_name:
            db = next((d for d in self.databases.values() if d.name == ident), None)
        if db is None:
            raise ApiError(404, 7404, f"The database {ident} could not be found")
        return db

    # ----- database metadata -------------------------------------------------
    def get_database(self, account: str, ident: str, query: dict) -> Reply:
        self.check_account(account)
        info = self.find_database(ident, by_name=True).info()
        fields = query.get("fields", [""])[0]
        if fields:
            wanted = [f.strip() for f in fields.split(",") if f.strip()]
            info = {k: v for k, v in info.items() if k in wanted}
        return json_reply(200, envelope(info))

    def list_databases(self, account: str, query: dict) -> Reply:
        self.check_account(account)
        try:
            page = int(query.get("page", ["1"])[0])
            per_page = int(query.get("per_page", ["1000"])[0])
        except ValueError:
            raise ApiError(400, 7400, "page and per_page must be integers")
        if page < 1 or not 10 <= per_page <= 10000:
            raise ApiError(400, 7400, "page must be >= 1 and per_page between 10 and 10000")
        name = query.get("name", [""])[0]
        items = [d.info() for d in self.databases.values() if name in d.name]
        chunk = items[(page - 1) * per_page: page * per_page]
        reply = envelope(chunk)
        reply["result_info"] = {"page": page, "per_page": per_page, "count": len(chunk),
                                "total_count": len(items)}
        return json_reply(200, reply)

    # ----- export --------------------------------------------------------------
    def export(self, account: str, database_id: str, body: bytes, host: str, fault: dict | None = None) -> Reply:
        self.check_account(account)
        db = self.find_database(database_id)
        request = parse_export_body(body)
        hold_ms = float(self.switches.get("hold_ms") or 0)
        if hold_ms > 0:
            time.sleep(hold_ms / 1000.0)
        bookmark = request.get("current_bookmark")
        with self.lock:
            now = time.monotonic()
            if bookmark is None:
                return self._start_or_join(db, request.get("dump_options") or {}, now)
            task = self.tasks.get(bookmark)
            if task is None or task.database_id != db.uuid:
                raise ApiError(400, 7500, "Unknown export bookmark")
            return self._poll(task, now, host, fault)

    def export_blocking(self, database_id: str, now: float) -> Task | None:
        """The export that keeps the database from serving queries and new exports, if any."""
        for task in self.tasks.values():
            self._maybe_cancel(task, now)
            if task.database_id == database_id and (task.status == "active" or now < task.refused_until):
                return task
        return None

    def _start_or_join(self, db: Database, options: dict, now: float) -> Reply:
        if self.export_blocking(db.uuid, now) is not None:
            # workers-sdk#9578: a second export is refused while one runs (or a refused one has
            # not timed out yet); the text is the issue's, the 200 status:"error" shape assumed.
            result = {"success": True, "type": "export", "status": "error", "messages": [],
                      "error": "D1 Export error: Currently processing a long-running export. "
                               "Cannot start a new export until that completes or times out."}
            return json_reply(200, envelope(result))
        task = self._create_task(db, options, now)
        self.tasks[task.at_bookmark] = task
        return self._active_reply(task, task.take_new_lines(1))

    def _new_bookmark(self) -> str:
        self.bookmark_counter += 1
        return f"{self.bookmark_counter:08x}-00000000-00004f6d-{secrets.token_hex(16)}"

    def _create_task(self, db: Database, options: dict, now: float) -> Task:
        bookmark = self._new_bookmark()
        filename = f"{db.uuid}-{bookmark}.sql"
        dump, error = snapshot_dump(db, options)
        self.keep_snapshot(db, bookmark)
        fate = "complete"
        if error is None and self.switches.get("export_error"):
            error = str(self.switches["export_error"])
        if error is None and db.uuid in (self.switches.get("export_errors") or {}):
            error = str(self.switches["export_errors"][db.uuid])
        if error is not None:
            fate = "error"
        elif self.switches.get("polling_failure"):
            fate, error = "polling_failure", str(self.switches["polling_failure"])
        log = [f"Generating {filename}"]
        uploads = 0
        if fate == "error":
            log.append(error)
        else:
            parts = max(2, math.ceil(len(dump) / PART_SIZE))
            order = [2, 1] + list(range(3, parts + 1))
            log += [f"Uploaded part {n}" for n in order]
            uploads = parts
            log.append(f"Finished uploading {filename} in {parts} parts.")
        task = Task(db.uuid, bookmark, filename, fate, error, dump, log, uploads, created=now, last_poll=now)
        if error == VIRTUAL_TABLE_ERROR:
            # workers-sdk#9519: the refused export keeps the database busy until it times out.
            task.refused_until = now + float(self.switches.get("refused_export_block_s", 30))
        return task

    def query(self, account: str, ident: str, body: dict):
        self.check_account(account)
        with self.lock:
            db = self.find_database(ident)
            if self.export_blocking(db.uuid, time.monotonic()) is not None:
                # D1 docs (export API): "your D1 will be unavailable to serve queries" while it
                # exports; workers-sdk#9519 quotes the error every query then gets.
                raise ApiError(400, 7500, "D1_ERROR: Currently processing a long-running export.")
        reply = super().query(account, ident, body)
        # D1's query API runs in a Worker: integers reach JSON through a JavaScript number.
        payload = json.loads(reply.body)
        return json_reply(reply.status, _through_js_numbers(payload), reply.headers)

    def _maybe_cancel(self, task: Task, now: float):
        cancel_after = float(self.switches.get("cancel_after", 30))
        if task.status == "active" and now - task.last_poll > cancel_after:
            task.status = "cancelled"
            task.error = f"Export cancelled: not polled for {fmt_seconds(cancel_after)} seconds"

    def _poll(self, task: Task, now: float, host: str, fault: dict | None = None) -> Reply:
        self._maybe_cancel(task, now)
        if task.status == "active" and fault_active(self.switches, "poll", "stuck", self.faults_injected):
            task.last_poll = now  # polled, so alive; it just never gets anywhere
            return self._active_reply(task, [])
        if task.status == "active" and fault is not None and fault["fault"] == "provider_error":
            task.fate = task.status = "error"
            task.error = fault["message"]
            task.log = task.log[:task.delivered] + [fault["message"]]
            return self._final_reply(task, task.take_new_lines(len(task.log)))
        if task.status != "active":
            if task.status == "complete":
                # Assumed (the docs only say a URL lasts one hour): every poll of the same bookmark
                # answers with a freshly signed URL for the same dump, so an expired one can be renewed.
                self._issue_signed_url(task, host)
            return self._final_reply(task, task.take_new_lines(len(task.log)))
        task.polls += 1
        task.last_poll = now
        active_polls = max(1, int(self.switches.get("active_polls", 2)))
        if task.polls <= active_polls:
            return self._active_reply(task, task.take_new_lines(self._revealed(task, active_polls)))
        task.status = task.fate
        if task.fate == "complete":
            self._issue_signed_url(task, host)
        return self._final_reply(task, task.take_new_lines(len(task.log)))

    @staticmethod
    def _revealed(task: Task, active_polls: int) -> int:
        """How many log lines are visible after the task's current (active) poll."""
        if active_polls <= 1:
            return 1
        return 1 + (task.uploads * (task.polls - 1)) // (active_polls - 1)

    def _issue_signed_url(self, task: Task, host: str):
        ttl = float(self.switches.get("signed_url_ttl_s", 3600))
        task.signed_url = self.presigner.issue(task, host, [task.filename], ttl)[0]

    def _active_reply(self, task: Task, lines: list) -> Reply:
        # ``active_status``: the status a running export reports. The API reference names only
        # active/complete/error, but wrangler (packages/wrangler/src/d1/export.ts) keeps polling on
        # any status but complete and error, so a client must too.
        result = {"success": True, "type": "export", "at_bookmark": task.at_bookmark,
                  "status": self.switches.get("active_status") or "active", "messages": lines}
        return json_reply(202, envelope(result))

    @staticmethod
    def _final_reply(task: Task, lines: list) -> Reply:
        if task.status == "polling_failure":
            return json_reply(200, envelope({"success": False, "error": task.error}))
        result = {"success": True, "type": "export", "at_bookmark": task.at_bookmark}
        if task.status == "complete":
            result.update(status="complete", messages=lines,
                          result={"filename": task.filename, "signed_url": task.signed_url})
        elif task.status == "cancelled":
            result.update(status="error", error=task.error, messages=[])
        else:
            result.update(status="error", error=task.error, messages=lines)
        return json_reply(200, envelope(result))

    # ----- signed download -----------------------------------------------------
    def open_download(self, token: str, filename: str, path: str, query: str):
        """Return (Reply-for-error, None) or (None, (task, switches))."""
        with self.lock:
            entry = self.presigner.lookup(token)
            if entry is None or entry.target.filename != filename:
                return xml_error(404, "NoSuchKey", "The specified key does not exist."), None
            refusal = self.presigner.refusal(entry, path, query)
            if refusal is not None:
                return xml_error(*refusal), None
            fail = self.switches.get("download_fail_status")
            if fail:
                return xml_error(int(fail), "InternalError", "We encountered an internal error. Please try again."), None
            self.downloads += 1
            return None, (entry.target, dict(self.switches))


def api_key_of(headers) -> str:
    """Whose count a call is on: the bearer token or the global API key, as presented."""
    auth = headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return headers.get("X-Auth-Key") or ""


def limit_headers(remaining: int, limit: int, window: float, reset_in: float) -> list:
    reset_s = max(1, math.ceil(reset_in))
    return [("x-ratelimit-limit", str(limit)), ("x-ratelimit-remaining", str(max(0, remaining))),
            ("x-ratelimit-reset", email.utils.formatdate(time.time() + reset_s, usegmt=True)),
            ("Ratelimit", f'"default";r={max(0, remaining)};t={reset_s}'),
            ("Ratelimit-Policy", f'"default";q={limit};w={math.ceil(window)}')]
def _through_js_numbers(value):
    """``value`` with every integer rounded as a JavaScript number (a double) rounds it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) <= 2 ** 53 else int(float(value))
    if isinstance(value, list):
        return [_through_js_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _through_js_numbers(v) for k, v in value.items()}
    return value


def parse_export_body(body: bytes) -> dict:
    try:
        request = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 7400, "Malformed JSON in request body")
    if not isinstance(request, dict):
        raise ApiError(400, 7400, "Request body must be a JSON object")
    if request.get("output_format") != "polling":
        raise ApiError(400, 7400, "output_format: must be \"polling\"")
    bookmark = request.get("current_bookmark")
    if bookmark == "":
        request["current_bookmark"] = None
    elif bookmark is not None and not isinstance(bookmark, str):
        raise ApiError(400, 7400, "current_bookmark must be a string")
    options = request.get("dump_options")
    if options is not None:
        validate_dump_options(options)
    return request


def validate_dump_options(options):
    if not isinstance(options, dict):
        raise ApiError(400, 7400, "dump_options must be an object")
    for flag in ("no_data", "no_schema"):
        if options.get(flag) is not None and not isinstance(options[flag], bool):
            raise ApiError(400, 7400, f"dump_options.{flag} must be a boolean")
    tables = options.get("tables")
    if tables is not None and (not isinstance(tables, list) or not all(isinstance(t, str) for t in tables)):
        raise ApiError(400, 7400, "dump_options.tables must be an array of strings")


def snapshot_dump(db: Database, options: dict):
    """Dump the database now; return (bytes, None) or (None, error text)."""
    try:
        with closing(db.connect()) as conn:
            sql = dump_sql(conn, tables=options.get("tables") or None,
                           no_data=bool(options.get("no_data")),
                           no_schema=bool(options.get("no_schema")))
        return sql.encode("utf-8"), None
    except DumpError as exc:
        return None, str(exc)
    except sqlite3.Error as exc:
        return None, f"D1 Export error: {exc}"


class Handler(BaseHandler):
    server_version = "d1-emulator"
    emulator: Emulator  # set on the subclass built by make_server

    # ----- plumbing --------------------------------------------------------------
    def dispatch(self):
        path = urlsplit(self.path).path
        self.begin_request(path)
        try:
            body = self.read_body()  # always drain it, so keep-alive connections stay in sync
            if path.startswith(API_PREFIX + "/"):
                self.handle_api(path, body)
            elif path.startswith("/__signed/"):
                self.mark_download()
                self.handle_download(path)
            elif RE_UPLOAD.match(path) and self.command == "PUT":
                self._step = "upload"
                status, headers, payload = self.emulator.upload(RE_UPLOAD.match(path).group(1), self.headers, body)
                self.write_reply(Reply(status, payload, "application/xml", headers))
            elif path.startswith("/__control"):
                self.handle_control(path, body)
            else:
                self.write_reply(xml_error(404, "NoSuchKey", "Not found"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # an emulator bug: make it loud but keep serving
            traceback.print_exc()
            if not self._status:
                self.write_reply(failure_reply(500, 10500, "D1 emulator internal error"))
        finally:
            self.finish_request()

    def log_request_status(self, status: int) -> None:
        self._entry = self.emulator.record_request(self.command, self._path, status, self._step)

    @staticmethod
    def step_of(path: str, body: bytes) -> str | None:
        """The provider step of an API request: ``export`` (no bookmark yet), ``poll`` or
        ``create`` (a new database)."""
        if RE_DATABASES.match(path):
            return "create"
        if not RE_EXPORT.match(path):
            return None
        try:
            request = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            return "export"
        return "poll" if isinstance(request, dict) and request.get("current_bookmark") else "export"

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = dispatch

    # ----- routes ------------------------------------------------------------------
    def handle_api(self, path: str, body: bytes):
        emu = self.emulator
        self._step = self.step_of(path, body) if self.command == "POST" else None
        fault = emu.take_fault(self._step)

        def error_reply(status, message, headers):
            code = 10429 if status == 429 else 7500
            return failure_reply(status, code, message, list(RATELIMIT_HEADERS) + headers)

        if answer_fault(self, fault, error_reply):
            return
        self._rate_headers = []
        try:
            if fault is not None and fault["fault"] == "provider_error" and self._step == "export":
                raise ApiError(400, 7500, fault["message"])
            reply = self.route_api(emu, path, body, fault)
        except ApiError as exc:
            reply = failure_reply(exc.status, exc.code, exc.message, exc.headers)
        reply.headers = self._rate_headers + reply.headers
        if fault is not None and fault["fault"] in ("truncate", "truncate_chunked"):
            write_cut_reply(self, reply, fault.get("truncate_at"), chunked=fault["fault"] == "truncate_chunked")
            return
        self.write_reply(reply)

    def route_api(self, emu: Emulator, path: str, body: bytes, fault: dict | None = None) -> Reply:
        query = parse_qs(urlsplit(self.path).query)
        export = RE_EXPORT.match(path)
        if export:
            with emu.lock:
                emu.export_calls += 1
        try:
            self._rate_headers = emu.check_rate_limit(self.headers)
        except ApiError:
            self._rate_headers = []
            raise
        if export:
            if self.command != "POST":
                raise ApiError(405, 10405, "Method not allowed")
            canned = emu.pop_fail_next()
            if canned is not None:
                return canned
            emu.authorise(self.headers)
            return emu.export(export.group(1), export.group(2), body, self.host(), fault)
        restore = self.route_restore(emu, path, body, query)
        if restore is not None:
            return restore
        database = RE_DATABASE.match(path)
        if database and self.command == "GET":
            emu.authorise(self.headers)
            return emu.get_database(database.group(1), database.group(2), query)
        databases = RE_DATABASES.match(path)
        if databases and self.command == "GET":
            emu.authorise(self.headers)
            return emu.list_databases(databases.group(1), query)
        if database or databases:
            raise ApiError(405, 10405, "Method not allowed")
        raise ApiError(404, 7000, "No route for that URI")

    def route_restore(self, emu: Emulator, path: str, body: bytes, query: dict) -> Reply | None:
        """Import, query, create, delete and time travel (d1_restore.py), or ``None``."""
        def parsed():
            try:
                return json.loads(body or b"null")
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, 7400, "Malformed JSON in request body")
        for pattern, method, call in (
            (RE_IMPORT, "POST", lambda m: emu.import_call(m.group(1), m.group(2), parsed(), self.host())),
            (RE_QUERY, "POST", lambda m: emu.query(m.group(1), m.group(2), parsed())),
            (RE_TT_BOOKMARK, "GET", lambda m: emu.tt_bookmark(m.group(1), m.group(2))),
            (RE_TT_RESTORE, "POST", lambda m: emu.tt_restore(m.group(1), m.group(2), query)),
            (RE_DATABASES, "POST", lambda m: emu.create_database(m.group(1), parsed())),
            (RE_DATABASE, "DELETE", lambda m: emu.delete_database(m.group(1), m.group(2))),
        ):
            match = pattern.match(path)
            if match and self.command == method:
                emu.authorise(self.headers)
                return call(match)
        return None

    def handle_control(self, path: str, body: bytes):
        emu = self.emulator
        try:
            if path == "/__control/state" and self.command == "GET":
                reply = json_reply(200, emu.state())
            elif path == "/__control/reset" and self.command == "POST":
                reply = json_reply(200, emu.reset())
            elif path == "/__control/databases" and self.command == "POST":
                try:
                    spec = json.loads(body or b"{}")
                    uuid, db_path = str(spec["uuid"]), str(spec["path"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError(400, 10400, 'control body must be {"uuid": ..., "path": ...}')
                reply = json_reply(200, emu.add_database(uuid, db_path))
            elif path == "/__control" and self.command == "POST":
                try:
                    changes = json.loads(body or b"{}")
                except ValueError:
                    raise ApiError(400, 10400, "control body must be JSON")
                reply = json_reply(200, emu.update_switches(changes))
            else:
                raise ApiError(404, 7000, "No such control endpoint")
        except ApiError as exc:
            reply = failure_reply(exc.status, exc.code, exc.message)
        self.write_reply(reply)

    def handle_download(self, path: str):
        self._step = "download"
        match = RE_SIGNED.match(path)
        fault = None
        if match and self.command in ("GET", "HEAD") and self.emulator.presigner.lookup(match.group(1)) is not None:
            fault = self.emulator.take_fault("download")
        if answer_fault(self, fault, s3_error_reply):
            return
        if not match or self.command not in ("GET", "HEAD"):
            self.write_reply(xml_error(404, "NoSuchKey", "The specified key does not exist."))
            return
        error, opened = self.emulator.open_download(match.group(1), match.group(2), path,
                                                    urlsplit(self.path).query)
        if error is not None:
            self.write_reply(error)
            return
        task, switches = opened
        self.stream_dump(task, switches, fault)

    def stream_dump(self, task: Task, switches: dict, fault: dict | None = None):
        # The object's identity is its export (bookmark, file and encoding), not the URL: a renewed
        # URL serves the same object with the same validators; the gzip encoding is another object.
        identity = f"{task.at_bookmark}/{task.filename}"
        body, extra = task.dump, []
        if switches.get("gzip"):
            with self.emulator.lock:
                if task.gzipped is None:
                    task.gzipped = gzip.compress(task.dump, mtime=0)
                body = task.gzipped
            identity, extra = identity + "+gzip", [("Content-Encoding", "gzip")]
        delay = float(switches.get("download_delay_ms") or 0) / 1000.0
        chunked, cut = bool(switches.get("no_content_length")), None
        kind = fault["fault"] if fault is not None else None
        if kind == "content_encoding_gzip":
            body, identity, extra = gzip_once_more(body), identity + "+cdn-gzip", extra + [("Content-Encoding", "gzip")]
        elif kind in ("truncate", "truncate_chunked"):
            chunked = chunked or kind == "truncate_chunked"
            cut = fault.get("truncate_at")
            if cut is None:
                cut = len(body) // 2
        serve_download(self, body, len(body), identity, "application/sql", switches, extra_headers=extra,
                       truncate_after=cut, chunked=chunked, delay_s=delay, chunk=DOWNLOAD_CHUNK,
                       live_switches=lambda: self.emulator.switches)


# ----- startup -------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description="Cloudflare D1 REST export API emulator")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--account", required=True)
    parser.add_argument("--database", action="append", default=[], metavar="DBID=PATH",
                        help="a database id and its SQLite file (repeatable)")
    parser.add_argument("--token", required=True)
    parser.add_argument("--cancel-after", type=float, default=30.0)
    parser.add_argument("--active-polls", type=int, default=2)
    parser.add_argument("--url-ttl", type=float, default=3600.0,
                        help="seconds a signed URL stays valid (the signed_url_ttl_s switch's default)")
    parser.add_argument("--hold-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit", type=int, default=None, metavar="CALLS",
                        help="calls per token per 300 s before the 300 s block (the rate_limit switch's "
                             "limit; unset: the documented 1,200)")
    args = parser.parse_args(argv)
    for spec in args.database:
        if "=" not in spec:
            parser.error(f"--database expects DBID=PATH, got {spec!r}")
    return args


def default_switches(args) -> dict:
    return {
        "active_polls": args.active_polls,
        "cancel_after": args.cancel_after,
        "signed_url_ttl_s": args.url_ttl,
        "url_ttl": args.url_ttl,          # the older name of signed_url_ttl_s (kept in step with it)
        "hold_ms": args.hold_ms,
        "export_error": None,
        "export_errors": {},
        "polling_failure": None,
        "fail_next": [],
        "rate_limit": None if args.rate_limit is None else {"limit": args.rate_limit, "window": 300, "block": 300},
        "retry_after_http_date": False,
        "gzip": False,
        "no_content_length": False,
        "download_delay_ms": 0,
        "download_fail_status": None,
        "faults": [],
        "refused_export_block_s": 30,
        "active_status": "active",
        **RANGE_SWITCHES,
        **RESTORE_SWITCHES,
    }


def make_server(argv) -> ThreadingHTTPServer:
    args = parse_args(argv)
    created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    databases = {}
    for spec in args.database:
        uuid, path = spec.split("=", 1)
        databases[uuid] = Database(uuid, path, created)
    emulator = Emulator(args.account, args.token, databases, default_switches(args))
    return bind_server(Handler, emulator, (args.host, args.port))


def serve(argv):
    """Start the emulator in a background thread; return (server, thread)."""
    server = make_server(argv)
    thread = threading.Thread(target=server.serve_forever, name="d1-emulator", daemon=True)
    thread.start()
    return server, thread


def main(argv=None):
    serve_main(make_server, argv)


d1_restore.bind(ApiError=ApiError, Database=Database, envelope=envelope, json_reply=json_reply)

if __name__ == "__main__":
    main()
