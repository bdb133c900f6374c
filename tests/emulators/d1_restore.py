"""The D1 emulator's restore side (provider-apis.md §1.5, §1.6, §6.1 "Import", "Time travel"),
with SQLite behind it.

* ``POST /accounts/{a}/d1/database`` ``{name}`` creates an empty database (a new SQLite file next
  to the first one given), ``DELETE /accounts/{a}/d1/database/{id}`` deletes one.
* ``POST …/database/{id}/query`` (and ``/raw``) ``{sql, params?}`` runs SQL:
  ``result: [{results: [rows as objects], success: true, meta: {…}}]``. Refused while the
  database is importing (D1 blocks it).
* ``POST …/database/{id}/import``: ``init {etag}`` → ``{upload_url, filename}`` (or, when that
  etag was uploaded already, straight to a polling answer); ``PUT <upload_url>`` with a
  ``Content-Length`` stores the file and answers 200 with ``ETag: "<md5 of what arrived>"``
  (switch ``upload_etag``: ``"omit"`` | ``"corrupt"``); ``ingest {etag, filename}`` executes the
  SQL into the database's SQLite file, all or nothing (a failure leaves the database as it was),
  refusing transaction statements and statements over 100,000 bytes; statements run one by one
  in file order with foreign keys on (so an index or trigger before its table or view fails with
  SQLite's own "no such table"); ``poll {current_bookmark}``.
  The first ``import_active_polls`` answers are ``active`` (202), then ``complete`` with
  ``result {final_bookmark, num_queries, meta}``; on error both ``error`` and ``errors``.
* Time travel: every export's ``at_bookmark`` and every ``GET …/time_travel/bookmark`` keeps a
  copy of the database as it was, so ``POST …/time_travel/restore?bookmark=`` really restores that
  content (answer ``{bookmark, previous_bookmark, message}``). An unknown bookmark, or one named
  in the ``expired_bookmarks`` switch, is "outside the Time Travel window" (400). At most 10
  restores per 10 minutes per database (429).
"""

import hashlib
import os
import re
import secrets
import sqlite3
import time
import uuid as uuidlib
from contextlib import closing
from pathlib import Path

RE_IMPORT = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/import/?$")
RE_QUERY = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/(?:query|raw)/?$")
RE_TT_BOOKMARK = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/time_travel/bookmark/?$")
RE_TT_RESTORE = re.compile(r"^/client/v4/accounts/([^/]+)/d1/database/([^/]+)/time_travel/restore/?$")
RE_UPLOAD = re.compile(r"^/__upload/([0-9a-f]+)$")
# D1 caps one SQL statement at 100,000 bytes (D1 limits docs, "Maximum SQL statement length";
# workerd#3049: "Our implementation limits a given SQL statement to 100,000 bytes"); a dump's row
# may hold up to 2,000,000 bytes (D1 limits, "Maximum string, BLOB or table row size"), so a dump
# D1 exported can fail its own import with "statement too long" (workers-sdk#4510, #6146).
MAX_STATEMENT = 100_000
MAX_LENGTH = 2_000_000
RE_TRANSACTION = re.compile(r"^\s*(BEGIN(\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?(\s+TRANSACTION)?\s*;|COMMIT\b|END\s+TRANSACTION\b|ROLLBACK\b)",
                            re.IGNORECASE | re.MULTILINE)

# Bound by d1.py (which imports this module), so both share one ApiError class however d1.py runs.
ApiError = Database = envelope = json_reply = None


def bind(**names):
    globals().update(names)


RESTORE_SWITCHES = {
    "import_active_polls": 1,
    # An import that never ends: every poll answers 202 ``active`` and the database stays blocked
    # while the switch is set. D1 documents that "imports block the D1 for their duration" and
    # answers 202 while the task is "currently running" (API reference, database ``import``;
    # provider-apis.md §1.5); its import API offers ``init``, ``ingest`` and ``poll`` and no
    # action that stops an import (cloudflare-typescript ``src/resources/d1/database.ts``,
    # ``DatabaseImportParams``), and wrangler's ``d1/execute.ts`` polls while ``active`` with no
    # deadline of its own. A client that does not bound its wait polls forever.
    "import_stuck": False,
    "upload_etag": None,          # None | "omit" | "corrupt"
    "expired_bookmarks": [],
}


def split_statements(text: str) -> list:
    """The file's statements, each ending at a ``;`` that completes it (SQLite's own
    ``sqlite3_complete``, so a ``;`` inside a string or a trigger's body does not end one)."""
    out, start, pos = [], 0, 0
    while True:
        pos = text.find(";", pos)
        if pos < 0:
            break
        pos += 1
        if sqlite3.complete_statement(text[start:pos]):
            statement = text[start:pos].strip()
            if statement != ";":
                out.append(statement)
            start = pos
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def copy_sqlite(src: str, dst: str):
    """A consistent copy of one SQLite file over another (the backup API, not a file copy)."""
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(dst)) as b:
        a.backup(b)


def js_number(value):
    """A value as D1's JSON answer carries it: an integer beyond 2^53 goes through a JavaScript
    Number and comes back rounded (D1 Worker API docs, "Type conversion": INTEGER -> Number, "BigInts
    are not currently supported ... JavaScript integers are safe up to Number.MAX_SAFE_INTEGER";
    provider-apis.md §1: "Numbers are limited to JavaScript's 52-bit precision").  Exact values
    need ``CAST(x AS TEXT)``."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 53:
        return float(value)
    return value


class RestoreMixin:
    """Mixed into the D1 ``Emulator``: uses its ``lock``, ``databases``, ``switches``,
    ``check_account``, ``find_database`` and ``_new_bookmark``."""

    def _reset_restore_state(self):
        self.uploads = {}          # (db uuid, etag) -> bytes
        self.upload_tokens = {}    # token -> (db uuid, etag, filename)
        self.import_tasks = {}     # at_bookmark -> dict
        self.snapshots = {}        # bookmark -> (db uuid, path of the copy)
        self.tt_restores = {}      # db uuid -> [monotonic times]
        self.created = []          # names of databases created through the API
        self.deleted = []          # names of databases deleted through the API
        self.queries = []          # (db name, sql) of every query

    def restore_state(self) -> dict:
        return {"imports": [dict((k, v) for k, v in t.items() if k != "sql") for t in self.import_tasks.values()],
                "created": list(self.created), "deleted": list(self.deleted),
                "databases": {u: d.name for u, d in self.databases.items()},
                "queries": [list(q) for q in self.queries[-50:]],
                "snapshots": len(self.snapshots)}

    # ----- bookmarks -----------------------------------------------------------------
    def keep_snapshot(self, db, bookmark: str):
        """Keeps the database's content as of ``bookmark``."""
        path = f"{db.path}.bm-{bookmark[:8]}-{secrets.token_hex(4)}"
        copy_sqlite(db.path, path)
        self.snapshots[bookmark] = (db.uuid, path)

    def _busy(self, db):
        for task in self.import_tasks.values():
            if task["database_id"] == db.uuid and task["status"] == "active":
                raise ApiError(503, 7500, f"D1 database {db.uuid} is currently being imported and blocks queries")

    # ----- create, delete, query -------------------------------------------------------
    def create_database(self, account: str, body: dict):
        self.check_account(account)
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name):
            raise ApiError(400, 7400, "name: must be lower-case letters, digits, - and _")
        with self.lock:
            if any(d.name == name for d in self.databases.values()):
                # Code 7502 (workers-sdk#2143: wrangler turns it into "A database with that name
                # already exists"); a create whose answer was lost meets it when sent again.
                raise ApiError(400, 7502, "A database with that name already exists")
            first = next(iter(self.databases.values()), None)
            folder = Path(first.path).parent if first else Path(os.environ.get("TMPDIR", "/tmp"))
            path = str(folder / f"{name}.sqlite")
            sqlite3.connect(path).close()
            uuid = str(uuidlib.uuid4())
            created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            self.databases[uuid] = Database(uuid, path, created)
            self.created.append(name)
            return json_reply(200, envelope(self.databases[uuid].info()))

    def delete_database(self, account: str, ident: str):
        self.check_account(account)
        with self.lock:
            db = self.find_database(ident)
            self._busy(db)
            del self.databases[db.uuid]
            self.deleted.append(db.name)
            try:
                os.remove(db.path)
            except OSError:
                pass
            return json_reply(200, envelope(None))

    def query(self, account: str, ident: str, body: dict):
        self.check_account(account)
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
            raise ApiError(400, 7400, "sql: must be a string")
        params = body.get("params") or []
        with self.lock:
            db = self.find_database(ident)
            self._busy(db)
            self.queries.append((db.name, body["sql"]))
            try:
                with closing(sqlite3.connect(db.path)) as conn:
                    conn.row_factory = sqlite3.Row
                    cur = conn.execute(body["sql"], params)
                    rows = [{k: js_number(v) for k, v in dict(r).items()} for r in cur.fetchall()]
                    conn.commit()
                    changes = conn.total_changes
            except sqlite3.Error as exc:
                raise ApiError(400, 7500, f"{exc}: SQLITE_ERROR")
        meta = {"changed_db": changes > 0, "changes": changes, "duration": 0.1, "last_row_id": 0,
                "rows_read": len(rows), "rows_written": changes, "size_after": os.path.getsize(db.path)}
        return json_reply(200, envelope([{"results": rows, "success": True, "meta": meta}]))

    # ----- import --------------------------------------------------------------------------
    def import_call(self, account: str, ident: str, body: dict, host: str):
        self.check_account(account)
        if not isinstance(body, dict):
            raise ApiError(400, 7400, "Request body must be a JSON object")
        action = body.get("action")
        with self.lock:
            db = self.find_database(ident)
            if action == "init":
                etag = body.get("etag")
                if not isinstance(etag, str) or not re.fullmatch(r"[0-9a-f]{32}", etag):
                    raise ApiError(400, 7400, "etag: must be the lower-case hex MD5 of the file")
                filename = f"{db.uuid}-{etag}.sql"
                if (db.uuid, etag) in self.uploads:
                    return self._ingest(db, etag, ["File already uploaded. Processing."])
                token = secrets.token_hex(16)
                self.upload_tokens[token] = (db.uuid, etag, filename)
                return self._import_reply(200, {"success": True, "type": "import",
                                                "upload_url": f"http://{host}/__upload/{token}",
                                                "filename": filename})
            if action == "ingest":
                etag = body.get("etag")
                if (db.uuid, etag) not in self.uploads:
                    raise ApiError(400, 7500, f"No uploaded file with etag {etag!r} for this database")
                if body.get("filename") != f"{db.uuid}-{etag}.sql":
                    raise ApiError(400, 7400, "filename: must be the filename init returned")
                return self._ingest(db, etag, [])
            if action == "poll":
                task = self.import_tasks.get(body.get("current_bookmark"))
                if task is None or task["database_id"] != db.uuid:
                    raise ApiError(400, 7500, "Unknown import bookmark")
                return self._import_poll(task)
            raise ApiError(400, 7400, "action: must be init, ingest or poll")

    def upload(self, token: str, headers, body: bytes):
        """``PUT <upload_url>``: returns (status, headers, body)."""
        with self.lock:
            entry = self.upload_tokens.get(token)
            if entry is None:
                return 403, [], b"<Error><Code>AccessDenied</Code></Error>"
            if headers.get("Transfer-Encoding", "").lower() == "chunked" or headers.get("Content-Length") is None:
                return 411, [], b"<Error><Code>MissingContentLength</Code></Error>"
            uuid, etag, _ = entry
            md5 = hashlib.md5(body).hexdigest()
            self.uploads[(uuid, etag)] = body
            mode = self.switches.get("upload_etag")
            out = [] if mode == "omit" else [("ETag", '"' + ("0" * 32 if mode == "corrupt" else md5) + '"')]
            return 200, out, b""

    def _ingest(self, db, etag: str, messages: list):
        sql = self.uploads[(db.uuid, etag)]
        bookmark = self._new_bookmark()
        task = {"database_id": db.uuid, "at_bookmark": bookmark, "etag": etag, "status": "active",
                "polls_left": int(self.switches.get("import_active_polls") or 0),
                "messages": messages + [f"Importing {len(sql)} bytes"], "error": None, "result": None}
        self.import_tasks[bookmark] = task
        error, num_queries = self._execute(db, sql)
        if error:
            task.update(error=error, final="error")
        else:
            final = self._new_bookmark()
            task.update(final="complete", result={
                "final_bookmark": final, "num_queries": num_queries,
                "meta": {"changed_db": True, "changes": num_queries, "duration": 1.0, "last_row_id": 0,
                         "rows_read": 0, "rows_written": num_queries, "size_after": os.path.getsize(db.path)}})
        return self._import_poll(task)

    def _execute(self, db, data: bytes):
        """Runs the SQL into the database, all or nothing; returns (error or None, statements).

        Statements run one at a time in file order, as D1's import does, with foreign keys
        enforced (D1 enforces them by default, D1 docs "Foreign keys"; a dump's
        ``PRAGMA defer_foreign_keys=TRUE`` defers the checks to the end). So objects that refer to
        ones created later fail with SQLite's own "no such table" (workers-sdk#5683,
        workerd#2471): an index or a trigger before its table, an ``INSTEAD OF`` trigger before its
        view, a child table's row before its parent table exists (deferred or not). A statement
        over 100,000 bytes fails with D1's "statement too long: SQLITE_TOOBIG" (workerd#3049).
        """
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return "the file is not UTF-8 SQL text", 0
        if text.startswith("SQLite format 3"):
            return "the file is a SQLite database, not SQL text", 0
        if RE_TRANSACTION.search(text):
            return "cannot start a transaction within a transaction", 0
        statements = split_statements(text)
        for statement in statements:
            if len(statement.encode()) > MAX_STATEMENT:
                return f"statement too long: SQLITE_TOOBIG (a statement of {len(statement.encode())} bytes)", 0
        backup = f"{db.path}.import-{secrets.token_hex(4)}"
        copy_sqlite(db.path, backup)
        try:
            with closing(sqlite3.connect(db.path, isolation_level=None)) as conn:
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_LENGTH)
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("BEGIN")
                try:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return None, len(statements)
        except (sqlite3.Error, sqlite3.Warning) as exc:
            copy_sqlite(backup, db.path)
            return f"{exc}: SQLITE_ERROR", 0
        finally:
            os.remove(backup)

    def _import_poll(self, task):
        if task["status"] == "active":
            if self.switches.get("import_stuck"):
                task["stuck_polls"] = task.get("stuck_polls", 0) + 1
                lines, task["messages"] = task["messages"], []
                return self._import_reply(202, {"success": True, "type": "import", "status": "active",
                                                "at_bookmark": task["at_bookmark"], "messages": lines})
            if task["polls_left"] > 0:
                task["polls_left"] -= 1
                lines, task["messages"] = task["messages"], []
                return self._import_reply(202, {"success": True, "type": "import", "status": "active",
                                                "at_bookmark": task["at_bookmark"], "messages": lines})
            task["status"] = task["final"]
        lines, task["messages"] = task["messages"], []
        payload = {"success": True, "type": "import", "status": task["status"],
                   "at_bookmark": task["at_bookmark"], "messages": lines}
        if task["status"] == "error":
            payload.update(error=task["error"], errors=[task["error"]])
        else:
            payload["result"] = task["result"]
        return self._import_reply(200, payload)

    @staticmethod
    def _import_reply(status: int, result: dict):
        return json_reply(status, envelope(result))

    # ----- time travel ---------------------------------------------------------------------
    def tt_bookmark(self, account: str, ident: str):
        self.check_account(account)
        with self.lock:
            db = self.find_database(ident)
            bookmark = self._new_bookmark()
            self.keep_snapshot(db, bookmark)
            return json_reply(200, envelope({"bookmark": bookmark}))

    def tt_restore(self, account: str, ident: str, query: dict):
        self.check_account(account)
        bookmark = (query.get("bookmark") or [None])[0]
        if not bookmark:
            raise ApiError(400, 7400, "bookmark or timestamp: one is required")
        with self.lock:
            db = self.find_database(ident)
            self._busy(db)
            snap = self.snapshots.get(bookmark)
            if snap is None or snap[0] != db.uuid or bookmark in (self.switches.get("expired_bookmarks") or []):
                raise ApiError(400, 7500, f"Bookmark {bookmark} is outside the Time Travel window of database "
                                          f"{db.uuid}")
            now = time.monotonic()
            recent = [t for t in self.tt_restores.get(db.uuid, []) if now - t < 600]
            if len(recent) >= 10:
                raise ApiError(429, 7429, "Too many restores: at most 10 per 10 minutes per database",
                               [("Retry-After", str(int(600 - (now - recent[0])) + 1))])
            previous = self._new_bookmark()
            self.keep_snapshot(db, previous)
            copy_sqlite(snap[1], db.path)
            recent.append(now)
            self.tt_restores[db.uuid] = recent
            after = self._new_bookmark()
            self.keep_snapshot(db, after)
            return json_reply(200, envelope({
                "bookmark": after, "previous_bookmark": previous,
                "message": f"Restored database {db.uuid} to bookmark {bookmark}"}))

