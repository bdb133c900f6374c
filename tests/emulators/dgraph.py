#!/usr/bin/env python3
"""Local emulator of Dgraph Cloud's backend admin API and the Cerebro management API
(provider-apis.md §2, §6.2).

Run::

    python3 tests/emulators/dgraph.py --port 0 --admin-key KEY \\
        [--acl --user-id groot --password PW] [--access-ttl 21600] [--url-ttl 172800] \\
        [--groups 1] [--cerebro-email E --cerebro-password P --deployments name1,name2] \\
        [--host 127.0.0.1]

It prints one line ``READY <port>`` once it listens.

What is emulated
----------------
* ``POST /admin`` (ACL ``login`` mutation, by password or by ``refreshToken``) and ``POST
  /admin/slash`` (``export(format, namespace)``, ``exportStatus(exportId, taskId)`` and the
  legacy synchronous ``export { signedUrls }``) of the default backend.  With ``--deployments
  a,b`` the same pair is served under ``/backends/<name>/admin[/slash]``, one backend per name,
  each with its own exports, tokens and admin key (its ``jwtToken``).
* Every GraphQL call is ``POST {"query", "variables"}`` answered ``{"data", "errors"}`` with HTTP
  200 for GraphQL errors.  Nothing parses GraphQL: the operation is recognised by its field name
  after the first ``{`` and arguments are read from the field's argument list, resolving
  ``$variables`` from ``variables`` (inline literals work too).
* Authentication: ``X-Auth-Token`` or ``Dg-Auth`` must carry the backend's admin key on both
  ``/admin`` and ``/admin/slash`` (also for ``login``).  With ``--acl``, ``/admin/slash`` also
  requires ``X-Dgraph-AccessToken`` with a live ``accessJWT``.  Tokens are HS256 JWTs with
  Dgraph's claims (``exp``, ``groups``, ``namespace``, ``userid``) but validity is decided by
  the emulator's own table, so ``expire_tokens_now`` can revoke them.
* The export task state machine: each ``exportStatus`` poll moves one step through
  ``status_sequence`` (sampled when the export is created) and then stays on its last value.
  ``signedUrls`` is filled only while the status is ``Success``.
* Export files per Alpha group ``gNN`` in a folder ``dgraph.r<readTs>.u<MMDD.HHMM>``: the data
  (``.json.gz``/``.rdf.gz``), ``.schema.gz`` and ``.gql_schema.gz``, produced from a built-in
  dataset with Dgraph's exporter rules (worker/export.go), gzip level 1 ("BestSpeed").
* ``GET /__signed/<token>/<folder>/<file>?X-Amz-Algorithm=…&X-Amz-Credential=…&X-Amz-Date=<issue
  time>&X-Amz-Expires=<ttl>&X-Amz-SignedHeaders=host&X-Amz-Signature=…``: unauthenticated S3-style
  presigned downloads (``common.Presigner``), valid ``signed_url_ttl_s`` seconds from issue
  (exactly, fractions included), then **403** ``application/xml`` ``<Error><Code>AccessDenied
  </Code><Message>Request has expired</Message></Error>``; an altered query is 403
  ``SignatureDoesNotMatch``, an unknown token or file 404 ``NoSuchKey``.  Every ``exportStatus``
  poll that answers ``Success`` signs the files anew (fresh URLs, a new ``X-Amz-Date``), so a
  client can renew an expired URL and resume; older URLs stay valid until their own expiry.
  With ``signed_url_query: false`` the URLs are bare paths (the token alone, same expiry).
* Downloads serve byte ranges like an object store (``common.serve_download``): ``ETag`` (strong)
  and ``Last-Modified`` of the file (export folder and name, not the URL: a renewed URL has the
  same validators), ``Accept-Ranges: bytes``, ``Range`` → 206 with ``Content-Range``, past the end
  → 416 ``bytes */TOTAL``, malformed/multi-range → 200 whole, ``If-Range`` mismatch → 200 whole.
  Bytes are served exactly as stored: ``application/octet-stream`` with ``Content-Length`` and
  never a ``Content-Encoding``.
* Dgraph's own backups and restores on ``/admin/slash`` (dedicated backends only; a backend named
  in the ``non_dedicated_backends`` switch, ``default`` for the default one, is ``shared``: its
  ``listBackups`` and ``restore`` answer an in-payload ``errors`` and ``restoreStatus`` a top-level
  GraphQL error, all with ``NON_DEDICATED_MESSAGE``).  A backend's data is the built-in dataset
  plus ``extra_people`` people (the switch, or the backend's own value once set by ``POST
  /__control/data {"backend", "extra_people"}`` or by a restore).  ``POST /__control/backup
  {"backend", "type", "timestamp"}`` takes a backup of that data now (``full`` starts a series
  with a new folder, ``incremental`` adds to the newest; ``timestamp`` defaults to now, written
  ``2021-04-15T18:00:58+0000``).  ``listBackups`` answers the series as nested arrays of ``{type,
  backupNum, folder, timestamp}`` with ``errors: []``; ``restore(uid, backupFolder, backupNum)``
  restores the backup of the deployment with that ``uid`` (``""``/``0``: the newest) into the
  backend called, answering ``{errors: null, response: {code: "Success", message: "Restore
  operation started.", restoreId}}``; each ``restoreStatus(restoreId)`` poll moves one step through
  ``restore_status_sequence`` (default ``InProgress`` then ``OK``) and the backend's data becomes
  the backup's when ``OK`` is first reported, unless ``restore_errors`` (sampled at ``restore``)
  is non-empty: then that poll answers ``status: "ERR"`` with those errors and the data stays.
  ``GET /__control/state`` lists each backend's ``uid``, ``deploymentType``, ``people`` and
  ``backups``, and every ``restores`` entry.  Fault step ``restore`` is the restore mutation.
* ``POST /cerebro/graphql`` (only with ``--cerebro-email``): the ``login`` query and the
  ``deployments`` list behind ``Authorization: Bearer <token>``.

Reproduced quirks (see the reference for the evidence)
-------------------------------------------------------
* Cerebro ``login`` is a query; bad credentials give ``{"data":{"login":null}}`` and no error.
* ``export`` answers ``Export queued with ID <taskId>``; ``taskId`` is ``%#x`` hex.  The switch
  ``export_answer_form`` picks the answer's shape: ``selection`` (default, ``data.export =
  {response, exportId, taskId}``), ``docs_example`` (Dgraph Cloud's documented example:
  ``data.export`` is the export id string, with ``data.response`` and ``data.taskID`` beside it)
  or ``unrecognised`` (``data.export = {response}`` with no task id; the export is queued anyway),
  or ``gateway_timeout`` (the export is queued, then a gateway in front answers ``504`` with its
  own HTML page instead of Dgraph's JSON).
* ``namespace`` omitted exports the caller's namespace (core ``validateAndGetNs``); ``-1``
  exports all namespaces and only a Galaxy guardian may ask for it; a Guardian of another
  namespace asking for a foreign namespace gets core's ``not allowed to export namespace 0x..``.
* Data files: the key order is Dgraph's (namespace, predicate *length*, predicate, uid);
  one JSON object per posting (``"  {"uid":"0x1","namespace":"0x0",...}"``); language-tagged
  values come before the untagged value of the same predicate; only ints and floats are bare
  JSON numbers (booleans, datetimes and facets of those types are strings); facets sorted by
  key; floats formatted like Go's ``FormatFloat(f, 'G', -1, 64)``; strings escaped like Go's
  ``json.Marshal`` (``<`` -> ``\\u003c``).  Internal data (``dgraph.graphql.xid``,
  ``dgraph.drop.op``, ``dgraph.graphql.p_query``, ``dgraph.type == "dgraph.graphql"``) is
  skipped and ``dgraph.graphql.schema`` goes to the gql_schema file.  With ``--acl`` the
  ACL nodes (``groot``, ``guardians``, the password hash) are exported too, as Dgraph does.
* Schema files list only the predicates whose tablet the group serves (``dgraph.*`` live in
  group 1, user predicates are spread over the groups) but every group repeats all types.
* gql_schema files are ``[\\n{"Namespace":0,"Schema":"..."}\\n]\\n``; empty groups still get
  ``[\\n\\n]\\n`` (and ``[\\n\\n]\\n`` / an empty file for JSON / RDF data).

Fault switches live under ``/__control`` (``POST`` merges JSON into the switches, unknown names
are a 400; ``POST /__control/reset`` restores the defaults and forgets exports and tokens; ``GET
/__control/state`` reports switches, exports, the last 2000 requests and the download count;
``GET /__control/file/<taskId>/<file>`` returns a stored export file's raw bytes).  See
``default_switches`` for the list.  ``status_sequence``, ``failing_backends`` and
``extra_people`` are sampled when an export is created; the rest are read live.  The download
switches:

* ``signed_url_ttl_s`` (seconds ≥ 0, default ``--url-ttl`` = 172800, Dgraph's 48 h; ``url_ttl`` is
  the same switch under its older name): the lifetime of each signed URL issued from now on.
* ``signed_url_query`` (bool, default true): URLs carry the ``X-Amz-*`` query (checked on use).
* ``ignore_range`` (bool): answer every download 200 with the whole body.
* ``etag_generation`` (int ≥ 0): part of the ETag and Last-Modified; bump it and the files look
  replaced (an ``If-Range`` with the old ETag gets a full 200; the bytes stay the same).
* ``throttle_kib_per_s`` (number ≥ 0, 0 = unlimited): pace download bodies (read live).
* ``truncate_after_bytes`` (int ≥ 0, 0 = off): every download declares its full
  ``Content-Length`` but the connection closes after that many body bytes (from the range start).
* ``download_fail_status`` (int or null): answer downloads with that status.
* ``extra_export_files`` (object, default ``{}``): more files the next exports' folders hold,
  ``{name: text}``, served gzip-compressed under that name (sampled when an export is created).

Injected faults (``faults``, see ``common.py``): steps ``login`` (the ACL login on ``/admin``; it
also takes ``redirect_307``, to another origin that records whether the body reached it),
``export`` (the export mutation), ``status`` (``exportStatus``) and ``download`` (a signed URL).
``provider_error`` at ``export`` answers HTTP 200 with a GraphQL error carrying the message; at
``status`` the export turns ``Failed`` (for good); ``stuck`` at ``status`` answers ``Running``,
without URLs, for as long as the fault is set.  Every request-log entry names its ``step``.

Each download's request-log entry has ``method``, ``path`` (no query), ``status``, ``op``
(``"download"`` once the URL was accepted), ``t``, ``range``, ``if_range``, ``accept_encoding``
(request headers as received, null when absent), ``served_start``, ``served_end`` (the byte span
served, end exclusive, null when nothing was) and ``sent`` (body bytes actually written).
"""

from __future__ import annotations

import argparse
import base64
import copy
import decimal
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import struct
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (API_FAULTS, BaseHandler, RANGE_SWITCHES, REQUEST_LOG_SIZE, SIGNED_DOWNLOAD_FAULTS,  # noqa: E402
                    LoginOrigin, Presigner, Reply as BaseReply, answer_fault, bind_server, fault_active,
                    faults_problem, gzip_once_more, log_snapshot, range_switch_problem, s3_error_body,
                    s3_error_reply, serve_download, serve_main, take_fault, ttl_switch_changes, write_cut_reply)

DEFAULT_BACKEND = "default"
# How the export mutation answers (switch ``export_answer_form``): as its selection set asks
# (``selection``), as Dgraph Cloud's docs print it (``docs_example``), or in a form neither shows.
EXPORT_ANSWER_FORMS = ("selection", "docs_example", "unrecognised", "gateway_timeout")
REFRESH_TTL = 30 * 24 * 3600
CEREBRO_TTL = 3 * 3600
MALFORMED_BODY = b"<html>502 Bad Gateway</html>"
NON_DEDICATED_MESSAGE = "Backups and restores are only available for dedicated backends"
KNOWN_NAMESPACES_ACL = (0, 1)
UINT64_MAX = 2**64 - 1
# The provider steps faults can be injected at, and what each takes (common.py, "Injected faults").
FAULT_STEPS = {
    # ``redirect_307``: a front end that sends the ACL login (its password in the body) to another
    # origin with a 307, which keeps the body (common.py, "Injected faults").
    "login": API_FAULTS | {"provider_error", "redirect_307"},
    "export": API_FAULTS | {"provider_error"},
    "status": API_FAULTS | {"provider_error", "stuck"},
    "restore": API_FAULTS,
    "download": SIGNED_DOWNLOAD_FAULTS,
}
PROVIDER_ERRORS = {
    "login": "invalid username or password",
    "export": "export failed: another export or backup is already running",
    "status": "Failed",  # the export's status (exportStatus carries no message)
}
GATEWAY_REASONS = {429: "Too Many Requests", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}

RE_BACKEND = re.compile(r"^/backends/([^/]+)(/admin(?:/slash)?)/?$")
RE_SIGNED = re.compile(r"^/__signed/([^/]+)/([^/]+)/([^/]+)$")
RE_CONTROL_FILE = re.compile(r"^/__control/file/([^/]+)/([^/]+)$")


# ----- small helpers ---------------------------------------------------------------------
@dataclass
class Reply(BaseReply):
    """A reply that also names the operation it answers, for the request log."""

    op: str | None = None


def json_reply(payload, status: int = 200, op: str | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(), "application/json", [], op)


def gql_errors(messages, data=None, status: int = 200, op: str | None = None) -> Reply:
    if isinstance(messages, str):
        messages = [messages]
    return json_reply({"data": data, "errors": [{"message": m} for m in messages]}, status, op)


def xml_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, s3_error_body(code, message), "application/xml")


class GqlError(Exception):
    """A resolver error: answered as ``{"data": {field: null}, "errors": [{message}]}``."""

    def __init__(self, message: str, field_name: str | None = None, status: int = 200):
        super().__init__(message)
        self.message, self.field_name, self.status = message, field_name, status


def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict, secret: bytes) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())}"


def go_json_string(value: str) -> str:
    """A string as Go's json.Marshal writes it (HTML-safe escaping, \\u00XX for controls)."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or ch in "<>&" or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_format_float_g(value: float) -> str:
    """Go's strconv.FormatFloat(value, 'G', -1, 64)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digits, exponent = decimal.Decimal(repr(value)).as_tuple()
    digits = list(digits)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exponent += 1
    nd = len(digits)
    dp = nd + exponent            # position of the decimal point
    text = "".join(map(str, digits))
    neg = "-" if sign else ""
    exp = dp - 1
    if exp < -4 or exp >= 6:      # shortest formatting uses eprec = 6
        mantissa = text[0] + ("." + text[1:] if nd > 1 else "")
        return f"{neg}{mantissa}E{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{neg}0.{'0' * -dp}{text}"
    if dp >= nd:
        return f"{neg}{text}{'0' * (dp - nd)}"
    return f"{neg}{text[:dp]}.{text[dp:]}"


def gzip_bytes(data: bytes) -> bytes:
    """Gzip at level 1 (Go's gzip.BestSpeed) with the header Go's gzip.Writer writes:
    no name, mtime 0, XFL 4 ("fastest"), OS 255 ("unknown")."""
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff" + body + trailer


# ----- the built-in dataset ----------------------------------------------------------------
# Predicate schema: type, list, tokenizers, reverse, count, lang, upsert.
@dataclass(frozen=True)
class PredSchema:
    type: str
    is_list: bool = False
    index: tuple = ()
    reverse: bool = False
    count: bool = False
    lang: bool = False
    upsert: bool = False

    def line(self, ns: int, pred: str) -> str:
        text = f"[{ns:#x}] <{pred}>:" + (f"[{self.type}]" if self.is_list else self.type)
        if self.reverse:
            text += " @reverse"
        elif self.index:
            text += f" @index({','.join(self.index)})"
        if self.count:
            text += " @count"
        if self.lang:
            text += " @lang"
        if self.upsert:
            text += " @upsert"
        return text + " . \n"


BASE_SCHEMA = {
    "dgraph.type": PredSchema("string", is_list=True, index=("exact",)),
    "dgraph.drop.op": PredSchema("string"),
    "dgraph.graphql.xid": PredSchema("string", index=("exact",), upsert=True),
    "dgraph.graphql.schema": PredSchema("string"),
    "dgraph.graphql.p_query": PredSchema("string", index=("sha256",)),
}
ACL_SCHEMA = {
    "dgraph.xid": PredSchema("string", index=("exact",), upsert=True),
    "dgraph.acl.rule": PredSchema("uid", is_list=True),
    "dgraph.password": PredSchema("password"),
    "dgraph.user.group": PredSchema("uid", is_list=True, reverse=True),
    "dgraph.rule.predicate": PredSchema("string", index=("exact",), upsert=True),
    "dgraph.rule.permission": PredSchema("int"),
}
USER_SCHEMA = {
    "name": PredSchema("string", index=("exact", "term"), lang=True),
    "age": PredSchema("int", index=("int",)),
    "friend": PredSchema("uid", is_list=True, reverse=True, count=True),
    "score": PredSchema("float"),
    "active": PredSchema("bool"),
    "dob": PredSchema("datetime"),
    "nickname": PredSchema("default"),
    "bio": PredSchema("string"),
    "email": PredSchema("string", index=("exact",), upsert=True),
}
BASE_TYPES = [
    ("dgraph.graphql", ["dgraph.graphql.schema", "dgraph.graphql.xid"]),
    ("dgraph.graphql.persisted_query", ["dgraph.graphql.p_query"]),
]
ACL_TYPES = [
    ("dgraph.type.Rule", ["dgraph.rule.predicate", "dgraph.rule.permission"]),
    ("dgraph.type.User", ["dgraph.xid", "dgraph.password", "dgraph.user.group"]),
    ("dgraph.type.Group", ["dgraph.xid", "dgraph.acl.rule"]),
]
USER_TYPES = [
    ("Person", ["name", "age", "email", "nickname", "dob", "score", "active", "bio", "friend", "~friend"]),
]
GQL_SCHEMA = (
    "type Person {\n"
    "\tname: String! @search(by: [exact, term]) @dgraph(pred: \"name\")\n"
    "\tage: Int @search @dgraph(pred: \"age\")\n"
    "\temail: String @id @dgraph(pred: \"email\")\n"
    "\tfriends: [Person] @dgraph(pred: \"friend\")\n"
    "}\n"
    "# Tom & Jerry <cartoon> escaping check\n"
)
GQL_SCHEMA_NS1 = "type Note {\n\ttext: String\n}\n"
PASSWORD_HASH = "$2a$10$y7Bqo3wH0eMh8T8yVZ0J3u2ONc0b9qkq2rYm0v6o8nQ2vXQ3r5h1K"


@dataclass
class Posting:
    """One posting: a value (``type``/``value``, optional ``lang``) or a uid edge (``ref``)."""
    type: str                      # string|default|int|float|bool|datetime|password|uid
    value: object
    lang: str | None = None
    facets: tuple = ()             # ((key, type, value), ...)


def value_posting(kind: str, value, lang=None) -> Posting:
    return Posting(kind, value, lang)


def edge(uid: int, facets=()) -> Posting:
    return Posting("uid", uid, None, tuple(sorted(facets)))


class Dataset:
    """Posting lists keyed by (namespace, predicate, uid), plus schema and types per namespace."""

    def __init__(self, acl: bool, extra_people: int = 0):
        self.lists: dict[tuple, list] = {}
        self.schema: dict[int, dict] = {}
        self.types: dict[int, list] = {}
        self.namespaces = list(KNOWN_NAMESPACES_ACL) if acl else [0]
        next_uid = [1]

        def new_uid() -> int:
            next_uid[0] += 1
            return next_uid[0] - 1

        for ns in self.namespaces:
            schema = dict(BASE_SCHEMA)
            types = list(BASE_TYPES)
            if acl:
                schema.update(ACL_SCHEMA)
                types += ACL_TYPES
                guardians, groot = new_uid(), new_uid()
                self.add(ns, "dgraph.xid", guardians, value_posting("string", "guardians"))
                self.add(ns, "dgraph.type", guardians, value_posting("string", "dgraph.type.Group"))
                self.add(ns, "dgraph.xid", groot, value_posting("string", "groot"))
                self.add(ns, "dgraph.type", groot, value_posting("string", "dgraph.type.User"))
                self.add(ns, "dgraph.password", groot, value_posting("password", PASSWORD_HASH))
                self.add(ns, "dgraph.user.group", groot, edge(guardians))
            schema.update(USER_SCHEMA)
            types += USER_TYPES
            self.schema[ns], self.types[ns] = schema, types
            if ns == 0:
                self._people_ns0(ns, new_uid, extra_people)
                gql = GQL_SCHEMA
            else:
                dave = new_uid()
                self.add(ns, "dgraph.type", dave, value_posting("string", "Person"))
                self.add(ns, "name", dave, value_posting("string", "Dave"))
                self.add(ns, "age", dave, value_posting("int", 52))
                gql = GQL_SCHEMA_NS1
            schema_node = new_uid()   # the GraphQL schema node: only its schema is exported
            self.add(ns, "dgraph.graphql.schema", schema_node, value_posting("string", gql))
            self.add(ns, "dgraph.graphql.xid", schema_node, value_posting("string", "dgraph.graphql.schema"))
            self.add(ns, "dgraph.type", schema_node, value_posting("string", "dgraph.graphql"))
            pq = new_uid()            # a persisted query: never exported
            self.add(ns, "dgraph.graphql.p_query", pq, value_posting("string", "{ q(func: has(name)) { name } }"))
            self.add(ns, "dgraph.type", pq, value_posting("string", "dgraph.graphql.persisted_query"))

    def add(self, ns: int, pred: str, uid: int, posting: Posting):
        self.lists.setdefault((ns, pred, uid), []).append(posting)

    def _people_ns0(self, ns, new_uid, extra_people: int):
        alice, bob, carol = new_uid(), new_uid(), new_uid()
        for uid in (alice, bob, carol):
            self.add(ns, "dgraph.type", uid, value_posting("string", "Person"))
        self.add(ns, "name", alice, value_posting("string", "Alice"))
        self.add(ns, "name", alice, value_posting("string", "Alicia", lang="es"))
        self.add(ns, "age", alice, value_posting("int", 30))
        self.add(ns, "email", alice, value_posting("string", "alice@example.com"))
        self.add(ns, "nickname", alice, value_posting("default", "Ali"))
        self.add(ns, "dob", alice, value_posting("datetime", "1994-03-04T00:00:00Z"))
        self.add(ns, "score", alice, value_posting("float", 1.5))
        self.add(ns, "active", alice, value_posting("bool", True))
        self.add(ns, "bio", alice, value_posting("string", 'Says "hi" <b>&</b>\nline two\tтаб ✓'))
        self.add(ns, "friend", alice, edge(bob, [("since", "datetime", "2006-01-02T15:04:05Z"),
                                                 ("close", "bool", True)]))
        self.add(ns, "friend", alice, edge(carol, [("weight", "float", 0.25), ("note", "string", 'met at "work"')]))
        self.add(ns, "name", bob, value_posting("string", "Bob"))
        self.add(ns, "age", bob, value_posting("int", 25))
        self.add(ns, "score", bob, value_posting("float", 12345678.0))
        self.add(ns, "active", bob, value_posting("bool", False))
        self.add(ns, "friend", bob, edge(alice, [("since", "datetime", "2010-05-06T07:08:09Z"), ("rank", "int", 2)]))
        self.add(ns, "name", carol, value_posting("string", "Zoë O'Brien"))
        self.add(ns, "name", carol, value_posting("string", "Zoé", lang="fr"))
        self.add(ns, "age", carol, value_posting("int", 41))
        for i in range(extra_people):
            uid = new_uid()
            self.add(ns, "dgraph.type", uid, value_posting("string", "Person"))
            self.add(ns, "name", uid, value_posting("string", f"Person {i:06d}"))
            self.add(ns, "age", uid, value_posting("int", 18 + i % 70))
            noise = hashlib.sha256(f"bio-{i}".encode()).hexdigest() * 4
            self.add(ns, "bio", uid, value_posting("string", noise))
            self.add(ns, "friend", uid, edge(alice, [("since", "datetime", "2020-01-01T00:00:00Z")]))


def key_order(ns: int, pred: str) -> tuple:
    """Badger key order: namespace, then the 2-byte predicate length, then the predicate bytes."""
    raw = pred.encode()
    return (ns, len(raw), raw)


def group_of(pred: str, groups: int, user_preds: list) -> int:
    """Which Alpha group serves the predicate's tablet: dgraph.* in group 1, others spread."""
    if groups <= 1 or pred.startswith("dgraph."):
        return 1
    return (user_preds.index(pred) + 1) % groups + 1


RDF_TYPES = {"string": "xs:string", "datetime": "xs:dateTime", "int": "xs:int", "float": "xs:float",
             "bool": "xs:boolean", "password": "xs:password"}
SKIPPED_PREDICATES = {"dgraph.graphql.xid", "dgraph.drop.op", "dgraph.graphql.p_query", "dgraph.cors",
                      "dgraph.graphql.schema_created_at", "dgraph.graphql.schema_history",
                      "dgraph.graphql.p_sha256hash"}


def value_text(kind: str, value) -> str:
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float":
        return go_format_float_g(float(value))
    return str(value)


def is_number(kind: str) -> bool:
    return kind in ("int", "float")


def posting_sort_key(p: Posting):
    # Value postings: lang values are keyed by a fingerprint of the tag, the untagged value by
    # MaxUint64, so tagged values come first; edges are sorted by target uid.
    if p.type == "uid":
        return (p.value, "")
    return (UINT64_MAX, "") if p.lang is None else (0, p.lang)


def to_rdf(ns: int, pred: str, uid: int, postings: list) -> str:
    out = []
    for p in postings:
        line = f"<{uid:#x}> <{pred}> "
        if p.type == "uid":
            line += f"<{p.value:#x}>"
        else:
            line += go_json_string(value_text(p.type, p.value))
            if p.lang is not None:
                line += "@" + p.lang
            elif p.type != "default":
                line += f"^^<{RDF_TYPES[p.type]}>"
        line += f" <{ns:#x}>"
        if p.facets:
            parts = []
            for key, kind, value in p.facets:
                text = value_text(kind, value)
                parts.append(f"{key}={go_json_string(text) if kind == 'string' else text}")
            line += " (" + ",".join(parts) + ")"
        out.append(line + " .\n")
    return "".join(out)


def to_json(ns: int, pred: str, uid: int, postings: list) -> str:
    start = f'  {{"uid":"{uid:#x}","namespace":"0x{ns:x}"'
    objects = []
    for p in postings:
        text = start
        facets = "".join(
            f',"{pred}|{key}":' + (value_text(kind, value) if is_number(kind)
                                   else go_json_string(value_text(kind, value)))
            for key, kind, value in p.facets)
        if p.type == "uid":
            text += f',"{pred}":[{{"uid":"{p.value:#x}"{facets}}}]'
        else:
            text += f',"{pred}@{p.lang}":' if p.lang is not None else f',"{pred}":'
            raw = value_text(p.type, p.value)
            text += raw if is_number(p.type) else go_json_string(raw)
            text += facets
        objects.append(text + "}")
    return ",\n".join(objects)


def type_block(ns: int, name: str, fields: list) -> str:
    lines = [f"[{ns:#x}] type <{name}> {{\n"]
    for f in fields:
        lines.append(f"\t<{f}>\n" if f.startswith("~") else f"\t{f}\n")
    return "".join(lines) + "}\n"


def build_export_files(dataset: Dataset, fmt: str, namespace: int, groups: int) -> dict:
    """Return {file name: gzip bytes} for every group, as Dgraph's exportInternal writes them."""
    namespaces = dataset.namespaces if namespace == -1 else [namespace]
    user_preds = sorted(USER_SCHEMA, key=lambda p: key_order(0, p))
    keys = sorted((k for k in dataset.lists if k[0] in namespaces),
                  key=lambda k: key_order(k[0], k[1]) + (k[2],))
    files = {}
    for gid in range(1, groups + 1):
        data_kvs, gql_kvs = [], []
        for ns, pred, uid in keys:
            if group_of(pred, groups, user_preds) != gid:
                continue
            postings = sorted(dataset.lists[(ns, pred, uid)], key=posting_sort_key)
            if pred in SKIPPED_PREDICATES:
                continue
            if pred == "dgraph.graphql.schema":
                gql_kvs.append("{" + f'"Namespace":{ns},"Schema":{go_json_string(postings[0].value)}' + "}")
                continue
            if pred == "dgraph.type" and len(postings) == 1 and postings[0].value == "dgraph.graphql":
                continue
            data_kvs.append(to_json(ns, pred, uid, postings) if fmt == "json" else to_rdf(ns, pred, uid, postings))
        if fmt == "json":
            data = "[\n" + ",\n".join(data_kvs) + "\n]\n"
        else:
            data = "".join(data_kvs)
        gql = "[\n" + ",\n".join(gql_kvs) + "\n]\n"
        schema_parts = []
        for ns in namespaces:
            for pred in sorted(dataset.schema.get(ns, {}), key=lambda p: key_order(ns, p)):
                if group_of(pred, groups, user_preds) == gid:
                    schema_parts.append((key_order(ns, pred), dataset.schema[ns][pred].line(ns, pred)))
        schema_text = "".join(text for _, text in sorted(schema_parts))
        type_parts = []
        for ns in namespaces:
            for name, fields in dataset.types.get(ns, []):
                type_parts.append((key_order(ns, name), type_block(ns, name, fields)))
        schema_text += "".join(text for _, text in sorted(type_parts))
        files[f"g{gid:02d}.{fmt}.gz"] = gzip_bytes(data.encode())
        files[f"g{gid:02d}.schema.gz"] = gzip_bytes(schema_text.encode())
        files[f"g{gid:02d}.gql_schema.gz"] = gzip_bytes(gql.encode())
    return files


# ----- GraphQL "parsing" (field names and argument lists only) -----------------------------
ARG_RE = re.compile(r'(\w+)\s*:\s*(\$\w+|"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null|\w+)')


def selection_text(query: str) -> str:
    """The query without its operation header (``mutation login($userId: String) ...``)."""
    at = query.find("{")
    return query[at:] if at >= 0 else query


def find_field(query: str, name: str) -> re.Match | None:
    return re.search(r"(?<![\w$])" + re.escape(name) + r"(?!\w)\s*(\(|\{)?", selection_text(query))


def field_args(query: str, name: str, variables: dict) -> dict:
    """Arguments of the field, with ``$var`` resolved; absent variables are left out."""
    body = selection_text(query)
    match = find_field(query, name)
    if not match or match.group(1) != "(":
        return {}
    depth, i, in_string = 0, match.end() - 1, False
    start = i + 1
    while i < len(body):
        ch = body[i]
        if in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    args = {}
    for arg_name, raw in ARG_RE.findall(body[start:i]):
        if raw.startswith("$"):
            if raw[1:] in variables:
                args[arg_name] = variables[raw[1:]]
        elif raw.startswith('"'):
            args[arg_name] = json.loads(raw)
        elif raw in ("true", "false", "null"):
            args[arg_name] = {"true": True, "false": False, "null": None}[raw]
        elif re.fullmatch(r"-?\d+", raw):
            args[arg_name] = int(raw)
        elif re.fullmatch(r"-?[\d.eE+-]+", raw):
            args[arg_name] = float(raw)
        else:
            args[arg_name] = raw   # an enum literal
    return args


def detect_op(query: str) -> str | None:
    for name in ("listBackups", "restoreStatus"):
        if find_field(query, name):
            return name
    if find_field(query, "restore"):
        return "restore"
    if find_field(query, "exportStatus"):
        return "exportStatus"
    export = find_field(query, "export")
    if export:
        legacy = export.group(1) != "(" and "signedUrls" in query and "exportId" not in query \
            and "taskId" not in query
        return "legacy_export" if legacy else "export"
    if find_field(query, "login"):
        return "login"
    if find_field(query, "deployments"):
        return "deployments"
    return None


def int_arg(args: dict, name: str):
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise GqlError(f'Variable "${name}" got invalid value {json.dumps(value)}; '
                       f"Int cannot represent non-integer value: {json.dumps(value)}")
    return value


def str_arg(args: dict, name: str, required: bool = False):
    value = args.get(name)
    if value is None:
        if required:
            raise GqlError(f'Variable "${name}" of required type "String!" was not provided.')
        return None
    if not isinstance(value, str):
        raise GqlError(f'Variable "${name}" got invalid value {json.dumps(value)}; '
                       f"String cannot represent a non string value: {json.dumps(value)}")
    return value


# ----- emulator state ------------------------------------------------------------------------
@dataclass
class Token:
    kind: str           # access | refresh
    user: str
    namespace: int
    deadline: float     # time.monotonic()
    seq: int


@dataclass
class Export:
    backend: str
    export_id: str
    task_id: str
    format: str
    namespace: int      # -1 = all namespaces
    read_ts: int
    folder: str
    sequence: list
    files: dict         # name -> gzip bytes (empty when the export is fated to fail)
    created: float
    last_updated: float
    polls: int = 0
    status: str = "Queued"
    urls: list = field(default_factory=list)   # the signed URLs issued by the latest poll

    def summary(self) -> dict:
        return {"backend": self.backend, "exportId": self.export_id, "taskId": self.task_id,
                "format": self.format, "namespace": self.namespace, "status": self.status,
                "polls": self.polls, "folder": self.folder, "readTs": self.read_ts,
                "sequence": self.sequence, "signedUrls": self.urls,
                "files": [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                          for n, b in self.files.items()]}


class Backend:
    def __init__(self, name: str, admin_key: str, url_path: str):
        self.name = name
        self.admin_key = admin_key
        self.url_path = url_path          # "" for the default backend, "/backends/<name>" otherwise
        self.uid = f"{secrets.randbits(24) | 1 << 23:#x}"
        self.owner = str(uuid.uuid4())
        self.jwt_secret = secrets.token_bytes(32)
        self.reset()

    def reset(self):
        self.exports: dict[str, Export] = {}
        self.tokens: dict[str, Token] = {}
        self.read_ts = 10000 + secrets.randbelow(10000)
        self.people: int | None = None    # the dataset a restore put back (None: the extra_people switch)
        self.series: list[list[dict]] = []  # Dgraph's own backups: series of {type, backupNum, folder, timestamp}
        self.restores: dict[int, dict] = {}


@dataclass
class Restore:
    restore_id: int
    target: str         # the backend restored into
    source_uid: str
    folder: str
    num: int
    people: int         # the dataset of the backup restored
    sequence: list
    errors: list
    polls: int = 0
    status: str = "InProgress"

    def summary(self) -> dict:
        return {"restoreId": self.restore_id, "backend": self.target, "uid": self.source_uid,
                "backupFolder": self.folder, "backupNum": self.num, "status": self.status, "polls": self.polls}


class Emulator:
    def __init__(self, args, defaults: dict):
        self.args = args
        self.defaults = defaults
        self.lock = threading.RLock()
        self.backends: dict[str, Backend] = {DEFAULT_BACKEND: Backend(DEFAULT_BACKEND, args.admin_key, "")}
        for name in args.deployments:
            key = make_jwt({"deployment": name, "iat": int(time.time()), "nonce": secrets.token_hex(8)},
                           secrets.token_bytes(32))
            self.backends[name] = Backend(name, key, f"/backends/{name}")
        self.cerebro_secret = secrets.token_bytes(32)
        self._reset_state()

    def _reset_state(self):
        self.switches = copy.deepcopy(self.defaults)
        for backend in self.backends.values():
            backend.reset()
        self.presigner = Presigner(region="us-east-1")
        self.cerebro_tokens: dict[str, float] = {}
        self.requests = deque(maxlen=REQUEST_LOG_SIZE)
        self.downloads = 0
        self.token_seq = 0
        self.revoked_upto = 0            # access tokens with seq <= this are revoked
        self.cerebro_revoked_at = -math.inf
        self.faults_injected: list = []
        self.restore_seq = 0

    # ----- control -------------------------------------------------------------------------
    def reset(self) -> dict:
        with self.lock:
            self._reset_state()
            LoginOrigin.clear()
            return {"switches": self.switches}

    def update_switches(self, changes) -> tuple[int, dict]:
        if not isinstance(changes, dict):
            return 400, {"error": "control body must be a JSON object"}
        unknown = sorted(set(changes) - set(self.defaults))
        if unknown:
            return 400, {"error": f"unknown switch(es): {', '.join(unknown)}"}
        problem = validate_switches(changes)
        if problem:
            return 400, {"error": problem}
        if "faults" in changes:
            faults, problem = faults_problem(changes["faults"], FAULT_STEPS, PROVIDER_ERRORS)
            if problem:
                return 400, {"error": problem}
            changes = {**changes, "faults": faults}
        with self.lock:
            changes = copy.deepcopy(changes)
            changes, _ = ttl_switch_changes(changes)
            if changes.pop("expire_tokens_now", False):
                self.revoked_upto = self.token_seq
            if changes.pop("expire_cerebro_tokens_now", False):
                self.cerebro_tokens.clear()
            self.switches.update(changes)
            return 200, {"switches": self.switches}

    def state(self) -> dict:
        with self.lock:
            ordered = sorted((e for b in self.backends.values() for e in b.exports.values()),
                             key=lambda e: e.created)
            exports = [e.summary() for e in ordered]
            return {"switches": self.switches, "exports": exports, "requests": log_snapshot(self.requests),
                    "downloads": self.downloads,
                    "faults_injected": [dict(f) for f in self.faults_injected],
                    "login_requests": LoginOrigin.snapshot(),
                    "backends": [{"name": b.name, "adminKey": b.admin_key, "url_path": b.url_path, "uid": b.uid,
                                  "deploymentType": self.deployment_type(b), "people": self.people_of(b),
                                  "backups": copy.deepcopy(b.series)}
                                 for b in self.backends.values()],
                    "restores": [r.summary() for b in self.backends.values() for r in b.restores.values()]}

    # ----- the dataset and Dgraph's own backups (dedicated backends) ----------------------------------
    def deployment_type(self, backend: Backend) -> str:
        return "shared" if backend.name in (self.switches.get("non_dedicated_backends") or []) else "dedicated"

    def people_of(self, backend: Backend) -> int:
        """The backend's dataset: the built-in one plus this many extra people."""
        if backend.people is not None:
            return backend.people
        return int(self.switches.get("extra_people") or 0)

    def take_backup(self, changes) -> tuple[int, dict]:
        """``POST /__control/backup {"backend", "type", "timestamp"}``: Dgraph takes a backup of the
        backend's dataset as it is now: ``full`` starts a series, ``incremental`` (the default once a
        series exists) adds to the newest one."""
        if not isinstance(changes, dict):
            return 400, {"error": "backup body must be a JSON object"}
        with self.lock:
            backend = self.backends.get(changes.get("backend") or DEFAULT_BACKEND)
            if backend is None:
                return 404, {"error": "no such backend"}
            kind = changes.get("type") or ("incremental" if backend.series else "full")
            if kind not in ("full", "incremental") or (kind == "incremental" and not backend.series):
                return 400, {"error": "type must be full or incremental (after a full one)"}
            stamp = changes.get("timestamp") or time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime())
            if not isinstance(stamp, str):
                return 400, {"error": "timestamp must be a string"}
            if kind == "full":
                folder = f"{time.strftime('%Y', time.gmtime())}-{len(backend.series) + 1:02d}"
                backend.series.append([])
            else:
                folder = backend.series[-1][0]["folder"]
            entry = {"type": kind, "backupNum": len(backend.series[-1]) + 1, "folder": folder, "timestamp": stamp,
                     "people": self.people_of(backend)}
            backend.series[-1].append(entry)
            return 200, dict(entry)

    def set_data(self, changes) -> tuple[int, dict]:
        """``POST /__control/data {"backend", "extra_people"}``: change one backend's data."""
        if not isinstance(changes, dict) or not isinstance(changes.get("extra_people"), int) \
                or isinstance(changes.get("extra_people"), bool) or changes["extra_people"] < 0:
            return 400, {"error": "data body must be {\"backend\": name, \"extra_people\": n >= 0}"}
        with self.lock:
            backend = self.backends.get(changes.get("backend") or DEFAULT_BACKEND)
            if backend is None:
                return 404, {"error": "no such backend"}
            backend.people = changes["extra_people"]
            return 200, {"backend": backend.name, "people": backend.people}

    def dedicated_only(self, backend: Backend, name: str) -> Reply | None:
        if self.deployment_type(backend) == "dedicated":
            return None
        message = NON_DEDICATED_MESSAGE
        if name == "restoreStatus":
            return gql_errors(message, data={name: None}, op=name)
        return json_reply({"data": {name: {"response": None, "errors": [{"message": message}]}}}, op=name)

    def list_backups(self, backend: Backend) -> Reply:
        with self.lock:
            response = [[{k: v for k, v in b.items() if k != "people"} for b in series] for series in backend.series]
        return json_reply({"data": {"listBackups": {"response": response, "errors": []}}}, op="listBackups")

    def start_restore(self, backend: Backend, args: dict) -> Reply:
        uid = str_arg(args, "uid", required=True)
        folder = str_arg(args, "backupFolder") or ""
        num = int_arg(args, "backupNum") or 0

        def refused(message):
            return json_reply({"data": {"restore": {"response": None, "errors": [{"message": message}]}}},
                              op="restore")

        with self.lock:
            source = next((b for b in self.backends.values() if b.uid == uid), None)
            if source is None:
                return refused(f"no deployment with uid {uid}")
            backups = [b for series in source.series for b in series]
            if not backups:
                return refused(f"deployment {uid} has no backups")
            if folder == "" and num == 0:
                chosen = backups[-1]
            else:
                chosen = next((b for b in backups if b["folder"] == folder and b["backupNum"] == num), None)
                if chosen is None:
                    return refused(f"backup {folder} #{num} of deployment {uid} not found")
            self.restore_seq += 1
            restore = Restore(self.restore_seq, backend.name, uid, chosen["folder"], chosen["backupNum"],
                              chosen["people"], [str(s) for s in self.switches["restore_status_sequence"]],
                              [str(e) for e in self.switches.get("restore_errors") or []])
            backend.restores[restore.restore_id] = restore
        return json_reply({"data": {"restore": {"errors": None, "response": {
            "code": "Success", "message": "Restore operation started.", "restoreId": restore.restore_id}}}},
            op="restore")

    def restore_status(self, backend: Backend, args: dict) -> Reply:
        restore_id = int_arg(args, "restoreId")
        with self.lock:
            restore = backend.restores.get(restore_id)
            if restore is None:
                return json_reply({"data": {"restoreStatus": {"response": {
                    "status": "UNKNOWN", "errors": [f"no restore with id {restore_id}"]}}}}, op="restoreStatus")
            restore.polls += 1
            status = restore.sequence[min(restore.polls, len(restore.sequence)) - 1]
            errors = []
            if status == "OK" and restore.errors:
                status, errors = "ERR", list(restore.errors)
            elif status == "OK" and restore.status != "OK":
                backend.people = restore.people   # the backend's data is now the backup's
            restore.status = status
        return json_reply({"data": {"restoreStatus": {"response": {"status": status, "errors": errors}}}},
                          op="restoreStatus")

    def find_export(self, task_id: str) -> Export | None:
        for backend in self.backends.values():
            if task_id in backend.exports:
                return backend.exports[task_id]
        return None

    def take_fault(self, step: str | None) -> dict | None:
        with self.lock:
            return take_fault(self.switches, step, self.faults_injected)

    @staticmethod
    def step_of(slash: bool, body: bytes) -> str | None:
        """The provider step of a backend GraphQL call: ``login``, ``export`` or ``status``."""
        try:
            request = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            return None
        query = request.get("query") if isinstance(request, dict) else None
        op = detect_op(query) if isinstance(query, str) else None
        if op == "login" and not slash:
            return "login"
        if op in ("export", "legacy_export") and slash:
            return "export"
        if op == "exportStatus" and slash:
            return "status"
        if op == "restore" and slash:
            return "restore"
        return None

    def record(self, method: str, path: str, status: int, op: str | None, step: str | None = None) -> dict:
        entry = {"method": method, "path": path, "status": status, "op": op, "t": time.time(), "step": step}
        with self.lock:
            self.requests.append(entry)
        return entry

    # ----- injected faults ---------------------------------------------------------------------
    def pop_fault(self, slash: bool) -> Reply | None:
        with self.lock:
            queue = self.switches.get("fail_next") or []
            if queue:
                spec = {"status": 503, "retry_after": None, "body": None, **queue.pop(0)}
                status = int(spec["status"])
                headers = []
                if spec["retry_after"] is not None:
                    headers.append(("Retry-After", str(spec["retry_after"])))
                if spec["body"] is not None:
                    body = str(spec["body"]).encode()
                    ctype = "application/json" if looks_like_json(body) else "text/html"
                else:
                    reason = {429: "Too Many Requests", 502: "Bad Gateway", 503: "Service Unavailable",
                              504: "Gateway Timeout"}.get(status, "Error")
                    body = f"<html><body><h1>{status} {reason}</h1></body></html>\n".encode()
                    ctype = "text/html"
                return Reply(status, body, ctype, headers, "fail_next")
            if int(self.switches.get("malformed_next") or 0) > 0:
                self.switches["malformed_next"] = int(self.switches["malformed_next"]) - 1
                return Reply(200, MALFORMED_BODY, "text/html", [], "malformed_next")
            errors = self.switches.get("graphql_error_next") or []
            if slash and errors:
                return gql_errors(str(errors.pop(0)), op="graphql_error_next")
        return None

    # ----- backend GraphQL ---------------------------------------------------------------------
    def backend_graphql(self, backend: Backend, slash: bool, headers, body: bytes, host: str,
                        injected: dict | None = None) -> Reply:
        fault = self.pop_fault(slash)
        if fault is not None:
            return fault
        key = headers.get("X-Auth-Token") or headers.get("Dg-Auth")
        if not key or not hmac.compare_digest(key.encode(), backend.admin_key.encode()):
            return gql_errors("Invalid X-Auth-Token", status=int(self.switches.get("auth_error_status") or 200),
                              op="auth")
        try:
            request = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return gql_errors(f"Not a valid GraphQL request body: {exc}", status=400)
        if not isinstance(request, dict) or not isinstance(request.get("query"), str):
            return gql_errors("Not a valid GraphQL request body: no query string", status=400)
        query = request["query"]
        variables = request.get("variables") or {}
        if not isinstance(variables, dict):
            return gql_errors("Not a valid GraphQL request body: variables must be an object", status=400)
        op = detect_op(query)
        if injected is not None and injected["fault"] == "provider_error" and injected["step"] in ("login", "export"):
            name = "login" if injected["step"] == "login" else "export"
            return gql_errors(injected["message"], data={name: None}, op="provider_error")
        try:
            if not slash:
                if op == "login":
                    return self.login(backend, field_args(query, "login", variables))
                if op in ("export", "legacy_export"):
                    # Core's /admin export takes `input: ExportInput!`, not Cloud's top-level args.
                    raise GqlError('Unknown argument "format" on field "export" of type "Mutation". '
                                   "(use /admin/slash for Cloud exports)")
                raise GqlError(f"Cannot query field \"{op or '?'}\" on /admin in this emulator.")
            if op == "login":
                raise GqlError('Cannot query field "login" on type "Mutation".')
            if op not in ("export", "legacy_export", "exportStatus", "listBackups", "restore", "restoreStatus"):
                raise GqlError(f"Cannot query field \"{op or '?'}\" on /admin/slash in this emulator.")
            caller_ns = self.check_access_token(backend, headers, op)
            if op in ("listBackups", "restore", "restoreStatus"):
                refused = self.dedicated_only(backend, op)
                if refused is not None:
                    return refused
                if op == "listBackups":
                    return self.list_backups(backend)
                if op == "restore":
                    return self.start_restore(backend, field_args(query, "restore", variables))
                return self.restore_status(backend, field_args(query, "restoreStatus", variables))
            if op == "exportStatus":
                return self.export_status(backend, field_args(query, "exportStatus", variables), host, injected)
            return self.start_export(backend, field_args(query, "export", variables), caller_ns, host,
                                     legacy=(op == "legacy_export"))
        except GqlError as exc:
            name = exc.field_name or (op if op in ("login", "export", "exportStatus", "listBackups", "restore",
                                                   "restoreStatus") else None)
            if name == "legacy_export":
                name = "export"
            data = {name: None} if name else None
            return gql_errors(exc.message, data=data, status=exc.status, op=op)

    # ----- ACL ------------------------------------------------------------------------------------
    def issue(self, backend: Backend, kind: str, user: str, ns: int, ttl: float) -> str:
        self.token_seq += 1
        now_wall = time.time()
        claims = {"exp": int(now_wall + ttl), "namespace": ns, "userid": user}
        if kind == "access":
            claims["groups"] = ["guardians"]
        claims = dict(sorted(claims.items()))
        token = make_jwt(claims, backend.jwt_secret)
        if token in backend.tokens:   # same second, same claims: keep tokens distinct
            claims["jti"] = secrets.token_hex(4)
            token = make_jwt(claims, backend.jwt_secret)
        backend.tokens[token] = Token(kind, user, ns, time.monotonic() + ttl, self.token_seq)
        return token

    def login(self, backend: Backend, args: dict) -> Reply:
        if not self.args.acl:
            raise GqlError("ACL is disabled on this backend (start the emulator with --acl)", "login")
        with self.lock:
            refresh = args.get("refreshToken")
            if refresh:
                token = backend.tokens.get(refresh) if isinstance(refresh, str) else None
                if token is None or token.kind != "refresh" or time.monotonic() > token.deadline:
                    raise GqlError("invalid refresh token", "login")
                user, ns = token.user, token.namespace
            else:
                user, password = args.get("userId"), args.get("password")
                ns = args.get("namespace")
                ns = 0 if ns is None else ns
                ok = (isinstance(user, str) and isinstance(password, str) and user == self.args.user_id
                      and hmac.compare_digest(password.encode(), self.args.password.encode())
                      and isinstance(ns, int) and not isinstance(ns, bool) and ns in KNOWN_NAMESPACES_ACL)
                if not ok:
                    raise GqlError("invalid username or password", "login")
            access = self.issue(backend, "access", user, ns, float(self.switches["access_ttl"]))
            refresh_jwt = self.issue(backend, "refresh", user, ns, float(self.switches["refresh_ttl"]))
        return json_reply({"data": {"login": {"response": {"accessJWT": access, "refreshJWT": refresh_jwt}}}},
                          op="login")

    def check_access_token(self, backend: Backend, headers, op: str) -> int:
        """Return the caller's namespace (0 = Galaxy without ACL)."""
        if not self.args.acl:
            return 0
        name = "export" if op == "legacy_export" else op
        raw = headers.get("X-Dgraph-AccessToken")
        if not raw:
            raise GqlError("no accessJwt available", name)
        with self.lock:
            token = backend.tokens.get(raw)
            if token is None or token.kind != "access":
                raise GqlError("unable to parse jwt token:token signature is invalid", name)
            if time.monotonic() > token.deadline or token.seq <= self.revoked_upto:
                raise GqlError("Token is expired", name)
            return token.namespace

    # ----- export ---------------------------------------------------------------------------------
    def start_export(self, backend: Backend, args: dict, caller_ns: int, host: str, legacy: bool) -> Reply:
        fmt = str_arg(args, "format")
        fmt = "json" if fmt is None or fmt == "" else fmt
        if fmt.lower() not in ("json", "rdf"):
            raise GqlError(f"invalid export format: {fmt}", "export")
        fmt = fmt.lower()
        requested = int_arg(args, "namespace")
        if requested is None:
            namespace = caller_ns
        elif caller_ns == 0:
            namespace = -1 if requested < 0 else requested
        elif requested < 0:
            raise GqlError("Only guardian of galaxy can export all namespaces", "export")
        elif requested != caller_ns:
            raise GqlError(f"not allowed to export namespace {requested:#x}", "export")
        else:
            namespace = requested
        with self.lock:
            sequence = [str(s) for s in self.switches["status_sequence"]]
            if backend.name in (self.switches.get("failing_backends") or []):
                sequence = [s for s in sequence if s not in ("Success", "Failed")] + ["Failed"]
            if legacy:
                sequence = ["Success"]
            extra = self.people_of(backend)
            backend.read_ts += 3 + secrets.randbelow(20)
            read_ts = backend.read_ts
        now = time.time()
        files = {}
        if "Success" in sequence:
            files = build_export_files(Dataset(self.args.acl, extra), fmt, namespace, self.args.groups)
            # exportStatus signs a URL for every object of the export's folder, named by its key
            # ("Export data", https://dgraph.io/docs/cloud/admin/import-export/): a file the
            # folder also holds comes back under its own name, whatever that is.
            for name, text in (self.switches.get("extra_export_files") or {}).items():
                files[name] = gzip_bytes(text.encode())
        task_id = f"{secrets.randbits(36) | 1 << 35:#x}"
        export_id = (f"exports/{time.strftime('%Y-%m-%d', time.gmtime(now))}/"
                     f"{secrets.randbits(28) | 1 << 24:#x}-{100000000 + secrets.randbelow(900000000)}")
        folder = f"dgraph.r{read_ts}.u{time.strftime('%m%d.%H%M', time.gmtime(now))}"
        export = Export(backend.name, export_id, task_id, fmt, namespace, read_ts, folder, sequence,
                        files, now, now)
        with self.lock:
            backend.exports[task_id] = export
            if legacy:
                self._advance(export, host)
                return json_reply({"data": {"export": {"signedUrls": list(export.urls)}}}, op="legacy_export")
        response = {"code": "Success", "message": f"Export queued with ID {task_id}"}
        with self.lock:
            form = self.switches["export_answer_form"]
        if form == "docs_example":
            # The answer as Dgraph Cloud's own docs show it ("Export data from Dgraph Cloud",
            # dgraph-io/cloud-docs, and dgraph-docs' cloud pages): `data.export` is the export id
            # as a string, with `response` and `taskID` (capital D) beside it, not inside it.
            return json_reply({"data": {"export": export_id, "response": response, "taskID": task_id}}, op="export")
        if form == "unrecognised":
            # An answer in neither documented form (no task id anywhere): the export was queued
            # all the same, so a client that sends the mutation again starts a second export.
            return json_reply({"data": {"export": {"response": response}}}, op="export")
        if form == "gateway_timeout":
            # The export is queued, but the answer that reaches the client is a gateway's: RFC 9110
            # §15.6.5 (504: the gateway "did not receive a timely response" from the server it
            # forwarded the request to, which may have acted on it all the same) and §9.2.2 (a
            # non-idempotent request such as this POST is not to be retried blindly). A gateway's
            # error page is not Dgraph's GraphQL JSON, and carries no task id.
            page = b"<html><head><title>504 Gateway Time-out</title></head><body><h1>504 Gateway Time-out</h1></body></html>\n"
            return Reply(504, page, "text/html", [], "export")
        return json_reply({"data": {"export": {
            "response": response, "exportId": export_id, "taskId": task_id}}}, op="export")

    def _advance(self, export: Export, host: str):
        export.polls += 1
        status = export.sequence[min(export.polls, len(export.sequence)) - 1]
        if status != export.status or export.polls == 1:
            export.last_updated = time.time()
        export.status = status
        if status == "Success":
            # Every Success poll presigns the files anew (fresh URLs for the same files), so a
            # client can renew a download mid-copy; older URLs stay valid until their own expiry.
            export.urls = self.presigner.issue(export, host, [f"{export.folder}/{name}" for name in export.files],
                                               float(self.switches["signed_url_ttl_s"]),
                                               query=bool(self.switches.get("signed_url_query")))

    def export_status(self, backend: Backend, args: dict, host: str, injected: dict | None = None) -> Reply:
        export_id = str_arg(args, "exportId", required=True)
        task_id = str_arg(args, "taskId", required=True)
        with self.lock:
            export = backend.exports.get(task_id)
            if export is None or export.export_id != export_id:
                result = {"kind": "Unknown", "lastUpdated": rfc3339(time.time()), "signedUrls": [],
                          "status": "Unknown"}
            elif fault_active(self.switches, "status", "stuck", self.faults_injected):
                export.polls += 1
                export.status = "Running"
                result = {"kind": "Export", "lastUpdated": rfc3339(export.last_updated), "signedUrls": [],
                          "status": "Running"}
            else:
                if injected is not None and injected["fault"] == "provider_error":
                    export.sequence = export.sequence[:export.polls] + ["Failed"]
                self._advance(export, host)
                result = {"kind": "Export", "lastUpdated": rfc3339(export.last_updated),
                          "signedUrls": list(export.urls) if export.status == "Success" else [],
                          "status": export.status}
        return json_reply({"data": {"exportStatus": result}}, op="exportStatus")

    # ----- downloads ------------------------------------------------------------------------------
    def open_download(self, token: str, folder: str, name: str, path: str, query: str):
        with self.lock:
            entry = self.presigner.lookup(token)
            export = entry.target if entry is not None else None
            if export is None or export.folder != folder or name not in export.files:
                return xml_error(404, "NoSuchKey", "The specified key does not exist."), None
            refusal = self.presigner.refusal(entry, path, query)
            if refusal is not None:
                return xml_error(*refusal), None
            fail = self.switches.get("download_fail_status")
            if fail:
                return xml_error(int(fail), "InternalError",
                                 "We encountered an internal error. Please try again."), None
            self.downloads += 1
            return None, export.files[name]

    # ----- Cerebro --------------------------------------------------------------------------------
    def cerebro(self, headers, body: bytes, host: str) -> Reply:
        try:
            request = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return gql_errors(f"Not a valid GraphQL request body: {exc}", status=400)
        if not isinstance(request, dict) or not isinstance(request.get("query"), str):
            return gql_errors("Not a valid GraphQL request body: no query string", status=400)
        query, variables = request["query"], request.get("variables") or {}
        op = detect_op(query)
        if op == "login":
            args = field_args(query, "login", variables if isinstance(variables, dict) else {})
            email, password = args.get("email"), args.get("password")
            ok = (isinstance(email, str) and isinstance(password, str)
                  and email.lower() == self.args.cerebro_email.lower()
                  and hmac.compare_digest(password.encode(), (self.args.cerebro_password or "").encode()))
            if not ok:
                return json_reply({"data": {"login": None}}, op="cerebro_login")
            with self.lock:
                ttl = float(self.switches["cerebro_ttl"])
                token = make_jwt({"email": email, "exp": int(time.time() + ttl), "iat": int(time.time()),
                                  "jti": secrets.token_hex(8)}, self.cerebro_secret)
                self.cerebro_tokens[token] = time.monotonic() + ttl
            return json_reply({"data": {"login": {"token": token}}}, op="cerebro_login")
        auth = headers.get("Authorization") or ""
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        with self.lock:
            deadline = self.cerebro_tokens.get(bearer)
            if deadline is None or time.monotonic() > deadline:
                return gql_errors("unauthorized", status=int(self.switches.get("auth_error_status") or 200),
                                  op="cerebro_auth")
        if op == "deployments":
            items = [{"uid": b.uid, "name": b.name, "zone": "us-east-1", "url": f"http://{host}{b.url_path}",
                      "owner": b.owner, "jwtToken": b.admin_key, "deploymentMode": "graphql",
                      "deploymentType": self.deployment_type(b), "lambdaScript": ""}
                     for b in self.backends.values() if b.name != DEFAULT_BACKEND]
            return json_reply({"data": {"deployments": items}}, op="deployments")
        return gql_errors(f"Cannot query field \"{op or '?'}\" on Cerebro in this emulator.")


def looks_like_json(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def validate_switches(changes: dict) -> str | None:
    def is_str_list(value):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if "status_sequence" in changes and (not is_str_list(changes["status_sequence"])
                                         or not changes["status_sequence"]):
        return "status_sequence must be a non-empty list of strings"
    if "fail_next" in changes:
        queue = changes["fail_next"]
        if not isinstance(queue, list) or not all(isinstance(s, dict) for s in queue):
            return "fail_next must be a list of objects"
    if "restore_status_sequence" in changes and (not is_str_list(changes["restore_status_sequence"])
                                                 or not changes["restore_status_sequence"]):
        return "restore_status_sequence must be a non-empty list of strings"
    if "export_answer_form" in changes and changes["export_answer_form"] not in EXPORT_ANSWER_FORMS:
        return f"export_answer_form must be one of {', '.join(EXPORT_ANSWER_FORMS)}"
    extra_files = changes.get("extra_export_files")
    if extra_files is not None and (not isinstance(extra_files, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,100}", k) and isinstance(v, str)
            for k, v in extra_files.items())):
        return "extra_export_files must be an object of file name ([A-Za-z0-9._-]) to text"
    for name in ("graphql_error_next", "failing_backends", "non_dedicated_backends", "restore_errors"):
        if name in changes and not is_str_list(changes[name]):
            return f"{name} must be a list of strings"
    for name in ("malformed_next", "auth_error_status", "extra_people"):
        if name in changes and (not isinstance(changes[name], int) or isinstance(changes[name], bool)
                                or changes[name] < 0):
            return f"{name} must be a non-negative integer"
    for name in ("access_ttl", "refresh_ttl", "cerebro_ttl"):
        if name in changes and (not isinstance(changes[name], (int, float)) or isinstance(changes[name], bool)):
            return f"{name} must be a number of seconds"
    for name in ("expire_tokens_now", "expire_cerebro_tokens_now", "signed_url_query"):
        if name in changes and not isinstance(changes[name], bool):
            return f"{name} must be a boolean"
    _, problem = ttl_switch_changes(changes)
    if problem:
        return problem
    if changes.get("download_fail_status") is not None and not isinstance(changes["download_fail_status"], int):
        return "download_fail_status must be an integer or null"
    for key, value in changes.items():
        problem = range_switch_problem(key, value)
        if problem:
            return problem
    return None


# ----- HTTP ---------------------------------------------------------------------------------------
class Handler(BaseHandler):
    server_version = "dgraph-cloud-emulator"
    emulator: Emulator

    def dispatch(self):
        path = urlsplit(self.path).path
        self.begin_request(path)
        self._op = None
        self._cut = None
        try:
            body = self.read_body()   # always drain it, so keep-alive connections stay in sync
            reply = self.route(path, body)
            if reply is not None:
                self._op = reply.op
                if self._cut is not None:
                    write_cut_reply(self, reply, self._cut.get("truncate_at"),
                                    chunked=self._cut["fault"] == "truncate_chunked")
                else:
                    self.write_reply(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # an emulator bug: make it loud but keep serving
            traceback.print_exc()
            if not self._status:
                self.write_reply(gql_errors("Dgraph emulator internal error", status=500))
        finally:
            self.finish_request()

    def log_request_status(self, status: int) -> None:
        self._entry = self.emulator.record(self.command, self._path, status, self._op, self._step)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = dispatch

    def route(self, path: str, body: bytes) -> Reply | None:
        emu = self.emulator
        if path in ("/admin", "/admin/", "/admin/slash", "/admin/slash/"):
            return self.graphql(emu.backends[DEFAULT_BACKEND], path.rstrip("/") == "/admin/slash", body)
        match = RE_BACKEND.match(path)
        if match:
            backend = emu.backends.get(match.group(1))
            if backend is None or backend.name == DEFAULT_BACKEND:
                return gql_errors(f"no such backend: {match.group(1)}", status=404)
            return self.graphql(backend, match.group(2) == "/admin/slash", body)
        if path.rstrip("/") == "/cerebro/graphql" and emu.args.cerebro_email:
            if self.command != "POST":
                return gql_errors("method not allowed", status=405)
            return emu.cerebro(self.headers, body, self.host())
        if path.startswith("/__signed/"):
            self.mark_download()
            return self.download(path)
        if path.startswith("/__control"):
            return self.control(path, body)
        if path == "/health" and self.command == "GET":
            return json_reply([{"instance": "alpha", "status": "healthy"}])
        return gql_errors("Not found", status=404)

    def graphql(self, backend: Backend, slash: bool, body: bytes) -> Reply | None:
        if self.command != "POST":
            return gql_errors("Invalid request method: only POST is emulated", status=405)
        emu = self.emulator
        self._step = emu.step_of(slash, body)
        fault = emu.take_fault(self._step)

        def gateway_error(status, message, headers):
            reason = GATEWAY_REASONS.get(status, "Error")
            body = f"<html><body><h1>{status} {reason}</h1></body></html>\n".encode()
            return Reply(status, body, "text/html", headers, "fault")

        if answer_fault(self, fault, gateway_error):
            return None
        if fault is not None and fault["fault"] in ("truncate", "truncate_chunked"):
            self._cut = fault
        return emu.backend_graphql(backend, slash, self.headers, body, self.host(), fault)

    def download(self, path: str) -> Reply | None:
        self._step = "download"
        match = RE_SIGNED.match(path)
        if not match or self.command not in ("GET", "HEAD"):
            return xml_error(404, "NoSuchKey", "The specified key does not exist.")
        fault = None
        if self.emulator.presigner.lookup(match.group(1)) is not None:
            fault = self.emulator.take_fault("download")
        if answer_fault(self, fault, s3_error_reply):
            return None
        error, data = self.emulator.open_download(*match.groups(), path, urlsplit(self.path).query)
        if error is not None:
            error.op = "download"
            return error
        token, folder, name = match.groups()
        with self.emulator.lock:
            switches = dict(self.emulator.switches)
        self._op = "download"
        # The object's identity is its export folder and file, not the URL: a renewed URL serves the
        # same object with the same validators.
        identity, extra, cut, chunked = f"{folder}/{name}", [], None, False
        kind = fault["fault"] if fault is not None else None
        if kind == "content_encoding_gzip":
            data, identity, extra = gzip_once_more(data), identity + "+cdn-gzip", [("Content-Encoding", "gzip")]
        elif kind in ("truncate", "truncate_chunked"):
            chunked = kind == "truncate_chunked"
            cut = fault.get("truncate_at")
            if cut is None:
                cut = len(data) // 2
        serve_download(self, data, len(data), identity, "application/octet-stream", switches, extra_headers=extra,
                       truncate_after=cut, chunked=chunked, live_switches=lambda: self.emulator.switches)
        return None

    def control(self, path: str, body: bytes) -> Reply:
        emu = self.emulator
        if path == "/__control/state" and self.command == "GET":
            return json_reply(emu.state())
        if path == "/__control/reset" and self.command == "POST":
            return json_reply(emu.reset())
        if path in ("/__control/backup", "/__control/data") and self.command == "POST":
            try:
                changes = json.loads(body or b"{}")
            except ValueError:
                return json_reply({"error": "control body must be JSON"}, 400)
            act = emu.take_backup if path.endswith("/backup") else emu.set_data
            status, payload = act(changes)
            return json_reply(payload, status)
        if path == "/__control" and self.command == "POST":
            try:
                changes = json.loads(body or b"{}")
            except ValueError:
                return json_reply({"error": "control body must be JSON"}, 400)
            status, payload = emu.update_switches(changes)
            return json_reply(payload, status)
        match = RE_CONTROL_FILE.match(path)
        if match and self.command == "GET":
            with emu.lock:
                export = emu.find_export(match.group(1))
                data = export.files.get(match.group(2)) if export else None
            if data is None:
                return json_reply({"error": "no such export file"}, 404)
            return Reply(200, data, "application/octet-stream")
        return json_reply({"error": "no such control endpoint"}, 404)


# ----- startup ------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description="Dgraph Cloud admin API and Cerebro emulator")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--acl", action="store_true")
    parser.add_argument("--user-id", default="groot")
    parser.add_argument("--password", default="password")
    parser.add_argument("--access-ttl", type=float, default=21600.0)
    parser.add_argument("--url-ttl", type=float, default=172800.0,
                        help="seconds a signed URL stays valid (the signed_url_ttl_s switch's default)")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--cerebro-email")
    parser.add_argument("--cerebro-password")
    parser.add_argument("--deployments", default="")
    args = parser.parse_args(argv)
    args.deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    for name in args.deployments:
        if name == DEFAULT_BACKEND or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            parser.error(f"invalid deployment name {name!r}")
    if len(set(args.deployments)) != len(args.deployments):
        parser.error("duplicate deployment names")
    if args.groups < 1:
        parser.error("--groups must be >= 1")
    if args.cerebro_email and args.cerebro_password is None:
        parser.error("--cerebro-email needs --cerebro-password")
    return args


def default_switches(args) -> dict:
    return {
        "status_sequence": ["Queued", "Running", "Success"],
        "fail_next": [],
        "graphql_error_next": [],
        "malformed_next": 0,
        "signed_url_ttl_s": args.url_ttl,
        "url_ttl": args.url_ttl,          # the older name of signed_url_ttl_s (kept in step with it)
        "access_ttl": args.access_ttl,
        "refresh_ttl": REFRESH_TTL,
        "cerebro_ttl": CEREBRO_TTL,
        "expire_tokens_now": False,
        "expire_cerebro_tokens_now": False,
        "auth_error_status": 200,
        "failing_backends": [],
        "download_fail_status": None,
        "extra_people": 0,
        "non_dedicated_backends": [],
        "restore_status_sequence": ["InProgress", "OK"],
        "restore_errors": [],
        "signed_url_query": True,
        "export_answer_form": "selection",
        "extra_export_files": {},
        "faults": [],
        **RANGE_SWITCHES,
    }


def make_server(argv) -> ThreadingHTTPServer:
    args = parse_args(argv)
    emulator = Emulator(args, default_switches(args))
    return bind_server(Handler, emulator, (args.host, args.port))


def main(argv=None):
    serve_main(make_server, argv)


if __name__ == "__main__":
    main()
