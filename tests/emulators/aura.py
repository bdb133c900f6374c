#!/usr/bin/env python3
"""Local emulator of the Neo4j Aura management API and the Neo4j Query API
(provider-apis.md §3.1–§3.5 and checklist §6.3).

Run::

    python3 tests/emulators/aura.py --port 0 --client-id ID --client-secret SECRET \\
        --instance 2f49c2b3 --db-user neo4j --db-password PW \\
        [--host 127.0.0.1] [--token-ttl 3600] [--nodes 10000 --rels 20000 --seed 1] \\
        [--snapshot-polls 2] [--database neo4j] [--instance-name NAME] [--restore-polls 2]

It prints one line ``READY <port>`` once it listens.  Both APIs share one server; their
paths do not collide (``/oauth/token`` and ``/v1/...`` for management, ``/db/...`` for Cypher).

Management API (``api.neo4j.io``)
---------------------------------
* ``POST /oauth/token`` — Basic ``client_id:client_secret``, form body
  ``grant_type=client_credentials`` → 200 ``{access_token, expires_in, token_type:"bearer"}``.
  Bad/missing credentials → 401, missing body → 404, another grant type → 403, a body that is
  not form-encoded → 400.  The token is a JWT-shaped opaque string.
* Every ``/v1`` call needs ``Authorization: Bearer``: an unknown token → 401, an **expired**
  token → **403** (``{"errors":[...reason:"forbidden"]}`` or ``{"error":"Forbidden"}`` with the
  ``error_variant`` switch).
* ``GET /v1/tenants``, ``GET /v1/tenants/{id}``, ``GET /v1/instances[?tenantId=]``,
  ``GET /v1/instances/{id}`` (unknown → 404 ``reason:"db-not-found"``).
* ``POST /v1/instances/{id}/snapshots`` → **202** ``{data:{snapshot_id}}``;
  ``GET /v1/instances/{id}/snapshots/{sid}`` walks ``Pending → InProgress → Completed`` across
  polls (``snapshot_polls`` polls before ``Completed``) or ends ``Failed`` when ``snapshot_fail``
  was set when the snapshot was created; ``GET /v1/instances/{id}/snapshots[?date=YYYY-MM-DD]``
  lists the snapshots of that UTC day, **today** by default.
* ``POST /v1/instances/{id}/snapshots/{sid}/restore`` → 202, the instance reports
  ``restoring`` for ``restore_polls`` instance GETs and then ``running``; the instance's
  database goes back to its content at snapshot time.  A conflicting operation answers 409
  ``reason:"ongoing-database-operation"`` (message spelled as in Aura: "is current undergoing").
  With ``restore_lag_polls`` > 0 the instance's status lags the POST: that many instance GETs
  still report ``running`` (the restore has not begun), then the snapshot's data goes back and
  the instance reports ``restoring`` for ``restore_polls`` GETs; ``restores_done`` in the state
  counts restores that ended.
* ``POST /v1/instances`` (aura-cli ``instance create``: body ``{version, region, memory, name, type,
  tenant_id, cloud_provider}``) → **202** ``{data:{id, connection_url, username, password,
  tenant_id, cloud_provider, region, type, name}}``; the password is shown only in this answer.
  The instance is ``creating`` for ``create_seconds``, then ``running``; each created instance
  has its own Query API (an HTTP server of its own, the host of its ``connection_url``
  ``neo4j://127.0.0.1:<port>``) with one empty database ``neo4j`` and user ``neo4j``.  Past the
  tenant's ``instance_quota`` (every instance counts until it is gone) the create is refused
  (400 ``reason:"instance-quota-reached"``).  ``create_reply_delay_s`` creates at once but
  answers that many seconds late (a client may be gone by then).
* ``DELETE /v1/instances/{id}`` → **202** ``{data:{…, status:"destroying"}}``; the instance is
  ``destroying`` for ``destroy_seconds``, then gone (404 ``db-not-found``, out of the list).  An
  instance busy with another operation (``creating``, ``restoring``, ``destroying``) answers
  409 ``ongoing-database-operation``.
* There is **no** snapshot export or download endpoint: every other path answers 404.
* A sliding 60 s rate limit over ``/oauth`` and ``/v1`` (``rate_limit``, 125 by default) →
  429 with ``Retry-After``.  Every response carries ``X-Request-Id``.

Query API (``<id>.databases.neo4j.io``)
---------------------------------------
``POST /db/{database}/query/v2`` with Basic auth of the database user and a JSON body
``{"statement", "parameters"?, "bookmarks"?}`` → **202** ``{data:{fields, values}, bookmarks}``.
There is no Cypher engine: the statement is whitespace-normalised and matched against the
fixed set in ``STATEMENTS`` below; anything else is a ``Neo.ClientError.Statement.SyntaxError``
(status 202, or ``query_error_status``).  The ``--database`` database (``neo4j``) is seeded with
a deterministic random graph; any other database name is created empty on first use.
Element ids are ``4:<db uuid>:<n>`` for nodes and ``5:<db uuid>:<n>`` for relationships and
are compared as strings (so ``...:10`` sorts before ``...:9``), exactly as ``ORDER BY id``
does.  ``labels(n)`` lists labels in label-token creation order, not in statement order.
The load statements come in two forms: ``CREATE`` (``scripts/aura_restore.py``) and the
idempotent ``MERGE`` keyed on ``_ferry_id`` (Ferry's restores), with Cypher's MERGE semantics:
a node matches when it has at least the statement's labels and that ``_ferry_id``, a
relationship when it has the type, the two matched endpoints and that ``_ferry_id``; otherwise
it is created; ``SET x += row.props`` then adds the properties (a null removes one).  Rows
are merged in order, so a later row sees what an earlier one made.  ``GET /__control/state``
counts ``merge_matches`` (MERGEs that found their element: a statement sent again).  The
``query_reply_delay_s`` switch runs every statement at once but answers that many seconds late.

Ferry loads through a "unique import label": ``MERGE (n:`_FerryImport` {`_ferry_id`: row.id})
SET n:`L1`:`L2`, n += row.props`` (``SET n:L`` adds labels), relationships between endpoints
matched as ``(a:`_FerryImport` {`_ferry_id`: row.start})``, cleanup by ``MATCH
(n:`_FerryImport`) WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` ...``.  Schema
commands are kept per database: ``CREATE CONSTRAINT name [IF NOT EXISTS] FOR (n:L) REQUIRE
n.p IS UNIQUE``, ``CREATE INDEX name [IF NOT EXISTS] FOR (n:L) ON (n.p)``, ``DROP CONSTRAINT
name [IF EXISTS]``, ``DROP INDEX name [IF EXISTS]``, with Neo4j 5's rules (``IF NOT EXISTS``
makes an existing rule of that name, or an equivalent one, a no-op; without it, an error; a
constraint is refused over data that breaks it, and ``CREATE`` of a node that would break one
fails; ``DROP`` of a missing rule is an error unless ``IF EXISTS``).  Constraints are not
checked when ``SET n:L`` gives a node a constrained label.  Every node lookup by ``_ferry_id``
that no index on one of the looked-up labels serves (an unlabelled endpoint match reads every
node) counts as a scan: ``GET /__control/state`` sums them as ``ferry_scans``, and ``GET
/__control/database?db=<name>`` answers ``{schema: [{name, kind, label, property}],
statements: [<name of each statement run, in order>], scans}`` for one database.

Control API
-----------
``POST /__control`` merges JSON into the switches (unknown switch → 400),
``POST /__control/instances`` ``{"id", "name"}`` adds an instance to the tenant, served like the
``--instance`` ones by this server's Query API (as if created in the console between two runs),
``POST /__control/reset`` restores the defaults, forgets tokens, snapshots, counters and the
request log and puts every database back to its seeded state (non-seeded ones are dropped),
``GET /__control/state`` reports switches and counters (with ``instances_created``,
``instance_deletes`` and ``instances_gone``: instance ids in order), ``GET /__control/graph?db=<name>``
(``&instance=<id>`` for a created instance's database) dumps a database as ``{nodes:[{id,labels,props}], relationships:[{id,type,start,end,props}]}``.

Injected faults (the ``faults`` switch, see ``common.py``): steps ``token`` (``POST /oauth/token``),
``snapshot`` (``POST .../snapshots``, creating one), ``snapshot_status`` (``GET
.../snapshots/{sid}``) and ``query`` (every Query API call).  ``provider_error`` answers, per
step: 401 "Invalid credentials"; 409 ``ongoing-database-operation``; the snapshot turns
``Failed`` (for good); a Query API error ``Neo.ClientError.Security.Forbidden`` (status 202, or
``query_error_status``).  ``stuck`` at ``snapshot_status`` answers ``InProgress`` for as long as
the fault is set.  Every request-log entry has ``t`` (wall clock) and its ``step``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import binascii
import copy
import datetime as dt
import json
import math
import os
import random
import re
import secrets
import sys
import threading
import time
import traceback
import uuid as uuidlib
from collections import deque
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (API_FAULTS, BaseHandler, LoginOrigin, Reply, answer_fault, bind_server,  # noqa: E402
                    fault_active, faults_problem, serve_main, take_fault, write_cut_reply)

REQUEST_LOG_SIZE = 500
STATEMENT_LOG_SIZE = 50000
RATE_WINDOW = 60.0
MALFORMED_BODY = b"<html>502 Bad Gateway</html>"
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

RE_TENANTS = re.compile(r"^/v1/tenants/?$")
RE_TENANT = re.compile(r"^/v1/tenants/([^/]+)/?$")
RE_INSTANCES = re.compile(r"^/v1/instances/?$")
RE_INSTANCE = re.compile(r"^/v1/instances/([^/]+)/?$")
RE_SNAPSHOTS = re.compile(r"^/v1/instances/([^/]+)/snapshots/?$")
RE_SNAPSHOT = re.compile(r"^/v1/instances/([^/]+)/snapshots/([^/]+)/?$")
RE_RESTORE = re.compile(r"^/v1/instances/([^/]+)/snapshots/([^/]+)/restore/?$")
RE_QUERY = re.compile(r"^/db/([^/]+)/query/v2/?$")
RE_INSTANCE_ID = re.compile(r"^[0-9a-f]{8}$")
RE_DB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

CODE_UNAUTHORIZED = "Neo.ClientError.Security.Unauthorized"
CODE_INVALID_FORMAT = "Neo.ClientError.Request.InvalidFormat"
CODE_REQUEST_INVALID = "Neo.ClientError.Request.Invalid"
CODE_SYNTAX = "Neo.ClientError.Statement.SyntaxError"
CODE_PARAM_MISSING = "Neo.ClientError.Statement.ParameterMissing"
CODE_ARGUMENT = "Neo.ClientError.Statement.ArgumentError"
CODE_TYPE = "Neo.ClientError.Statement.TypeError"
CODE_MERGE_NULL = "Neo.ClientError.Statement.SemanticError"
CODE_UNAVAILABLE = "Neo.TransientError.General.DatabaseUnavailable"
CODE_EQUIVALENT_SCHEMA = "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists"
CODE_CONSTRAINT_EXISTS = "Neo.ClientError.Schema.ConstraintAlreadyExists"
CODE_INDEX_EXISTS = "Neo.ClientError.Schema.IndexAlreadyExists"
CODE_CONSTRAINT_CREATION = "Neo.ClientError.Schema.ConstraintCreationFailed"
CODE_CONSTRAINT_VALIDATION = "Neo.ClientError.Schema.ConstraintValidationFailed"
CODE_CONSTRAINT_DROP = "Neo.DatabaseError.Schema.ConstraintDropFailed"
CODE_INDEX_DROP = "Neo.DatabaseError.Schema.IndexDropFailed"
MSG_UNAUTHORIZED = "The client is unauthorized due to authentication failure."

FAIL_NEXT_DEFAULTS = {"status": 503, "retry_after": None, "body": None}
# The provider steps faults can be injected at, and what each takes (common.py, "Injected faults").
FAULT_STEPS = {
    "token": API_FAULTS | {"provider_error"},
    "snapshot": API_FAULTS | {"provider_error"},
    "snapshot_status": API_FAULTS | {"provider_error", "stuck"},
    "query": API_FAULTS | {"provider_error"},
}
PROVIDER_ERRORS = {
    "token": "Invalid credentials",
    "snapshot": "The database is current undergoing an operation: resuming",
    "snapshot_status": "Failed",  # the snapshot's status (it carries no message)
    "query": "Read operations are not allowed for user 'neo4j' with roles [PUBLIC].",
}
CODE_FORBIDDEN = "Neo.ClientError.Security.Forbidden"


# ----- replies ----------------------------------------------------------------------------
def json_reply(status: int, payload, headers=()) -> Reply:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Reply(status, body, "application/json", list(headers))


class ApiError(Exception):
    """A management-API failure, answered as ``{"errors":[{message, reason, field?}]}``."""

    def __init__(self, status: int, message: str, reason: str, headers=(), field_=None, payload=None):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason
        self.headers, self.field, self.payload = list(headers), field_, payload

    def reply(self) -> Reply:
        if self.payload is not None:
            return json_reply(self.status, self.payload, self.headers)
        error = {"message": self.message, "reason": self.reason}
        if self.field:
            error["field"] = self.field
        return json_reply(self.status, {"errors": [error]}, self.headers)


class CypherError(Exception):
    """A Query API failure, answered as ``{"errors":[{code, message}]}``."""

    def __init__(self, code: str, message: str, status: int | None = None, headers=()):
        super().__init__(message)
        self.code, self.message, self.status, self.headers = code, message, status, list(headers)


def cypher_error_reply(status: int, code: str, message: str, headers=()) -> Reply:
    return json_reply(status, {"errors": [{"code": code, "message": message}]}, headers)


def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ----- property values --------------------------------------------------------------------
# Values are kept as Python values: bool, int (64-bit), float (NaN and ±Infinity included), str,
# bytes (Cypher ByteArray), list, dict, and ``Typed`` for the temporal and spatial types, whose
# canonical text is what the Query API writes for them.
@dataclass(frozen=True)
class Typed:
    """A temporal or spatial value: its typed-JSON ``$type`` and its ``_value`` text."""
    type: str
    text: str


# Typed JSON (``Accept``/``Content-Type: application/vnd.neo4j.query``): Query API docs,
# "Result formats" page, section "JSON with type information" (neo4j/docs-query-api
# modules/ROOT/pages/result-formats.adoc; now the "Typed JSON" page), and the server that writes
# it (neo4j/neo4j community/server/.../queryapi/response/format/DefaultResponseModule.java and
# CypherTypes.java): every value is ``{"$type": T, "_value": V}``; Integer and Float values are
# strings (Long.toString / Double.toString, so "NaN", "Infinity" and "-Infinity"), Boolean a
# JSON boolean, Null null, Base64 the bytes in standard base64, temporals their ISO-8601 text,
# a DateTime ``OffsetDateTime`` when its zone is an offset and ``ZonedDateTime`` (offset and
# ``[zone id]``) when it is a named zone, Point its WKT ``SRID=<srid>;POINT (x y)`` or
# ``SRID=<srid>;POINT Z (x y z)``.
TYPED_MIME = "application/vnd.neo4j.query"
TYPED_MIMES = (TYPED_MIME, "application/vnd.neo4j.query.v1.0", "application/vnd.neo4j.query.v1.1")
_FRACTION = r"(?:\.\d{1,9})?"
_LOCAL_TIME = rf"\d{{2}}:\d{{2}}(?::\d{{2}}{_FRACTION})?"
_OFFSET = r"(?:Z|[+-]\d{2}:\d{2}(?::\d{2})?)"
_DATE = r"[+-]?\d{4,9}-\d{2}-\d{2}"
TEMPORAL_PATTERNS = {
    "Date": re.compile(rf"{_DATE}"),                                        # ISO_LOCAL_DATE
    "Time": re.compile(rf"{_LOCAL_TIME}{_OFFSET}"),                          # ISO_OFFSET_TIME
    "LocalTime": re.compile(_LOCAL_TIME),                                    # ISO_LOCAL_TIME
    "LocalDateTime": re.compile(rf"{_DATE}T{_LOCAL_TIME}"),                  # ISO_LOCAL_DATE_TIME
    "OffsetDateTime": re.compile(rf"{_DATE}T{_LOCAL_TIME}{_OFFSET}"),        # ISO_OFFSET_DATE_TIME
    "ZonedDateTime": re.compile(rf"{_DATE}T{_LOCAL_TIME}{_OFFSET}\[[A-Za-z0-9_/+-]+\]"),  # ISO_ZONED_DATE_TIME
    # DurationValue.toString: P[nY][nM][nD][T[nH][nM][n[.f]S]], components may be negative.
    "Duration": re.compile(r"P(?=-?\d)(?:-?\d+Y)?(?:-?\d+M)?(?:-?\d+W)?(?:-?\d+D)?"
                           r"(?:T(?=-?\d)(?:-?\d+H)?(?:-?\d+M)?(?:-?\d+(?:\.\d{1,9})?S)?)?|PT0S"),
}
# Point CRSs (Cypher manual, "Spatial values"): SRID -> dimensions.
POINT_SRIDS = {7203: 2, 9157: 3, 4326: 2, 4979: 3}
# The server's own WKT reader (CypherTypes.WKT_PATTERN).
RE_WKT = re.compile(r"SRID=(\d+);\s*POINT\s*Z?\s*\(\s*(\S+)\s+(\S+)\s*(\S+)?\)")
RE_JAVA_INTEGER = re.compile(r"[+-]?\d+")
RE_JAVA_DOUBLE = re.compile(r"[+-]?(?:NaN|Infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[dDfF]?")


def java_double(x: float) -> str:
    """``Double.toString``: shortest digits, decimal from 1e-3 to 1e7, else ``d.dddE±n``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    digits, exponent = _shortest(abs(x))
    if 1e-3 <= abs(x) < 1e7:
        point = exponent + 1
        if point <= 0:
            return f"{sign}0.{'0' * -point}{digits}"
        whole, frac = digits[:point].ljust(point, "0"), digits[point:] or "0"
        return f"{sign}{whole}.{frac}"
    return f"{sign}{digits[0]}.{digits[1:] or '0'}E{exponent}"


def _shortest(x: float) -> tuple[str, int]:
    mantissa, _, exp = f"{x!r}".partition("e") if "e" in repr(x) else (repr(x), "", "0")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    exponent = int(exp) + len(whole.lstrip("0")) - 1 if whole.strip("0") else int(exp) - (len(frac) - len(frac.lstrip("0"))) - 1
    return digits.rstrip("0") or "0", exponent


def point_text(srid: int, coords: list[float]) -> str:
    """How the server writes a point (CypherTypes.serializePoint)."""
    text = " ".join(java_double(c) for c in coords)
    return f"SRID={srid};POINT{' Z ' if len(coords) == 3 else ' '}({text})"


def bad_typed(path: str, why: str) -> CypherError:
    return CypherError(CODE_REQUEST_INVALID, f"Bad Request: typed JSON parameter {path}: {why}", 400)


def from_typed(value, path: str = "parameters"):
    """A typed-JSON value of a request (``Content-Type: application/vnd.neo4j.query``). Typing is
    all or nothing: a bare JSON value where a ``{"$type", "_value"}`` object is expected is a Bad
    Request, as with the server's typed reader (TypedJsonQueryRequestCypherValuesDeserializer)."""
    if not isinstance(value, dict) or set(value) != {"$type", "_value"}:
        raise bad_typed(path, f"expected {{\"$type\", \"_value\"}}, got {json.dumps(value)[:60]}")
    kind, raw = value["$type"], value["_value"]
    if kind == "Null":
        if raw is not None:
            raise bad_typed(path, "Null takes null")
        return None
    if kind == "Boolean":
        if not isinstance(raw, bool):
            raise bad_typed(path, "Boolean takes true or false")
        return raw
    if kind == "List":
        if not isinstance(raw, list):
            raise bad_typed(path, "List takes an array")
        return [from_typed(item, f"{path}[{i}]") for i, item in enumerate(raw)]
    if kind == "Map":
        if not isinstance(raw, dict):
            raise bad_typed(path, "Map takes an object")
        return {k: from_typed(v, f"{path}.{k}") for k, v in raw.items()}
    if not isinstance(raw, str):
        raise bad_typed(path, f"{kind} takes a string")
    if kind == "Integer":
        if not RE_JAVA_INTEGER.fullmatch(raw) or not INT64_MIN <= int(raw) <= INT64_MAX:
            raise bad_typed(path, f"{raw!r} is not a 64-bit Integer")
        return int(raw)
    if kind == "Float":
        if not RE_JAVA_DOUBLE.fullmatch(raw):
            raise bad_typed(path, f"{raw!r} is not a Float")
        text = raw.rstrip("dDfF")
        return float(text.replace("Infinity", "inf"))
    if kind == "String":
        return raw
    if kind == "Base64":
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise bad_typed(path, "Base64 takes standard base64")
    if kind in TEMPORAL_PATTERNS:
        if not TEMPORAL_PATTERNS[kind].fullmatch(raw):
            raise bad_typed(path, f"{raw!r} is not a {kind}")
        return Typed(kind, raw)
    if kind == "Point":
        m = RE_WKT.fullmatch(raw)
        if not m:
            raise bad_typed(path, f"{raw!r} is not a WKT point")
        srid = int(m.group(1))
        try:
            coords = [float(c) for c in m.groups()[1:] if c]
        except ValueError:
            raise bad_typed(path, f"{raw!r} is not a WKT point")
        if POINT_SRIDS.get(srid) != len(coords):
            raise CypherError(CODE_ARGUMENT, f"Unknown coordinate reference system or dimension: SRID={srid}, "
                              f"{len(coords)} coordinates")
        return Typed("Point", point_text(srid, coords))
    raise bad_typed(path, f"unknown $type {kind!r}")


def to_typed(value):
    """A stored value as the Query API's typed JSON writes it."""
    if value is None:
        return {"$type": "Null", "_value": None}
    if isinstance(value, bool):
        return {"$type": "Boolean", "_value": value}
    if isinstance(value, int):
        return {"$type": "Integer", "_value": str(value)}
    if isinstance(value, float):
        return {"$type": "Float", "_value": java_double(value)}
    if isinstance(value, str):
        return {"$type": "String", "_value": value}
    if isinstance(value, bytes):
        return {"$type": "Base64", "_value": base64.b64encode(value).decode()}
    if isinstance(value, Typed):
        return {"$type": value.type, "_value": value.text}
    if isinstance(value, list):
        return {"$type": "List", "_value": [to_typed(v) for v in value]}
    if isinstance(value, dict):
        return {"$type": "Map", "_value": {k: to_typed(v) for k, v in value.items()}}
    raise AssertionError(type(value))


_PLAIN_AS_IS = (str, int, bool, type(None))


def to_plain(value):
    """A stored value as plain JSON writes it (Query API docs, "Result formats", plain JSON: temporal,
    spatial and binary values are strings; Jackson writes NaN and infinities as strings). Values
    that need nothing are returned as they are (no copy): this runs for every row of a page."""
    kind = type(value)
    if kind in _PLAIN_AS_IS:
        return value
    if kind is float:
        return value if math.isfinite(value) else java_double(value)
    if kind is dict:
        if all(type(v) in _PLAIN_AS_IS for v in value.values()):
            return value
        return {k: to_plain(v) for k, v in value.items()}
    if kind is list:
        if all(type(v) in _PLAIN_AS_IS for v in value):
            return value
        return [to_plain(v) for v in value]
    if kind is bytes:
        return base64.b64encode(value).decode()
    if kind is Typed:
        return value.text
    return value


def _kind(value) -> str:
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, int):
        return "Long"
    if isinstance(value, float):
        return "Double"
    if isinstance(value, str):
        return "String"
    if isinstance(value, bytes):
        return "ByteArray"
    if isinstance(value, Typed):
        return "DateTime" if value.type in ("OffsetDateTime", "ZonedDateTime") else value.type
    if isinstance(value, list):
        return "List"
    if isinstance(value, dict):
        return "Map"
    return "Null" if value is None else type(value).__name__


SCALAR_KINDS = {"Boolean", "Long", "Double", "String", "Date", "Time", "LocalTime", "DateTime", "LocalDateTime",
                "Duration", "Point"}


def storable(value):
    """Validate (and normalise) one non-null property value the way Neo4j does on SET.

    Scalars: boolean, 64-bit integer, float, string, byte array, the temporal types and points.
    Lists: homogeneous, non-null scalars (not byte arrays); integers mixed with floats are widened
    to floats [INF].  Maps, and anything else, are a TypeError (Cypher manual, "Property values").
    """
    kind = _kind(value)
    if kind == "Long" and not INT64_MIN <= value <= INT64_MAX:
        raise CypherError(CODE_ARGUMENT, f"Integer value {value} is out of the 64-bit range")
    if kind in SCALAR_KINDS or kind == "ByteArray":
        return value
    if kind == "List":
        kinds = {_kind(item) for item in value}
        if "Null" in kinds:
            raise CypherError(CODE_TYPE, "Collections containing null values can not be stored in properties.")
        if kinds & {"List", "Map", "ByteArray"}:
            raise CypherError(CODE_TYPE, "Collections containing collections can not be stored in properties."
                              if kinds & {"List", "ByteArray"} else
                              "Property values can only be of primitive types or arrays thereof.")
        for item in value:
            storable(item)
        if kinds == {"Long", "Double"}:
            return [float(item) for item in value]
        if len(kinds) > 1:
            raise CypherError(CODE_TYPE, "Collections containing mixed types can not be stored in properties.")
        return list(value)
    raise CypherError(CODE_TYPE, "Property values can only be of primitive types or arrays thereof. "
                      f"Encountered: {kind}.")


def storable_map(props) -> dict:
    """``SET x = <map>``: null entries are dropped, the rest must be storable."""
    if props is None:
        return {}  # [INF] treated as an empty map
    if not isinstance(props, dict):
        raise CypherError(CODE_TYPE, f"Expected a map but was {_kind(props)}")
    return {key: storable(value) for key, value in props.items() if value is not None}


def add_map(props) -> dict:
    """``SET x += <map>``: null entries stay (they remove the property), the rest must be storable."""
    if props is None:
        return {}
    if not isinstance(props, dict):
        raise CypherError(CODE_TYPE, f"Expected a map but was {_kind(props)}")
    return {key: None if value is None else storable(value) for key, value in props.items()}


def prop_key(value):
    """A hashable key with Cypher equality (1 = 1.0, true <> 1) for the helper-property lookup."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, bytes):
        return ("y", value)
    if isinstance(value, Typed):
        return ("t", value.type, value.text)
    if isinstance(value, list):
        return ("l", tuple(prop_key(item) for item in value))
    return ("x", json.dumps(to_plain(value), sort_keys=True))


def row_get(row, key: str):
    if row is None:
        return None
    if not isinstance(row, dict):
        raise CypherError(CODE_TYPE, f"Type mismatch: expected a map but was {_kind(row)}")
    return row.get(key)


# ----- graph store ------------------------------------------------------------------------
FERRY_KEY = "_ferry_id"  # the helper property of aura_restore.py and of older Ferry loads


class Node:
    __slots__ = ("labels", "props")

    def __init__(self, labels: tuple, props: dict):
        self.labels, self.props = labels, props


class Rel:
    __slots__ = ("type", "start", "end", "props")

    def __init__(self, type_: str, start: str, end: str, props: dict):
        self.type, self.start, self.end, self.props = type_, start, end, props


class Graph:
    """One database.  Element ids are kept in string-sorted lists so ``id > $after`` is a bisect."""

    def __init__(self, name: str, db_uuid: str, seeded: bool = False):
        self.name, self.uuid, self.seeded = name, db_uuid, seeded
        self.nodes: dict[str, Node] = {}
        self.node_ids: list[str] = []
        self.rels: dict[str, Rel] = {}
        self.rel_ids: list[str] = []
        self.next_node = 0
        self.next_rel = 0
        self.label_tokens: dict[str, int] = {}
        # The load's helper property (``_ferry_id`` or another name a statement uses): property
        # name -> value key -> node ids; and -> (type, start, end, value key) -> relationship ids.
        self.ferry: dict[str, dict[tuple, list[str]]] = {}
        self.rel_ferry: dict[str, dict[tuple, list[str]]] = {}
        self.touched = 0  # rows each statement read (an id seek reads one; a scan reads every node)
        # Whether a value plain JSON cannot carry as is (a temporal, a point, bytes, NaN) may be
        # stored: only typed parameters make one, so plain pages of other databases skip the check.
        self.special = False
        self.merge_matches = 0  # MERGEs that found the element (a statement sent again)
        # name -> {"name", "kind": "constraint" (uniqueness) | "index" (range), "label", "property"}
        self.schema: dict[str, dict] = {}
        self.scans = 0  # node lookups by property that no index served (each would scan)
        self.log: deque = deque(maxlen=STATEMENT_LOG_SIZE)  # names of the statements run, in order
        self.dirty = False

    # -- writes --
    def _labels(self, labels) -> tuple:
        for label in labels:
            self.label_tokens.setdefault(label, len(self.label_tokens))
        return tuple(sorted(set(labels), key=self.label_tokens.__getitem__))

    def helper(self, name: str) -> str:
        """Starts keeping a lookup of nodes and relationships by the helper property ``name``."""
        if name not in self.ferry:
            self.ferry[name] = {}
            self.rel_ferry[name] = {}
            for node_id, node in self.nodes.items():
                if name in node.props:
                    self.ferry[name].setdefault(prop_key(node.props[name]), []).append(node_id)
            for rel_id in self.rels:
                self._rel_index(rel_id, (name,))
        return name

    def _index(self, node_id: str, props: dict):
        for name, index in self.ferry.items():
            if name in props:
                index.setdefault(prop_key(props[name]), []).append(node_id)

    def add_nodes(self, items) -> list[str]:
        """items: iterable of (labels, props) with already validated props."""
        new = []
        for labels, props in items:
            node_id = f"4:{self.uuid}:{self.next_node}"
            self.next_node += 1
            self.nodes[node_id] = Node(self._labels(labels), props)
            self._index(node_id, props)
            new.append(node_id)
        if new:
            self.node_ids.extend(new)
            self.node_ids.sort()
            self.dirty = True
        return new

    def add_rels(self, items) -> list[str]:
        """items: iterable of (type, start id, end id, props)."""
        new = []
        for type_, start, end, props in items:
            rel_id = f"5:{self.uuid}:{self.next_rel}"
            self.next_rel += 1
            self.rels[rel_id] = Rel(type_, start, end, props)
            self._rel_index(rel_id)
            new.append(rel_id)
        if new:
            self.rel_ids.extend(new)
            self.rel_ids.sort()
            self.dirty = True
        return new

    def _rel_index(self, rel_id: str, names=None):
        rel = self.rels[rel_id]
        for name in self.rel_ferry if names is None else names:
            if name in rel.props:
                key = (rel.type, rel.start, rel.end, prop_key(rel.props[name]))
                self.rel_ferry[name].setdefault(key, []).append(rel_id)

    def _rel_unindex(self, rel_id: str):
        rel = self.rels[rel_id]
        for name, index in self.rel_ferry.items():
            if name in rel.props:
                key = (rel.type, rel.start, rel.end, prop_key(rel.props[name]))
                ids = [i for i in index.get(key, []) if i != rel_id]
                if ids:
                    index[key] = ids
                else:
                    index.pop(key, None)

    def _node_unindex(self, node_id: str):
        props = self.nodes[node_id].props
        for name, index in self.ferry.items():
            if name in props:
                key = prop_key(props[name])
                ids = [i for i in index.get(key, []) if i != node_id]
                if ids:
                    index[key] = ids
                else:
                    index.pop(key, None)

    def _add_to(self, props: dict, update: dict):
        """``SET x += map``: null entries remove the property, the others are set."""
        for key, value in update.items():
            if value is None:
                props.pop(key, None)
            else:
                props[key] = value

    # -- schema --
    def indexed(self, labels, prop: str = FERRY_KEY) -> bool:
        """Whether a lookup of nodes with these labels by ``prop`` is served by an index (an index or
        a uniqueness constraint's index on one of the labels and that property)."""
        return any(e["label"] in labels and e["property"] == prop for e in self.schema.values())

    def _lookups(self, labels, n: int = 1, prop: str = FERRY_KEY):
        if not self.indexed(labels, prop):
            self.scans += n

    def create_schema(self, kind: str, name: str, label: str, prop: str, if_not_exists: bool) -> None:
        """``CREATE CONSTRAINT name [IF NOT EXISTS] FOR (n:L) REQUIRE n.p IS UNIQUE`` or ``CREATE INDEX
        name [IF NOT EXISTS] FOR (n:L) ON (n.p)``, with Neo4j 5's rules: ``IF NOT EXISTS`` makes a rule
        of the same name or an equivalent one a no-op; without it either is an error; a constraint
        and an index on the same label and property exclude each other (with or without it); a
        constraint is refused when the data already breaks it."""
        wanted = {"name": name, "kind": kind, "label": label, "property": prop}
        same_name = self.schema.get(name)
        same_schema = [e for e in self.schema.values() if (e["label"], e["property"]) == (label, prop)]
        shown = f"(:{label} {{{prop}}})"
        if same_name is not None:
            if if_not_exists:
                return
            if {**same_name, "name": name} == wanted:
                raise CypherError(CODE_EQUIVALENT_SCHEMA, f"An equivalent {kind} already exists, '{name}'.")
            if same_name["kind"] == "constraint":
                raise CypherError(CODE_CONSTRAINT_EXISTS, f"There already exists a constraint called '{name}'.")
            raise CypherError(CODE_INDEX_EXISTS, f"There already exists an index called '{name}'.")
        for other in same_schema:
            if other["kind"] == kind:
                if if_not_exists:
                    return
                raise CypherError(CODE_EQUIVALENT_SCHEMA,
                                  f"An equivalent {kind} already exists, '{other['name']}' on {shown}.")
            if kind == "constraint":
                raise CypherError(CODE_INDEX_EXISTS, f"There already exists an index {shown}. A constraint cannot "
                                  "be created until the index has been dropped.")
            raise CypherError(CODE_CONSTRAINT_EXISTS, f"There is a uniqueness constraint on {shown}, so an index "
                              "is already created that matches this.")
        if kind == "constraint":
            seen: dict = {}
            for node_id in self.node_ids:
                node = self.nodes[node_id]
                if label in node.labels and prop in node.props:
                    other = seen.setdefault(prop_key(node.props[prop]), node_id)
                    if other != node_id:
                        raise CypherError(CODE_CONSTRAINT_CREATION, f"Unable to create Constraint( name='{name}', "
                                          f"type='UNIQUENESS', schema={shown} ): Both Node({other}) and "
                                          f"Node({node_id}) have the label `{label}` and property `{prop}` = "
                                          f"{json.dumps(node.props[prop])}")
        self.schema[name] = wanted
        self.dirty = True

    def drop_schema(self, kind: str, name: str, if_exists: bool) -> None:
        """``DROP CONSTRAINT name [IF EXISTS]`` / ``DROP INDEX name [IF EXISTS]``: a name that is not
        a rule of that kind is an error without ``IF EXISTS``, a no-op with it."""
        rule = self.schema.get(name)
        if rule is None or rule["kind"] != kind:
            if if_exists:
                return
            if kind == "constraint":
                raise CypherError(CODE_CONSTRAINT_DROP, f"Unable to drop constraint `{name}`: No such constraint "
                                  f"{name}.")
            raise CypherError(CODE_INDEX_DROP, f"Unable to drop index called `{name}`: No such index {name}.")
        del self.schema[name]
        self.dirty = True

    def check_unique(self, items) -> None:
        """Raises before nodes ``items`` (labels, props) are created if they would break a uniqueness
        constraint, with each other or with the nodes there."""
        for rule in self.schema.values():
            if rule["kind"] != "constraint":
                continue
            label, prop = rule["label"], rule["property"]
            taken = {prop_key(n.props[prop]) for n in self.nodes.values() if label in n.labels and prop in n.props}
            for labels, props in items:
                if label in labels and prop in props:
                    key = prop_key(props[prop])
                    if key in taken:
                        raise CypherError(CODE_CONSTRAINT_VALIDATION, f"Node already exists with label `{label}` "
                                          f"and property `{prop}` = {json.dumps(props[prop])}")
                    taken.add(key)

    def merge_nodes(self, labels, rows, set_labels=(), name: str = FERRY_KEY) -> None:
        """``UNWIND $rows AS row MERGE (n:L… {<h>: row.id}) [SET n:S…,] SET n += row.props``, row by
        row (a row sees the nodes earlier rows made), ``<h>`` the statement's helper property: a
        node with at least these labels and that helper value is updated, else one is created with
        the labels and the helper; then it gets the labels ``set_labels`` (``SET n:S…`` adds
        labels, keeping those it has)."""
        self.helper(name)
        wanted = set(labels)
        new = []
        for key, update in rows:
            self._lookups(wanted, 1, name)
            found = [i for i in self.find_ferry(key, None, name) if wanted <= set(self.nodes[i].labels)]
            if found:
                self.merge_matches += len(found)
            else:
                node_id = f"4:{self.uuid}:{self.next_node}"
                self.next_node += 1
                self.nodes[node_id] = Node(self._labels(labels), {name: key})
                self._index(node_id, self.nodes[node_id].props)
                new.append(node_id)
                found = [node_id]
            for node_id in found:
                node = self.nodes[node_id]
                if set_labels:
                    node.labels = self._labels(node.labels + tuple(set_labels))
                self._node_unindex(node_id)
                self._add_to(node.props, update)
                self._index(node_id, node.props)
        if new:
            self.node_ids.extend(new)
            self.node_ids.sort()
        self.dirty = True

    def merge_rels(self, type_: str, rows, endpoint_label: str | None = None, name: str = FERRY_KEY) -> None:
        """``UNWIND $rows AS row MATCH (a[:E] {<h>: row.start}), (b[:E] {<h>: row.end}) MERGE
        (a)-[r:T {<h>: row.id}]->(b) SET r += row.props``: for every matched pair (nodes with that
        helper value, and the label E when given), a relationship of that type from a to b with
        that helper value is updated, else created."""
        self.helper(name)
        new = []
        for start_key, end_key, key, update in rows:
            self._lookups(() if endpoint_label is None else (endpoint_label,), 2, name)
            for start in list(self.find_ferry(start_key, endpoint_label, name)):
                for end in list(self.find_ferry(end_key, endpoint_label, name)):
                    if key is None:
                        raise CypherError(CODE_MERGE_NULL, "Cannot merge the following relationship because of "
                                          f"null property value for '{name}': (a)-[:{type_} {{{name}: null}}]->(b)")
                    found = list(self.rel_ferry[name].get((type_, start, end, prop_key(key)), []))
                    if found:
                        self.merge_matches += len(found)
                    else:
                        rel_id = f"5:{self.uuid}:{self.next_rel}"
                        self.next_rel += 1
                        self.rels[rel_id] = Rel(type_, start, end, {name: key})
                        self._rel_index(rel_id)
                        new.append(rel_id)
                        found = [rel_id]
                    for rel_id in found:
                        self._rel_unindex(rel_id)
                        self._add_to(self.rels[rel_id].props, update)
                        self._rel_index(rel_id)
        if new:
            self.rel_ids.extend(new)
            self.rel_ids.sort()
        self.dirty = True

    def clean_nodes(self, limit: int, name: str = FERRY_KEY) -> int:
        """Removes the helper property ``name`` from up to ``limit`` nodes that have it."""
        index = self.ferry.get(self.helper(name), {})
        done = 0
        while index and done < limit:
            key = next(iter(index))
            ids = index[key]
            while ids and done < limit:
                node_id = ids.pop()
                self._node_unindex(node_id)
                self.nodes[node_id].props.pop(name, None)
                self._index(node_id, self.nodes[node_id].props)
                done += 1
            if not ids:
                index.pop(key, None)
        if done:
            self.dirty = True
        return done

    def clean_rels(self, limit: int, name: str = FERRY_KEY) -> int:
        """Removes the helper property ``name`` from up to ``limit`` relationships that have it."""
        index = self.rel_ferry.get(self.helper(name), {})
        done = 0
        while index and done < limit:
            key = next(iter(index))
            ids = index[key]
            while ids and done < limit:
                rel_id = ids.pop()
                self._rel_unindex(rel_id)
                self.rels[rel_id].props.pop(name, None)
                self._rel_index(rel_id)
                done += 1
            if not ids:
                index.pop(key, None)
        if done:
            self.dirty = True
        return done

    def find_ferry(self, value, label: str | None = None, name: str = FERRY_KEY) -> list[str]:
        if value is None:
            return []
        found = self.ferry.get(self.helper(name), {}).get(prop_key(value), [])
        return found if label is None else [i for i in found if label in self.nodes[i].labels]

    def clean_label(self, match_label: str, remove_label: str, limit: int, name: str = FERRY_KEY) -> int:
        """``MATCH (n:M) WITH n LIMIT $limit REMOVE n:R, n.<h> RETURN count(n)``: the first
        ``limit`` nodes with label M (element id order) lose label R and the helper property."""
        done = 0
        for node_id in self.node_ids:
            if done >= limit:
                break
            node = self.nodes[node_id]
            if match_label not in node.labels:
                continue
            node.labels = tuple(label for label in node.labels if label != remove_label)
            self._node_unindex(node_id)
            node.props.pop(name, None)
            self._index(node_id, node.props)
            done += 1
        if done:
            self.dirty = True
        return done

    def remove_ferry_ids(self, name: str = FERRY_KEY) -> int:
        removed = 0
        for ids in self.ferry.get(self.helper(name), {}).values():
            for node_id in ids:
                if self.nodes[node_id].props.pop(name, None) is not None:
                    removed += 1
        self.ferry[name] = {}
        if removed:
            self.dirty = True
        return removed

    def delete_nodes(self, limit: int) -> int:
        """``DETACH DELETE`` of the first ``limit`` nodes (in element id order) and their relationships."""
        doomed = set(self.node_ids[:limit])
        if not doomed:
            return 0
        gone_rels = {i for i, r in self.rels.items() if r.start in doomed or r.end in doomed}
        for i in gone_rels:
            self._rel_unindex(i)
            del self.rels[i]
        self.rel_ids = [i for i in self.rel_ids if i not in gone_rels]
        for i in doomed:
            self._node_unindex(i)
            del self.nodes[i]
        self.node_ids = [i for i in self.node_ids if i not in doomed]
        self.dirty = True
        return len(doomed)

    def label_counts(self) -> list:
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            for label in node.labels:
                counts[label] = counts.get(label, 0) + 1
        return [[label, n] for label, n in counts.items()]

    def type_counts(self) -> list:
        counts: dict[str, int] = {}
        for rel in self.rels.values():
            counts[rel.type] = counts.get(rel.type, 0) + 1
        return [[t, n] for t, n in counts.items()]

    # -- reads --
    def _page(self, ids: list[str], after, limit: int) -> list[str]:
        """``WHERE elementId(x) > $after ... ORDER BY id LIMIT $limit``: nothing indexes element ids,
        so Neo4j reads every element, filters and sorts them (AllNodesScan, Filter, Top): each page
        touches the whole graph (Cypher manual, "Execution plan operators": AllNodesScan "is likely
        to encounter performance problems on a non-trivial database")."""
        self.touched += len(ids)
        if not isinstance(after, str):
            return []  # `elementId(x) > null` (or > a number) is null: no rows, as in Cypher
        start = bisect.bisect_right(ids, after)
        return ids[start:start + limit]

    def node_page(self, after, limit: int) -> list:
        return [[i, list(self.nodes[i].labels), self.nodes[i].props] for i in self._page(self.node_ids, after, limit)]

    def rel_page(self, after, limit: int) -> list:
        rows = []
        for i in self._page(self.rel_ids, after, limit):
            rel = self.rels[i]
            rows.append([i, rel.type, rel.start, rel.end, rel.props])
        return rows

    def _seek(self, prefix: str, table: dict, first, last) -> list[str]:
        """``WHERE id(x) IN range($from, $to)``: one NodeByIdSeek (DirectedRelationshipByIdSeek) per
        id of the range (Cypher manual, "Execution plan operators": NodeByIdSeek "reads one or more
        nodes by id from the node store"), so a page reads the ids it asks for, never the graph.
        ``id(x)`` is the number after the last colon of the element id here."""
        for value in (first, last):
            if isinstance(value, bool) or not isinstance(value, int):
                raise CypherError(CODE_TYPE, f"Type mismatch: range() expected Integer but was {_kind(value)}")
        if last - first >= 1_000_000:
            raise CypherError(CODE_ARGUMENT, "the emulator seeks at most 1,000,000 ids per statement")
        self.touched += max(0, last - first + 1)
        found = []
        for n in range(max(first, 0), last + 1):
            key = f"{prefix}:{self.uuid}:{n}"
            if key in table:
                found.append(key)
        return found

    def nodes_by_id(self, first, last) -> list:
        return [[i, list(self.nodes[i].labels), self.nodes[i].props] for i in self._seek("4", self.nodes, first, last)]

    def rels_by_id(self, first, last) -> list:
        rows = []
        for i in self._seek("5", self.rels, first, last):
            rel = self.rels[i]
            rows.append([i, rel.type, rel.start, rel.end, rel.props])
        return rows

    def max_id(self, table: dict):
        """``RETURN max(id(x))``: an AllNodesScan (or relationship scan) with an aggregation."""
        self.touched += len(table)
        return max((int(i.rsplit(":", 1)[1]) for i in table), default=None)

    def dump(self, typed: bool = False) -> dict:
        value = to_typed if typed else to_plain
        props = (lambda p: {k: value(v) for k, v in p.items()})
        return {
            "nodes": [{"id": i, "labels": list(self.nodes[i].labels), "props": props(self.nodes[i].props)}
                      for i in self.node_ids],
            "relationships": [{"id": i, "type": r.type, "start": r.start, "end": r.end, "props": props(r.props)}
                              for i in self.rel_ids for r in (self.rels[i],)],
        }

    def load(self, dump: dict) -> None:
        """Adds a typed dump (``nodes: [{labels, props}]``, ``relationships: [{type, start, end,
        props}]`` with start and end indexes into ``nodes`` and props in typed JSON): the test
        fixtures' way to seed any value type."""
        self.special = True
        items = [(n.get("labels", []), storable_map(from_typed({"$type": "Map", "_value": n.get("props", {})})))
                 for n in dump.get("nodes", [])]
        ids = self.add_nodes(items)
        self.add_rels([(r["type"], ids[r["start"]], ids[r["end"]],
                        storable_map(from_typed({"$type": "Map", "_value": r.get("props", {})})))
                       for r in dump.get("relationships", [])])

    def clone(self) -> "Graph":
        other = Graph(self.name, self.uuid, self.seeded)
        other.nodes = {i: Node(n.labels, dict(n.props)) for i, n in self.nodes.items()}
        other.node_ids = list(self.node_ids)
        other.rels = {i: Rel(r.type, r.start, r.end, dict(r.props)) for i, r in self.rels.items()}
        other.rel_ids = list(self.rel_ids)
        other.next_node, other.next_rel = self.next_node, self.next_rel
        other.label_tokens = dict(self.label_tokens)
        other.ferry = {n: {k: list(v) for k, v in index.items()} for n, index in self.ferry.items()}
        other.rel_ferry = {n: {k: list(v) for k, v in index.items()} for n, index in self.rel_ferry.items()}
        other.schema = copy.deepcopy(self.schema)
        other.special = self.special
        other.dirty = True
        return other


# ----- the seeded graph -------------------------------------------------------------------
LABELS = ("Person", "Company", "City", "Product")
REL_TYPES = ("KNOWS", "WORKS_AT", "LIVES_IN", "BOUGHT")
NAMES = ("Ada", "Zoë", "José", "Łukasz", "François", "Søren", "李雷", "Ærøskøbing", "Göteborg",
         "Привет", "O'Brien", 'Say "hi"', "emoji 🚀🎉", "tab\tand\nnewline", "back\\slash",
         "Ünïcødé — dash", "ελληνικά", "日本語テキスト", "", "plain")
WORDS = ("alpha", "beta", "gamma", "δέλτα", "ñandú", "😀", "x y", "")


def _text(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} {rng.randrange(100000)}".strip()


def _props_for(label: str, rng: random.Random, index: int) -> dict:
    if label == "Person":
        props = {"name": _text(rng), "age": rng.randint(18, 95), "height": round(rng.uniform(1.4, 2.1), 3),
                 "active": rng.random() < 0.5, "nicknames": [rng.choice(WORDS) for _ in range(rng.randrange(4))]}
    elif label == "Company":
        props = {"name": _text(rng), "founded": rng.randint(1800, 2024), "revenue": rng.uniform(-1e6, 1e12),
                 "public": rng.random() < 0.3, "sectors": [rng.choice(WORDS) for _ in range(1 + rng.randrange(3))]}
    elif label == "City":
        props = {"name": _text(rng), "population": rng.randint(0, 30_000_000),
                 "lat": rng.uniform(-90, 90), "lon": rng.uniform(-180, 180), "capital": rng.random() < 0.1,
                 "zip_codes": [rng.randint(1000, 99999) for _ in range(rng.randrange(4))]}
    else:
        props = {"name": _text(rng), "price": round(rng.uniform(0, 5000), 2), "stock": rng.randint(-5, 10000),
                 "discontinued": rng.random() < 0.2, "ratings": [round(rng.uniform(0, 5), 1) for _ in range(rng.randrange(5))],
                 "flags": [rng.random() < 0.5 for _ in range(rng.randrange(3))]}
    if index % 97 == 1:
        props["big"] = rng.randint(2 ** 53 + 1, INT64_MAX)  # not exactly representable as a double
    if index % 89 == 2:
        props["tiny"] = rng.choice([1e-300, -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2])
    return props


def build_seeded(name: str, seed: int, nodes: int, rels: int) -> Graph:
    rng = random.Random(f"aura-emulator:{seed}")
    db_uuid = str(uuidlib.UUID(int=random.Random(f"aura-db:{seed}:{name}").getrandbits(128), version=4))
    graph = Graph(name, db_uuid, seeded=True)
    graph._labels(LABELS)  # token order Person, Company, City, Product
    items = []
    for i in range(nodes):
        if i % 50 == 7:  # a few nodes without any label
            labels = []
            props = {"note": _text(rng), "flag": rng.random() < 0.5}
            if i % 100 == 7:
                props = {}
        else:
            primary = rng.choice(LABELS)
            labels = [primary]
            props = _props_for(primary, rng, i)
            if i % 10 == 3:  # some nodes carry two labels
                secondary = rng.choice([lbl for lbl in LABELS if lbl != primary])
                labels.append(secondary)
                props["since"] = rng.randint(1950, 2024)
        items.append((labels, props))
    node_ids = graph.add_nodes(items)
    # the creation counter order, not the string order
    by_counter = sorted(node_ids, key=lambda x: int(x.rsplit(":", 1)[1]))
    rel_items = []
    if by_counter:
        for i in range(rels):
            type_ = REL_TYPES[rng.randrange(len(REL_TYPES))]
            start = by_counter[rng.randrange(len(by_counter))]
            end = start if i % 101 == 13 else by_counter[rng.randrange(len(by_counter))]  # a few self loops
            if i % 20 == 5:
                props = {}
            else:
                props = {"since": rng.randint(1990, 2024), "weight": rng.uniform(0, 1),
                         "verified": rng.random() < 0.5}
                if rng.random() < 0.5:
                    props["note"] = _text(rng)
                if rng.random() < 0.3:
                    props["tags"] = [rng.choice(WORDS) for _ in range(rng.randrange(3))]
            rel_items.append((type_, start, end, props))
    graph.add_rels(rel_items)
    graph.dirty = False
    return graph


# ----- statements -------------------------------------------------------------------------
TOKEN_RE = re.compile(r"`(?:[^`]|``)*`|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\s+|[A-Za-z0-9_$]+|.", re.S)


def canonical(statement: str) -> str:
    """Whitespace-normalise: drop whitespace except a single space between two word tokens
    (identifiers, keywords, parameters, quoted names or strings).  Quoted text is kept as is."""
    out, prev_word, space = [], False, False
    for token in TOKEN_RE.findall(statement):
        if token.isspace():
            space = True
            continue
        word = token[0] in "`'\"_$" or token[0].isalnum()
        if space and prev_word and word:
            out.append(" ")
        out.append(token)
        prev_word, space = word, False
    text = "".join(out)
    return text[:-1] if text.endswith(";") else text


LABEL_RE = r"`(?:[^`]|``)+`|[A-Za-z_][A-Za-z0-9_]*"
PLACEHOLDERS = {
    "__LABELS__": rf"(?-i:((?::(?:{LABEL_RE}))*))",
    "__TYPE__": rf"(?-i:({LABEL_RE}))",
    "__SETLABELS__": rf"(?-i:((?::(?:{LABEL_RE}))+))",
    "__NAME__": rf"(?-i:({LABEL_RE}))",
    "__PROP__": rf"(?-i:({LABEL_RE}))",
}


# The load's helper property: any name (Ferry picks one per load, aura_restore.py one its file
# does not use), the same one wherever a statement names it.
FERRY_FIRST = rf"(?-i:(?P<ferry>{LABEL_RE}))"
FERRY_AGAIN = r"(?P=ferry)"


def template(text: str) -> re.Pattern:
    pattern = re.escape(canonical(text))
    pattern = pattern.replace("__FERRY__", FERRY_FIRST, 1).replace("__FERRY__", FERRY_AGAIN)
    for name, regex in PLACEHOLDERS.items():
        pattern = pattern.replace(name, regex)
    return re.compile(pattern, re.IGNORECASE)


def helper_of(match: re.Match) -> str:
    return unquote_name(match.group("ferry"))


def unquote_name(name: str) -> str:
    return name[1:-1].replace("``", "`") if name.startswith("`") else name


STATEMENTS = [
    ("nodes_page", template(
        "MATCH (n) WHERE elementId(n) > $after RETURN elementId(n) AS id, labels(n) AS labels, "
        "properties(n) AS props ORDER BY id LIMIT $limit")),
    ("rels_page", template(
        "MATCH ()-[r]->() WHERE elementId(r) > $after RETURN elementId(r) AS id, type(r) AS type, "
        "elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props "
        "ORDER BY id LIMIT $limit")),
    ("nodes_by_id", template(
        "MATCH (n) WHERE id(n) IN range($from, $to) RETURN elementId(n) AS id, labels(n) AS labels, "
        "properties(n) AS props")),
    ("rels_by_id", template(
        "MATCH ()-[r]->() WHERE id(r) IN range($from, $to) RETURN elementId(r) AS id, type(r) AS type, "
        "elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props")),
    ("max_node_id", template("MATCH (n) RETURN max(id(n)) AS max")),
    ("max_rel_id", template("MATCH ()-[r]->() RETURN max(id(r)) AS max")),
    ("count_nodes", template("MATCH (n) RETURN count(n) AS nodes")),
    ("count_rels", template("MATCH ()-[r]->() RETURN count(r) AS relationships")),
    ("create_nodes", template(
        "UNWIND $rows AS row CREATE (n__LABELS__) SET n = row.props, n.__FERRY__ = row.id")),
    ("create_rels", template(
        "UNWIND $rows AS row MATCH (a {__FERRY__: row.start}), (b {__FERRY__: row.end}) "
        "CREATE (a)-[r:__TYPE__]->(b) SET r = row.props")),
    ("cleanup", template("MATCH (n) WHERE n.__FERRY__ IS NOT NULL REMOVE n.__FERRY__")),
    ("merge_nodes", template("UNWIND $rows AS row MERGE (n__LABELS__ {__FERRY__: row.id}) SET n += row.props")),
    ("merge_nodes_set_labels", template(
        "UNWIND $rows AS row MERGE (n__LABELS__ {__FERRY__: row.id}) SET n__SETLABELS__, n += row.props")),
    ("merge_labelled_rels", template(
        "UNWIND $rows AS row MATCH (a:__TYPE__ {__FERRY__: row.start}), (b:__TYPE__ {__FERRY__: row.end}) "
        "MERGE (a)-[r:__TYPE__ {__FERRY__: row.id}]->(b) SET r += row.props")),
    ("clean_label", template(
        "MATCH (n:__TYPE__) WITH n LIMIT $limit REMOVE n:__TYPE__, n.__FERRY__ RETURN count(n) AS cleaned")),
    ("create_constraint", template("CREATE CONSTRAINT __NAME__ FOR (n:__TYPE__) REQUIRE n.__PROP__ IS UNIQUE")),
    ("create_constraint_if_not_exists", template(
        "CREATE CONSTRAINT __NAME__ IF NOT EXISTS FOR (n:__TYPE__) REQUIRE n.__PROP__ IS UNIQUE")),
    ("create_index", template("CREATE INDEX __NAME__ FOR (n:__TYPE__) ON (n.__PROP__)")),
    ("create_index_if_not_exists", template("CREATE INDEX __NAME__ IF NOT EXISTS FOR (n:__TYPE__) ON (n.__PROP__)")),
    ("drop_constraint", template("DROP CONSTRAINT __NAME__")),
    ("drop_constraint_if_exists", template("DROP CONSTRAINT __NAME__ IF EXISTS")),
    ("drop_index", template("DROP INDEX __NAME__")),
    ("drop_index_if_exists", template("DROP INDEX __NAME__ IF EXISTS")),
    ("merge_rels", template(
        "UNWIND $rows AS row MATCH (a {__FERRY__: row.start}), (b {__FERRY__: row.end}) "
        "MERGE (a)-[r:__TYPE__ {__FERRY__: row.id}]->(b) SET r += row.props")),
    ("clean_nodes", template(
        "MATCH (n) WHERE n.__FERRY__ IS NOT NULL WITH n LIMIT $limit REMOVE n.__FERRY__ RETURN count(n) AS cleaned")),
    ("clean_rels", template(
        "MATCH ()-[r]->() WHERE r.__FERRY__ IS NOT NULL WITH r LIMIT $limit REMOVE r.__FERRY__ "
        "RETURN count(r) AS cleaned")),
    ("delete_batch", template("MATCH (n) WITH n LIMIT $limit DETACH DELETE n RETURN count(n) AS deleted")),
    ("label_counts", template("MATCH (n) UNWIND labels(n) AS label RETURN label, count(*) AS n")),
    ("type_counts", template("MATCH ()-[r]->() RETURN type(r) AS type, count(r) AS n")),
]

STATEMENT_TEXTS = {
    "nodes_page": "MATCH (n) WHERE elementId(n) > $after RETURN elementId(n) AS id, labels(n) AS labels, properties(n) AS props ORDER BY id LIMIT $limit",
    "rels_page": "MATCH ()-[r]->() WHERE elementId(r) > $after RETURN elementId(r) AS id, type(r) AS type, elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props ORDER BY id LIMIT $limit",
    "nodes_by_id": "MATCH (n) WHERE id(n) IN range($from, $to) RETURN elementId(n) AS id, labels(n) AS labels, properties(n) AS props",
    "rels_by_id": "MATCH ()-[r]->() WHERE id(r) IN range($from, $to) RETURN elementId(r) AS id, type(r) AS type, elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props",
    "max_node_id": "MATCH (n) RETURN max(id(n)) AS max",
    "max_rel_id": "MATCH ()-[r]->() RETURN max(id(r)) AS max",
    "count_nodes": "MATCH (n) RETURN count(n) AS nodes",
    "count_rels": "MATCH ()-[r]->() RETURN count(r) AS relationships",
    "create_nodes": "UNWIND $rows AS row CREATE (n:`Label1`:`Label2`) SET n = row.props, n.`_ferry_id` = row.id",
    "create_rels": "UNWIND $rows AS row MATCH (a {`_ferry_id`: row.start}), (b {`_ferry_id`: row.end}) CREATE (a)-[r:`TYPE`]->(b) SET r = row.props",
    "cleanup": "MATCH (n) WHERE n.`_ferry_id` IS NOT NULL REMOVE n.`_ferry_id`",
    "merge_nodes": "UNWIND $rows AS row MERGE (n:`Label1`:`Label2` {`_ferry_id`: row.id}) SET n += row.props",
    "merge_rels": "UNWIND $rows AS row MATCH (a {`_ferry_id`: row.start}), (b {`_ferry_id`: row.end}) MERGE (a)-[r:`TYPE` {`_ferry_id`: row.id}]->(b) SET r += row.props",
    "merge_nodes_set_labels": "UNWIND $rows AS row MERGE (n:`_FerryImport` {`_ferry_id`: row.id}) SET n:`Label1`:`Label2`, n += row.props",
    "merge_labelled_rels": "UNWIND $rows AS row MATCH (a:`_FerryImport` {`_ferry_id`: row.start}), (b:`_FerryImport` {`_ferry_id`: row.end}) MERGE (a)-[r:`TYPE` {`_ferry_id`: row.id}]->(b) SET r += row.props",
    "clean_label": "MATCH (n:`_FerryImport`) WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` RETURN count(n) AS cleaned",
    "create_constraint": "CREATE CONSTRAINT `ferry_import_id` FOR (n:`_FerryImport`) REQUIRE n.`_ferry_id` IS UNIQUE",
    "create_constraint_if_not_exists": "CREATE CONSTRAINT `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) REQUIRE n.`_ferry_id` IS UNIQUE",
    "create_index": "CREATE INDEX `ferry_import_id` FOR (n:`_FerryImport`) ON (n.`_ferry_id`)",
    "create_index_if_not_exists": "CREATE INDEX `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) ON (n.`_ferry_id`)",
    "drop_constraint": "DROP CONSTRAINT `ferry_import_id`",
    "drop_constraint_if_exists": "DROP CONSTRAINT `ferry_import_id` IF EXISTS",
    "drop_index": "DROP INDEX `ferry_import_id`",
    "drop_index_if_exists": "DROP INDEX `ferry_import_id` IF EXISTS",
    "clean_nodes": "MATCH (n) WHERE n.`_ferry_id` IS NOT NULL WITH n LIMIT $limit REMOVE n.`_ferry_id` RETURN count(n) AS cleaned",
    "clean_rels": "MATCH ()-[r]->() WHERE r.`_ferry_id` IS NOT NULL WITH r LIMIT $limit REMOVE r.`_ferry_id` RETURN count(r) AS cleaned",
    "delete_batch": "MATCH (n) WITH n LIMIT $limit DETACH DELETE n RETURN count(n) AS deleted",
    "label_counts": "MATCH (n) UNWIND labels(n) AS label RETURN label, count(*) AS n",
    "type_counts": "MATCH ()-[r]->() RETURN type(r) AS type, count(r) AS n",
}


def match_statement(statement: str):
    text = canonical(statement)
    for name, regex in STATEMENTS:
        match = regex.fullmatch(text)
        if match:
            return name, match
    return None, None


def syntax_error(statement: str) -> CypherError:
    shown = statement.strip().split()[0] if statement.strip() else ""
    return CypherError(CODE_SYNTAX, f"Invalid input '{shown[:40]}': the Aura emulator only understands "
                       "Ferry's fixed statements (line 1, column 1 (offset: 0))")


def need(params: dict, *names):
    missing = [n for n in names if n not in params]
    if missing:
        raise CypherError(CODE_PARAM_MISSING, "Expected parameter(s): " + ", ".join(missing))


def limit_param(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CypherError(CODE_ARGUMENT, f"LIMIT: Invalid input. '{json.dumps(value)}' is not a valid value. "
                          "Must be a non-negative integer.")
    return value


def rows_param(value) -> list:
    if value is None:
        return []  # UNWIND null produces no rows
    if not isinstance(value, list):
        return [value]  # UNWIND of a scalar produces that one row
    return value


def run_statement(graph: Graph, name: str, match: re.Match, params: dict) -> tuple[list, list]:
    """Execute one matched statement atomically; return (fields, values)."""
    if name == "nodes_page":
        need(params, "after", "limit")
        return ["id", "labels", "props"], graph.node_page(params["after"], limit_param(params["limit"]))
    if name == "rels_page":
        need(params, "after", "limit")
        return ["id", "type", "start", "end", "props"], graph.rel_page(params["after"], limit_param(params["limit"]))
    if name in ("nodes_by_id", "rels_by_id"):
        need(params, "from", "to")
        seek = graph.nodes_by_id if name == "nodes_by_id" else graph.rels_by_id
        fields = ["id", "labels", "props"] if name == "nodes_by_id" else ["id", "type", "start", "end", "props"]
        return fields, seek(params["from"], params["to"])
    if name == "max_node_id":
        return ["max"], [[graph.max_id(graph.nodes)]]
    if name == "max_rel_id":
        return ["max"], [[graph.max_id(graph.rels)]]
    if name == "count_nodes":
        return ["nodes"], [[len(graph.nodes)]]
    if name == "count_rels":
        return ["relationships"], [[len(graph.rels)]]
    if name == "create_nodes":
        need(params, "rows")
        labels = [unquote_name(x) for x in re.findall(LABEL_RE, match.group(1))]
        if any(label == "" for label in labels):
            raise CypherError(CODE_SYNTAX, "'' is not a valid token name. Token names cannot be empty")
        items = []
        helper = graph.helper(helper_of(match))
        for row in rows_param(params["rows"]):
            props = storable_map(row_get(row, "props"))
            ferry_id = row_get(row, "id")
            if ferry_id is None:
                props.pop(helper, None)
            else:
                props[helper] = storable(ferry_id)
            items.append((labels, props))
        graph.check_unique(items)
        graph.add_nodes(items)
        return [], []
    if name == "create_rels":
        need(params, "rows")
        type_ = unquote_name(match.group(2))
        helper = helper_of(match)
        items = []
        for row in rows_param(params["rows"]):
            graph._lookups((), 2, helper)  # unlabelled: every node is read
            starts = graph.find_ferry(row_get(row, "start"), None, helper)
            ends = graph.find_ferry(row_get(row, "end"), None, helper)
            for start in starts:
                for end in ends:
                    items.append((type_, start, end, storable_map(row_get(row, "props"))))
        graph.add_rels(items)
        return [], []
    if name == "cleanup":
        graph.remove_ferry_ids(helper_of(match))
        return [], []
    if name in ("merge_nodes", "merge_nodes_set_labels"):
        need(params, "rows")
        labels = [unquote_name(x) for x in re.findall(LABEL_RE, match.group(1))]
        set_labels = [] if name == "merge_nodes" else [unquote_name(x) for x in re.findall(LABEL_RE, match.group(3))]
        helper = helper_of(match)
        if any(label == "" for label in labels + set_labels):
            raise CypherError(CODE_SYNTAX, "'' is not a valid token name. Token names cannot be empty")
        rows = []  # checked first: a failing statement changes nothing
        for row in rows_param(params["rows"]):
            key = row_get(row, "id")
            if key is None:
                raise CypherError(CODE_MERGE_NULL, "Cannot merge the following node because of null property "
                                  f"value for '{helper}': (n{''.join(':' + x for x in labels)} {{{helper}: null}})")
            rows.append((storable(key), add_map(row_get(row, "props"))))
        graph.merge_nodes(labels, rows, set_labels, helper)
        return [], []
    if name in ("merge_rels", "merge_labelled_rels"):
        need(params, "rows")
        endpoint_label = None
        helper = helper_of(match)
        if name == "merge_labelled_rels":
            endpoint_label, other = unquote_name(match.group(1)), unquote_name(match.group(3))
            if endpoint_label != other:
                raise syntax_error("MATCH: the emulator only knows one label for both endpoints")
            type_ = unquote_name(match.group(4))
        else:
            type_ = unquote_name(match.group(2))
        rows = []
        for row in rows_param(params["rows"]):
            key = row_get(row, "id")
            rows.append((row_get(row, "start"), row_get(row, "end"), None if key is None else storable(key),
                         add_map(row_get(row, "props"))))
        for start, end, key, _ in rows:  # checked first (MERGE only runs where both ends matched)
            if key is None and graph.find_ferry(start, endpoint_label, helper) \
                    and graph.find_ferry(end, endpoint_label, helper):
                raise CypherError(CODE_MERGE_NULL, "Cannot merge the following relationship because of null "
                                  f"property value for '{helper}': (a)-[:{type_} {{{helper}: null}}]->(b)")
        graph.merge_rels(type_, rows, endpoint_label, helper)
        return [], []
    if name == "clean_label":
        need(params, "limit")
        cleaned = graph.clean_label(unquote_name(match.group(1)), unquote_name(match.group(2)),
                                    limit_param(params["limit"]), helper_of(match))
        return ["cleaned"], [[cleaned]]
    if name.startswith("create_constraint") or name.startswith("create_index"):
        label, prop = unquote_name(match.group(2)), unquote_name(match.group(3))
        kind = "constraint" if name.startswith("create_constraint") else "index"
        graph.create_schema(kind, unquote_name(match.group(1)), label, prop, name.endswith("_if_not_exists"))
        return [], []
    if name.startswith("drop_"):
        kind = "constraint" if name.startswith("drop_constraint") else "index"
        graph.drop_schema(kind, unquote_name(match.group(1)), name.endswith("_if_exists"))
        return [], []
    if name in ("clean_nodes", "clean_rels"):
        need(params, "limit")
        limit = limit_param(params["limit"])
        helper = helper_of(match)
        cleaned = graph.clean_nodes(limit, helper) if name == "clean_nodes" else graph.clean_rels(limit, helper)
        return ["cleaned"], [[cleaned]]
    if name == "delete_batch":
        need(params, "limit")
        return ["deleted"], [[graph.delete_nodes(limit_param(params["limit"]))]]
    if name == "label_counts":
        return ["label", "n"], graph.label_counts()
    if name == "type_counts":
        return ["type", "n"], graph.type_counts()
    raise AssertionError(name)


# ----- emulator state ---------------------------------------------------------------------
@dataclass
class Token:
    value: str
    expires: float        # time.monotonic() deadline
    expired: bool = False


@dataclass
class Snapshot:
    snapshot_id: str
    instance_id: str
    created: float        # wall clock (with clock_offset) for timestamp/date
    fate: str             # "Completed" | "Failed"
    polls_needed: int
    data: Graph | None
    polls: int = 0
    status: str = "Pending"

    def poll(self):
        self.polls += 1
        if self.status in ("Completed", "Failed"):
            return
        if self.polls > self.polls_needed:
            self.status = self.fate
        elif self.polls >= 2:
            self.status = "InProgress"

    def public(self) -> dict:
        return {"snapshot_id": self.snapshot_id, "instance_id": self.instance_id, "profile": "AdHoc",
                "status": self.status, "timestamp": rfc3339(self.created),
                "exportable": self.status != "Failed"}


# Instance statuses: aura-cli neo4j-cli/aura/internal/api/response.go (InstanceStatus*): creating,
# destroying, running, ..., restoring; aura-cli's PollInstance waits while the status is the one it
# started from ("creating" after a create), as Ferry does.
@dataclass
class Instance:
    id: str
    name: str
    tenant_id: str
    restoring_polls_left: int = 0
    cloud_provider: str = "gcp"
    region: str = "europe-west1"
    type: str = "enterprise-db"
    memory: str = "8GB"
    connection_url: str = ""
    ready_at: float = 0.0               # time.monotonic(): "creating" until then
    gone_at: float | None = None        # "destroying" until then, then gone
    restore_lag_left: int = 0           # instance GETs still "running" after a restore POST
    pending_restore: "Snapshot | None" = None
    restores_done: int = 0
    created: bool = False               # made through POST /v1/instances
    password: str = ""
    server: object = None               # its own Query API (created instances)
    dbs: dict | None = None

    def status(self, override) -> str:
        if override:
            return str(override)
        if self.gone_at is not None:
            return "destroying"
        if time.monotonic() < self.ready_at:
            return "creating"
        if self.restore_lag_left > 0:
            return "running"  # Aura's status lags the restore POST: the restore has not begun
        return "restoring" if self.restoring_polls_left > 0 else "running"

    def public(self, override) -> dict:
        url = self.connection_url or f"neo4j+s://{self.id}.databases.neo4j.io"
        return {"id": self.id, "name": self.name, "status": self.status(override), "tenant_id": self.tenant_id,
                "cloud_provider": self.cloud_provider, "connection_url": url,
                "region": self.region, "type": self.type, "memory": self.memory, "storage": "16GB"}


# aura-cli create.go / create_test.go: the values `instance create` accepts.
INSTANCE_TYPES = ("free-db", "professional-db", "business-critical", "enterprise-db", "professional-ds",
                  "enterprise-ds")
INSTANCE_MEMORY = ("1GB", "2GB", "4GB", "8GB", "16GB", "24GB", "32GB", "48GB", "64GB", "128GB", "192GB", "256GB",
                   "384GB", "512GB")
CLOUD_PROVIDERS = ("gcp", "aws", "azure")


class InstanceQueryView:
    """What a created instance's own Query API server sees as its emulator: the instance's
    databases and user, everything else (lock, switches, request log, faults) shared."""

    query = None  # set below: the emulator's Query API, run over this instance's databases
    check_db_auth = None

    def __init__(self, emulator: "Emulator", inst: Instance):
        self._emulator = emulator
        self.instance = inst
        self.dbs = inst.dbs
        self.db_user, self.db_password = "neo4j", inst.password

    def __getattr__(self, name):
        return getattr(self._emulator, name)


SWITCH_TYPES = {
    "token_ttl": "number", "expire_tokens_now": "bool", "snapshot_polls": "int", "snapshot_fail": "bool",
    "rate_limit": "int?", "fail_next": "list", "malformed_next": "int", "query_error_next": "list",
    "query_error_status": "int?", "error_variant": "bool", "restore_polls": "int",
    "instance_status": "str?", "clock_offset": "number", "query_reply_delay_s": "number",
    "restore_lag_polls": "int", "create_seconds": "number", "destroy_seconds": "number",
    "instance_quota": "int?", "create_reply_delay_s": "number",
    "explain_scan": "bool",
}


def check_switch(name: str, value):
    kind = SWITCH_TYPES[name]
    if kind.endswith("?") and value is None:
        return
    kind = kind.rstrip("?")
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str),
          "list": isinstance(value, list)}[kind]
    if not ok:
        raise ApiError(400, f"switch {name} must be {SWITCH_TYPES[name]}", "invalid-switch")
    if name == "fail_next":
        for item in value:
            if not isinstance(item, dict) or set(item) - set(FAIL_NEXT_DEFAULTS):
                raise ApiError(400, "fail_next items are {status, retry_after, body}", "invalid-switch")
    if name == "query_error_next":
        for item in value:
            if not isinstance(item, (str, dict)):
                raise ApiError(400, "query_error_next items are messages or {code, message}", "invalid-switch")


class Emulator:
    def __init__(self, args):
        self.client_id, self.client_secret = args.client_id, args.client_secret
        self.db_user, self.db_password = args.db_user, args.db_password
        self.seed, self.node_count, self.rel_count = args.seed, args.nodes, args.rels
        self.seeded_name = args.database.lower()
        self.tenant_id = str(uuidlib.UUID(int=random.Random(f"aura-tenant:{args.seed}").getrandbits(128), version=4))
        self.host = args.host
        self.instances: dict[str, Instance] = {}
        self.instance_specs = [(i, args.instance_name or f"Instance{n + 1:02d}") for n, i in enumerate(args.instance)]
        self.defaults = {
            "token_ttl": args.token_ttl, "expire_tokens_now": False, "snapshot_polls": args.snapshot_polls,
            "snapshot_fail": False, "rate_limit": 125, "fail_next": [], "malformed_next": 0,
            "query_error_next": [], "query_error_status": None, "error_variant": False,
            "restore_polls": args.restore_polls, "instance_status": None, "clock_offset": 0, "faults": [],
            "query_reply_delay_s": 0, "restore_lag_polls": 0, "create_seconds": 1.0, "destroy_seconds": 0.5,
            "instance_quota": None, "create_reply_delay_s": 0, "explain_scan": False,
        }
        self.lock = threading.RLock()
        self.seeded = build_seeded(self.seeded_name, self.seed, self.node_count, self.rel_count)
        self.dbs: dict[str, Graph] = {}
        self._reset_state()

    def _reset_state(self):
        for inst in getattr(self, "instances", {}).values():
            self._stop_instance_server(inst)
        self.switches = copy.deepcopy(self.defaults)
        self.tokens: dict[str, Token] = {}
        self.token_requests = 0
        self.snapshots: dict[str, Snapshot] = {}
        self.requests = deque(maxlen=REQUEST_LOG_SIZE)
        self.rate_hits: deque = deque()
        self.query_count = 0
        self.rows_touched = 0
        self.page_touched_max = 0
        self.page_statements = 0
        self.faults_injected: list = []
        self.instances = {i: Instance(i, name, self.tenant_id) for i, name in self.instance_specs}
        self.instances_gone: list[str] = []  # ids of created instances deleted and gone, in order
        self.instances_created: list[str] = []  # ids of instances POST /v1/instances made, in order
        self.instance_deletes: list[str] = []  # ids of every DELETE /v1/instances/{id} Aura accepted
        if self.seeded.dirty:
            self.seeded = build_seeded(self.seeded_name, self.seed, self.node_count, self.rel_count)
        self.dbs = {self.seeded_name: self.seeded}

    # -- control --
    def reset(self) -> dict:
        with self.lock:
            self._reset_state()
            LoginOrigin.clear()
            return {"switches": self.switches}

    def update_switches(self, changes) -> dict:
        if not isinstance(changes, dict):
            raise ApiError(400, "control body must be a JSON object", "invalid-switch")
        unknown = sorted(set(changes) - set(self.defaults))
        if unknown:
            raise ApiError(400, f"unknown switch(es): {', '.join(unknown)}", "invalid-switch")
        for name, value in changes.items():
            if name != "faults":
                check_switch(name, value)
        if "faults" in changes:
            faults, problem = faults_problem(changes["faults"], FAULT_STEPS, PROVIDER_ERRORS)
            if problem:
                raise ApiError(400, problem, "invalid-switch")
            changes = {**changes, "faults": faults}
        with self.lock:
            self.switches.update(copy.deepcopy(changes))
            if self.switches["expire_tokens_now"]:
                for token in self.tokens.values():
                    token.expired = True
                self.switches["expire_tokens_now"] = False
            return {"switches": self.switches}

    def state(self) -> dict:
        with self.lock:
            self._purge_gone()
            return {"switches": self.switches, "token_requests": self.token_requests,
                    "tokens": len(self.tokens),
                    "snapshots": [{"snapshot_id": s.snapshot_id, "instance_id": s.instance_id,
                                   "status": s.status, "polls": s.polls} for s in self.snapshots.values()],
                    "instances": [{**i.public(self.switches["instance_status"]), "restores_done": i.restores_done,
                                   "restore_pending": i.restore_lag_left > 0, "created": i.created}
                                  for i in self.instances.values()],
                    "instances_gone": list(self.instances_gone),
                    "instances_created": list(self.instances_created),
                    "instance_deletes": list(self.instance_deletes),
                    "databases": sorted(self.dbs),
                    "requests": list(self.requests), "query_count": self.query_count,
                    "merge_matches": sum(g.merge_matches for g in self.dbs.values()),
                    "ferry_scans": sum(g.scans for g in self.dbs.values()),
                    "rows_touched": self.rows_touched, "page_touched_max": self.page_touched_max,
                    "page_statements": self.page_statements,
                    "faults_injected": [dict(f) for f in self.faults_injected],
                    "login_requests": LoginOrigin.snapshot()}

    def _dbs_of(self, instance: str | None) -> dict:
        if instance is None:
            return self.dbs
        inst = self.instances.get(instance)
        return inst.dbs if inst is not None and inst.dbs is not None else {}

    def database_info(self, name: str, instance: str | None = None):
        with self.lock:
            graph = self._dbs_of(instance).get(name.lower())
            if graph is None:
                return None
            return {"schema": sorted((dict(e) for e in graph.schema.values()), key=lambda e: e["name"]),
                    "statements": list(graph.log), "scans": graph.scans}

    def graph_dump(self, name: str, instance: str | None = None, typed: bool = False):
        with self.lock:
            graph = self._dbs_of(instance).get(name.lower())
            return None if graph is None else json.loads(json.dumps(graph.dump(typed)))

    def graph_load(self, name: str, body: bytes) -> dict:
        """Seeds database ``name`` (created empty if new) with a typed dump (``Graph.load``)."""
        try:
            dump = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, "graph body must be JSON", "invalid-request")
        key = name.lower()
        with self.lock:
            graph = self.dbs.get(key)
            if graph is None:
                graph = self.dbs[key] = Graph(key, str(uuidlib.uuid4()))
            try:
                graph.load(dump)
            except (CypherError, KeyError, IndexError, TypeError) as exc:
                raise ApiError(400, f"bad graph: {exc}", "invalid-request")
            return {"nodes": len(graph.nodes), "relationships": len(graph.rels)}

    def record(self, method: str, path: str, status: int, step: str | None = None):
        with self.lock:
            self.requests.append({"method": method, "path": path, "status": status, "t": time.time(),
                                  "step": step})

    def take_fault(self, step: str | None) -> dict | None:
        with self.lock:
            return take_fault(self.switches, step, self.faults_injected)

    @staticmethod
    def step_of(method: str, path: str) -> str | None:
        """The provider step of a request: ``token``, ``snapshot``, ``snapshot_status`` or ``query``."""
        if path == "/oauth/token":
            return "token"
        if RE_SNAPSHOTS.match(path) and method == "POST":
            return "snapshot"
        if RE_SNAPSHOT.match(path) and method == "GET":
            return "snapshot_status"
        if path.startswith("/db/"):
            return "query"
        return None

    def now(self) -> float:
        return time.time() + float(self.switches.get("clock_offset") or 0)

    # -- gateway faults --
    def pop_fail_next(self, kind: str) -> Reply | None:
        with self.lock:
            queue = self.switches.get("fail_next") or []
            if not queue:
                return None
            spec = {**FAIL_NEXT_DEFAULTS, **queue.pop(0)}
        status = int(spec["status"])
        headers = [] if spec["retry_after"] is None else [("Retry-After", str(spec["retry_after"]))]
        if spec["body"] is not None:
            return Reply(status, str(spec["body"]).encode(), "text/html", headers)
        message = f"Injected failure {status}"
        if kind == "db":
            return cypher_error_reply(status, CODE_UNAVAILABLE, message, headers)
        return json_reply(status, {"errors": [{"message": message, "reason": "service-unavailable"}]}, headers)

    def pop_malformed(self) -> Reply | None:
        with self.lock:
            if int(self.switches.get("malformed_next") or 0) <= 0:
                return None
            self.switches["malformed_next"] -= 1
        return Reply(200, MALFORMED_BODY, "text/html")

    def check_rate_limit(self):
        with self.lock:
            limit = self.switches.get("rate_limit")
            if limit is None:
                return
            now = time.monotonic()
            while self.rate_hits and self.rate_hits[0] <= now - RATE_WINDOW:
                self.rate_hits.popleft()
            if len(self.rate_hits) >= int(limit):
                wait = (self.rate_hits[0] + RATE_WINDOW - now) if self.rate_hits else RATE_WINDOW
                raise ApiError(429, "Too many requests", "too-many-requests",
                               [("Retry-After", str(max(1, math.ceil(wait))))])
            self.rate_hits.append(now)

    # -- OAuth --
    def count_token_request(self):
        with self.lock:
            self.token_requests += 1

    def issue_token(self, headers, body: bytes) -> Reply:
        auth = headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        creds = None
        if scheme.lower() == "basic":
            try:
                creds = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                creds = None
        if creds is None or not secrets.compare_digest(creds.encode(),
                                                       f"{self.client_id}:{self.client_secret}".encode()):
            raise ApiError(401, "Invalid credentials", "unauthorized")
        if not body.strip():
            raise ApiError(404, "Missing request body", "not-found")
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise ApiError(400, "Content-Type must be application/x-www-form-urlencoded", "invalid-request")
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            form = {}
        if form.get("grant_type") != ["client_credentials"]:
            raise ApiError(403, "Invalid request body: grant_type must be client_credentials", "forbidden")
        with self.lock:
            ttl = float(self.switches["token_ttl"])
            issued = int(self.now())
            header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "aura-emulator"}).encode())
            payload = b64url(json.dumps({"iss": "https://api.neo4j.io/", "sub": self.client_id, "iat": issued,
                                         "exp": issued + int(ttl), "jti": secrets.token_hex(8)}).encode())
            value = f"{header}.{payload}.{b64url(secrets.token_bytes(32))}"
            self.tokens[value] = Token(value, time.monotonic() + ttl)
        expires_in = int(ttl) if float(ttl).is_integer() else ttl
        return json_reply(200, {"access_token": value, "expires_in": expires_in, "token_type": "bearer"},
                          [("Cache-Control", "no-store")])

    def authorise(self, headers):
        auth = headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        with self.lock:
            token = self.tokens.get(value.strip()) if scheme.lower() == "bearer" else None
            if token is None:
                raise ApiError(401, "Unauthorized", "unauthorized")
            if token.expired or time.monotonic() >= token.expires:
                if self.switches["error_variant"]:
                    raise ApiError(403, "Forbidden", "forbidden", payload={"error": "Forbidden"})
                raise ApiError(403, "Forbidden: token expired", "forbidden")

    # -- management routes --
    def instance(self, instance_id: str) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise ApiError(404, f"DB not found: {instance_id}", "db-not-found")
        return inst

    def route_v1(self, method: str, path: str, query: dict, fault: dict | None = None, body: bytes = b"") -> Reply:
        override = self.switches["instance_status"]
        if RE_TENANTS.match(path):
            self._method(method, "GET")
            return json_reply(200, {"data": [{"id": self.tenant_id, "name": "ferry-test-tenant"}]})
        m = RE_TENANT.match(path)
        if m:
            self._method(method, "GET")
            if m.group(1) != self.tenant_id:
                raise ApiError(404, f"Tenant not found: {m.group(1)}", "tenant-not-found")
            return json_reply(200, {"data": {"id": self.tenant_id, "name": "ferry-test-tenant",
                                             "instance_configurations": []}})
        self._purge_gone()
        if RE_INSTANCES.match(path):
            if method == "POST":
                return self.create_instance(body)
            self._method(method, "GET")
            tenant = query.get("tenantId", [None])[0]
            # aura-cli `instance list`: id, name, tenant_id, cloud_provider of each instance.
            data = [{"id": i.id, "name": i.name, "tenant_id": i.tenant_id, "cloud_provider": i.cloud_provider}
                    for i in self.instances.values() if tenant in (None, i.tenant_id)]
            return json_reply(200, {"data": data})
        m = RE_INSTANCE.match(path)
        if m:
            if method == "DELETE":
                return self.delete_instance(self.instance(m.group(1)), override)
            self._method(method, "GET")
            inst = self.instance(m.group(1))
            reply = json_reply(200, {"data": inst.public(override)})
            if inst.restore_lag_left > 0:
                inst.restore_lag_left -= 1
                if inst.restore_lag_left == 0:
                    self._apply_restore(inst)
            elif inst.restoring_polls_left > 0:
                inst.restoring_polls_left -= 1
                if inst.restoring_polls_left == 0:
                    inst.restores_done += 1
            return reply
        m = RE_SNAPSHOTS.match(path)
        if m:
            inst = self.instance(m.group(1))
            if method == "POST":
                if fault is not None and fault["fault"] == "provider_error":
                    raise ApiError(409, fault["message"], "ongoing-database-operation")
                return self.create_snapshot(inst, override)
            self._method(method, "GET")
            return self.list_snapshots(inst, query)
        m = RE_SNAPSHOT.match(path)
        if m:
            self._method(method, "GET")
            self.instance(m.group(1))
            snap = self._snapshot(m.group(1), m.group(2))
            if fault_active(self.switches, "snapshot_status", "stuck", self.faults_injected):
                snap.polls += 1
                if snap.status == "Pending":
                    snap.status = "InProgress"
                return json_reply(200, {"data": {**snap.public(), "status": "InProgress"}})
            if fault is not None and fault["fault"] == "provider_error":
                snap.fate = snap.status = "Failed"
            snap.poll()
            return json_reply(200, {"data": snap.public()})
        m = RE_RESTORE.match(path)
        if m:
            self._method(method, "POST")
            return self.restore_snapshot(self.instance(m.group(1)), m.group(2), override)
        raise ApiError(404, "Not Found", "not-found")

    @staticmethod
    def _method(method: str, *allowed):
        if method not in allowed:
            raise ApiError(405, "Method not allowed", "method-not-allowed")

    def _snapshot(self, instance_id: str, snapshot_id: str) -> Snapshot:
        snap = self.snapshots.get(snapshot_id)
        if snap is None or snap.instance_id != instance_id:
            raise ApiError(404, "Snapshot not found", "snapshot-not-found")
        return snap

    @staticmethod
    def _busy(inst: Instance, override):
        status = inst.status(override)
        if status != "running":
            raise ApiError(409, f"The database is current undergoing an operation: {status}",
                           "ongoing-database-operation")

    def create_snapshot(self, inst: Instance, override) -> Reply:
        self._busy(inst, override)
        fate = "Failed" if self.switches["snapshot_fail"] else "Completed"
        data = self.seeded.clone() if inst.id == self.instance_specs[0][0] else None
        snap = Snapshot(str(uuidlib.uuid4()), inst.id, self.now(), fate,
                        int(self.switches["snapshot_polls"]), data)
        self.snapshots[snap.snapshot_id] = snap
        return json_reply(202, {"data": {"snapshot_id": snap.snapshot_id}})

    def list_snapshots(self, inst: Instance, query: dict) -> Reply:
        date = query.get("date", [None])[0]
        if date is None:
            day = dt.datetime.fromtimestamp(self.now(), dt.timezone.utc).date()
        else:
            try:
                if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
                    raise ValueError(date)
                day = dt.date.fromisoformat(date)
            except ValueError:
                raise ApiError(400, "Invalid date format, expected YYYY-MM-DD", "invalid-request", field_="date")
        data = [s.public() for s in self.snapshots.values() if s.instance_id == inst.id
                and dt.datetime.fromtimestamp(s.created, dt.timezone.utc).date() == day]
        return json_reply(200, {"data": data})

    def restore_snapshot(self, inst: Instance, snapshot_id: str, override) -> Reply:
        snap = self._snapshot(inst.id, snapshot_id)
        self._busy(inst, override)
        if snap.status != "Completed":
            raise ApiError(400, f"Snapshot {snapshot_id} is not restorable (status {snap.status})",
                           "snapshot-not-restorable")
        inst.pending_restore = snap
        inst.restore_lag_left = max(0, int(self.switches["restore_lag_polls"]))
        if inst.restore_lag_left == 0:
            self._apply_restore(inst)
        return json_reply(202, {"data": inst.public(override)})

    def _apply_restore(self, inst: Instance):
        """The restore begins: the data goes back, the instance reports ``restoring``."""
        snap, inst.pending_restore = inst.pending_restore, None
        if snap is not None and snap.data is not None:
            self.seeded = snap.data.clone()
            self.dbs[self.seeded_name] = self.seeded
        inst.restoring_polls_left = max(0, int(self.switches["restore_polls"]))
        if inst.restoring_polls_left == 0:
            inst.restores_done += 1

    # -- instances created and deleted through the API --
    def create_instance(self, body: bytes) -> Reply:
        """``POST /v1/instances``, checked as aura-cli's ``instance create`` checks its flags."""
        try:
            req = json.loads(body or b"null")
        except ValueError:
            raise ApiError(400, "Invalid request body", "invalid-request")
        if not isinstance(req, dict):
            raise ApiError(400, "Invalid request body", "invalid-request")
        for name in ("name", "type", "tenant_id", "version", "memory", "region", "cloud_provider"):
            if not isinstance(req.get(name), str) or not req[name].strip():
                raise ApiError(400, f"{name} is required", "invalid-request", field_=name)
        checks = (("type", INSTANCE_TYPES), ("memory", INSTANCE_MEMORY), ("cloud_provider", CLOUD_PROVIDERS),
                  ("version", ("4", "5")))
        for name, allowed in checks:
            if req[name] not in allowed:
                raise ApiError(400, f"{name} must be one of {', '.join(allowed)}", "invalid-request", field_=name)
        if req["tenant_id"] != self.tenant_id:
            raise ApiError(404, f"Tenant not found: {req['tenant_id']}", "tenant-not-found")
        quota = self.switches["instance_quota"]
        if quota is not None and sum(1 for i in self.instances.values() if i.tenant_id == self.tenant_id) >= quota:
            # The reason string is the emulator's: Aura documents the limit ("You can only create one
            # AuraDB Free instance per account", Aura docs "Creating an instance"), not its error body.
            raise ApiError(400, f"Your tenant has reached its limit of {quota} instances", "instance-quota-reached")
        while True:
            new_id = secrets.token_hex(4)
            if new_id not in self.instances:
                break
        inst = Instance(new_id, req["name"], self.tenant_id, cloud_provider=req["cloud_provider"],
                        region=req["region"], type=req["type"], memory=req["memory"], created=True,
                        ready_at=time.monotonic() + float(self.switches["create_seconds"]),
                        password=secrets.token_urlsafe(24), dbs={"neo4j": Graph("neo4j", str(uuidlib.uuid4()))})
        view = InstanceQueryView(self, inst)
        server = bind_server(InstanceHandler, view, (self.host, 0))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        inst.server = server
        inst.connection_url = f"neo4j://{self.host}:{server.server_address[1]}"
        self.instances[new_id] = inst
        self.instances_created.append(new_id)
        data = {"id": inst.id, "connection_url": inst.connection_url, "username": "neo4j", "password": inst.password,
                "tenant_id": inst.tenant_id, "cloud_provider": inst.cloud_provider, "region": inst.region,
                "type": inst.type, "name": inst.name}
        return json_reply(202, {"data": data})

    def delete_instance(self, inst: Instance, override) -> Reply:
        """``DELETE /v1/instances/{id}`` (aura-cli delete.go): 202, then ``destroying`` until gone."""
        status = inst.status(override)
        if status != "running":
            raise ApiError(409, f"The database is current undergoing an operation: {status}",
                           "ongoing-database-operation")
        inst.gone_at = time.monotonic() + float(self.switches["destroy_seconds"])
        self.instance_deletes.append(inst.id)
        return json_reply(202, {"data": inst.public(override)})

    def _purge_gone(self):
        now = time.monotonic()
        for inst in [i for i in self.instances.values() if i.gone_at is not None and i.gone_at <= now]:
            del self.instances[inst.id]
            self.instances_gone.append(inst.id)
            self._stop_instance_server(inst)

    @staticmethod
    def _stop_instance_server(inst: Instance):
        if inst.server is not None:
            server, inst.server = inst.server, None
            threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True).start()

    # -- Query API --
    def check_db_auth(self, headers):
        auth = headers.get("Authorization")
        if auth is None or not auth.strip():
            raise CypherError(CODE_UNAUTHORIZED, MSG_UNAUTHORIZED, 401, [("WWW-Authenticate", 'Basic realm="Neo4j"')])
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            raise CypherError(CODE_UNAUTHORIZED, MSG_UNAUTHORIZED, 401)
        if scheme.lower() != "basic" or not value.strip():
            raise CypherError(CODE_INVALID_FORMAT, "Invalid authentication header.", 401)
        try:
            creds = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CypherError(CODE_INVALID_FORMAT, "Invalid authentication header.", 401)
        user, sep, password = creds.partition(":")
        if not sep:
            raise CypherError(CODE_INVALID_FORMAT, "Invalid authentication header.", 401)
        if not (secrets.compare_digest(user.encode(), self.db_user.encode())
                and secrets.compare_digest(password.encode(), self.db_password.encode())):
            raise CypherError(CODE_UNAUTHORIZED, MSG_UNAUTHORIZED, 401, [("WWW-Authenticate", 'Basic realm="Neo4j"')])

    def query(self, database: str, headers, body: bytes, fault: dict | None = None) -> Reply:
        self.check_db_auth(headers)
        if fault is not None and fault["fault"] == "provider_error":
            with self.lock:
                self.query_count += 1
            raise CypherError(CODE_FORBIDDEN, fault["message"])
        # Query API docs, "Result formats": Content-Type application/json (plain parameters) or
        # application/vnd.neo4j.query (typed parameters); Accept application/json (the default) or
        # application/vnd.neo4j.query (typed results).
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json",) + TYPED_MIMES:
            raise CypherError(CODE_REQUEST_INVALID, f"Unsupported media type: {content_type or '(none)'}", 415)
        accepted = [a.split(";")[0].strip() for a in headers.get("Accept", "application/json").lower().split(",")]
        typed_out = any(a in TYPED_MIMES for a in accepted)
        if not typed_out and not any(a in ("application/json", "*/*", "application/*") for a in accepted):
            raise CypherError(CODE_REQUEST_INVALID, "Not acceptable: application/json or "
                              "application/vnd.neo4j.query", 406)
        try:
            request = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CypherError(CODE_REQUEST_INVALID, f"Bad Request: {exc}", 400)
        if not isinstance(request, dict) or not isinstance(request.get("statement"), str):
            raise CypherError(CODE_REQUEST_INVALID, "Bad Request: the body needs a string 'statement'", 400)
        params = request.get("parameters") or {}
        bookmarks = request.get("bookmarks", [])
        if not isinstance(params, dict) or not isinstance(bookmarks, list) \
                or not all(isinstance(b, str) for b in bookmarks):
            raise CypherError(CODE_REQUEST_INVALID, "Bad Request: 'parameters' must be a map and "
                              "'bookmarks' a list of strings", 400)
        if content_type in TYPED_MIMES:
            params = {k: from_typed(v, f"parameters.{k}") for k, v in params.items()}
        with self.lock:
            self.query_count += 1
            queued = self.switches.get("query_error_next") or []
            if queued:
                item = queued.pop(0)
                if isinstance(item, dict):
                    raise CypherError(item.get("code") or CODE_UNAVAILABLE, str(item.get("message", "")))
                raise CypherError(CODE_UNAVAILABLE, str(item))
            statement = request["statement"]
            explain = re.match(r"\s*EXPLAIN\s+", statement, re.IGNORECASE)
            if explain:
                statement = statement[explain.end():]
            name, match = match_statement(statement)
            if name is None:
                raise syntax_error(statement)
            key = database.lower()
            if not RE_DB_NAME.match(key):
                raise CypherError("Neo.ClientError.Database.DatabaseNotFound",
                                  f"Database does not exist. Database name: '{database}'.")
            graph = self.dbs.get(key)
            if graph is None:
                graph = self.dbs[key] = Graph(key, str(uuidlib.uuid4()))
            if explain:
                # Query API docs, "Profile queries": EXPLAIN returns the plan without running the
                # statement, as ``queryPlan`` {operatorType, arguments, identifiers, children}
                # (neo4j/neo4j DriverResultSerializer.writeQueryPlan, Fieldnames.QUERY_PLAN_KEY).
                fields = STATEMENT_FIELDS.get(name, [])
                payload = {"data": {"fields": fields, "values": []},
                           "queryPlan": query_plan(name, bool(self.switches["explain_scan"])),
                           "bookmarks": [f"FB:{b64url(secrets.token_bytes(24))}"]}
                graph.log.append("explain_" + name)
            else:
                if content_type in TYPED_MIMES:
                    graph.special = True
                before = graph.touched
                fields, values = run_statement(graph, name, match, params)
                touched = graph.touched - before
                self.rows_touched += touched
                if name in PAGE_STATEMENTS:
                    self.page_statements += 1
                    self.page_touched_max = max(self.page_touched_max, touched)
                graph.log.append(name)
                if typed_out:
                    values = [[to_typed(v) for v in row] for row in values]
                elif graph.special:
                    values = [[to_plain(v) for v in row] for row in values]
                payload = {"data": {"fields": fields, "values": values},
                           "bookmarks": [f"FB:{b64url(secrets.token_bytes(24))}"]}
            delay = float(self.switches["query_reply_delay_s"])
        if delay > 0:
            time.sleep(delay)  # the statement ran; its answer is late (a client may be gone by then)
        reply = json_reply(202, payload)
        if typed_out:
            reply = Reply(reply.status, reply.body, TYPED_MIME, reply.headers)
        return reply


# The page statements, whose rows touched per statement the state reports (``page_touched_max``).
PAGE_STATEMENTS = ("nodes_page", "rels_page", "nodes_by_id", "rels_by_id")
STATEMENT_FIELDS = {
    "nodes_page": ["id", "labels", "props"], "nodes_by_id": ["id", "labels", "props"],
    "rels_page": ["id", "type", "start", "end", "props"], "rels_by_id": ["id", "type", "start", "end", "props"],
    "max_node_id": ["max"], "max_rel_id": ["max"],
}


def plan(operator: str, details: str, identifiers: list, *children) -> dict:
    return {"operatorType": f"{operator}@neo4j", "arguments": {"Details": details, "planner": "COST"},
            "identifiers": identifiers, "children": list(children)}


def query_plan(name: str, scan: bool) -> dict:
    """The plan Neo4j 5 gives each statement (Cypher manual, "Execution plan operators"): a page by
    ``id(x) IN range(...)`` is an id seek; a page by ``elementId(x) > $after ORDER BY id LIMIT``
    scans every element, filters and sorts (Top); ``max(id(x))`` scans once. The ``explain_scan``
    switch makes the id pages plan as a scan (a server whose planner does not seek)."""
    if name in ("nodes_by_id", "rels_by_id") and not scan:
        seek = "NodeByIdSeek" if name == "nodes_by_id" else "DirectedRelationshipByIdSeek"
        var = "n" if name == "nodes_by_id" else "r"
        return plan("ProduceResults", "id, labels, props", [var],
                    plan("Projection", "elementId(...) AS id", [var], plan(seek, f"{var} WHERE id({var}) IN range($from, $to)", [var])))
    nodes = name.startswith("nodes") or name in ("max_node_id", "count_nodes")
    scan_op = plan("AllNodesScan", "n", ["n"]) if nodes else plan("DirectedAllRelationshipsScan", "()-[r]->()", ["r"])
    if name in ("nodes_page", "rels_page"):
        return plan("ProduceResults", "id", ["id"], plan("Top", "id ASC LIMIT $limit", ["id"],
                                                         plan("Filter", "elementId(x) > $after", ["id"], scan_op)))
    if name in ("nodes_by_id", "rels_by_id"):
        return plan("ProduceResults", "id", ["id"], plan("Filter", "id(x) IN range($from, $to)", ["id"], scan_op))
    return plan("ProduceResults", "", [], plan("EagerAggregation", "", [], scan_op))


def _reject_constant(name):
    raise ValueError(f"invalid JSON number {name}")


# ----- HTTP -------------------------------------------------------------------------------
class Handler(BaseHandler):
    server_version = "aura-emulator"
    emulator: Emulator

    def reply_headers(self) -> list:
        return [("X-Request-Id", str(uuidlib.uuid4()))]

    def dispatch(self):
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        self.begin_request(path)
        try:
            body = self.read_body()
            emu = self.emulator
            self._step = emu.step_of(self.command, path)
            fault = emu.take_fault(self._step)
            if answer_fault(self, fault, self.fault_error_reply):
                return
            reply = self.route(path, query, body, fault)
            if fault is not None and fault["fault"] in ("truncate", "truncate_chunked"):
                write_cut_reply(self, reply, fault.get("truncate_at"), chunked=fault["fault"] == "truncate_chunked")
            else:
                self.write_reply(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # an emulator bug: loud, but keep serving
            traceback.print_exc()
            if not self._status:
                self.write_reply(json_reply(500, {"errors": [{"message": "Aura emulator internal error",
                                                              "reason": "internal-error"}]}))
        finally:
            self.finish_request()

    def log_request_status(self, status: int) -> None:
        self.emulator.record(self.command, self._path, status, self._step)

    def fault_error_reply(self, status: int, message: str, headers) -> Reply:
        """An injected 5xx/429 in the shape of the API the step belongs to."""
        if self._step == "query":
            code = "Neo.TransientError.General.DatabaseUnavailable" if status >= 500 else \
                "Neo.ClientError.Request.TooManyRequests"
            return cypher_error_reply(status, code, message, headers)
        reason = "too-many-requests" if status == 429 else "service-unavailable"
        return json_reply(status, {"errors": [{"message": message, "reason": reason}]}, headers)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = dispatch

    def route(self, path: str, query: dict, body: bytes, fault: dict | None = None) -> Reply:
        emu = self.emulator
        if path.startswith("/__control"):
            return self.control(path, query, body)
        if path == "/oauth/token" or path.startswith("/v1/") or path == "/v1":
            if path == "/oauth/token" and self.command == "POST":
                emu.count_token_request()  # every attempt, whatever its answer
            try:
                canned = emu.pop_fail_next("mgmt")
                if canned is not None:
                    return canned
                if path != "/oauth/token":
                    canned = emu.pop_malformed()
                    if canned is not None:
                        return canned
                emu.check_rate_limit()
                if path == "/oauth/token":
                    emu._method(self.command, "POST")
                    if fault is not None and fault["fault"] == "provider_error":
                        raise ApiError(401, fault["message"], "unauthorized")
                    return emu.issue_token(self.headers, body)
                emu.authorise(self.headers)
                with emu.lock:
                    reply = emu.route_v1(self.command, path, query, fault, body)
                delay = float(emu.switches["create_reply_delay_s"])
                if delay > 0 and self.command == "POST" and RE_INSTANCES.match(path):
                    time.sleep(delay)  # the instance exists; its answer is late (a client may be gone by then)
                return reply
            except ApiError as exc:
                return exc.reply()
        if path.startswith("/db/"):
            try:
                canned = emu.pop_fail_next("db") or emu.pop_malformed()
                if canned is not None:
                    return canned
                m = RE_QUERY.match(path)
                if not m:
                    raise CypherError(CODE_REQUEST_INVALID, "Not Found (explicit transactions are not emulated)", 404)
                if self.command != "POST":
                    raise CypherError(CODE_REQUEST_INVALID, "Method not allowed", 405)
                return emu.query(m.group(1), self.headers, body, fault)
            except CypherError as exc:
                status = exc.status
                if status is None:
                    status = emu.switches.get("query_error_status") or 202
                return cypher_error_reply(int(status), exc.code, exc.message, exc.headers)
        return json_reply(404, {"errors": [{"message": "Not Found", "reason": "not-found"}]})

    def control(self, path: str, query: dict, body: bytes) -> Reply:
        emu = self.emulator
        try:
            if path == "/__control/state" and self.command == "GET":
                return json_reply(200, emu.state())
            if path == "/__control/graph" and self.command == "POST":
                return json_reply(200, emu.graph_load(query.get("db", [emu.seeded_name])[0], body))
            if path == "/__control/graph" and self.command == "GET":
                name = query.get("db", [emu.seeded_name])[0]
                dump = emu.graph_dump(name, query.get("instance", [None])[0], query.get("typed", ["0"])[0] == "1")
                if dump is None:
                    raise ApiError(404, f"no database {name}", "not-found")
                return json_reply(200, dump)
            if path == "/__control/database" and self.command == "GET":
                name = query.get("db", [emu.seeded_name])[0]
                info = emu.database_info(name, query.get("instance", [None])[0])
                if info is None:
                    raise ApiError(404, f"no database {name}", "not-found")
                return json_reply(200, info)
            if path == "/__control/reset" and self.command == "POST":
                return json_reply(200, emu.reset())
            if path == "/__control/instances" and self.command == "POST":
                try:
                    spec = json.loads(body or b"{}")
                    inst_id, name = str(spec["id"]), str(spec["name"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError(400, 'control body must be {"id": ..., "name": ...}', "invalid-switch")
                if not RE_INSTANCE_ID.match(inst_id):
                    raise ApiError(400, "id must be 8 lower-case hex characters", "invalid-switch")
                with emu.lock:
                    if inst_id in emu.instances:
                        raise ApiError(409, f"instance {inst_id} exists already", "conflict")
                    emu.instance_specs.append((inst_id, name))
                    emu.instances[inst_id] = Instance(inst_id, name, emu.tenant_id)
                    return json_reply(200, emu.instances[inst_id].public(None))
            if path == "/__control" and self.command == "POST":
                try:
                    changes = json.loads(body or b"{}")
                except ValueError:
                    raise ApiError(400, "control body must be JSON", "invalid-switch")
                return json_reply(200, emu.update_switches(changes))
            raise ApiError(404, "No such control endpoint", "not-found")
        except ApiError as exc:
            return exc.reply()


class InstanceHandler(Handler):
    """A created instance's own host: its Query API only (no management API, no control API)."""

    def route(self, path: str, query: dict, body: bytes, fault: dict | None = None) -> Reply:
        inst = self.emulator.instance
        if not path.startswith("/db/"):
            return json_reply(404, {"errors": [{"message": "Not Found", "reason": "not-found"}]})
        if inst.status(None) != "running":
            # Not serving yet (creating) or any more (destroying).
            return cypher_error_reply(503, CODE_UNAVAILABLE, f"Instance {inst.id} is {inst.status(None)}")
        return super().route(path, query, body, fault)


InstanceQueryView.query = Emulator.query
InstanceQueryView.check_db_auth = Emulator.check_db_auth


# ----- startup ----------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description="Neo4j Aura management API + Query API emulator")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--instance", action="append", required=True,
                        help="an instance id, 8 lower-case hex characters (repeatable; the first one "
                             "owns the seeded database)")
    parser.add_argument("--instance-name", default=None)
    parser.add_argument("--db-user", required=True)
    parser.add_argument("--db-password", required=True)
    parser.add_argument("--database", default="neo4j", help="name of the seeded database")
    parser.add_argument("--token-ttl", type=float, default=3600.0)
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--rels", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--snapshot-polls", type=int, default=2)
    parser.add_argument("--restore-polls", type=int, default=2)
    args = parser.parse_args(argv)
    for instance in args.instance:
        if not RE_INSTANCE_ID.match(instance):
            parser.error(f"--instance must be 8 lower-case hex characters, got {instance!r}")
    if args.nodes < 0 or args.rels < 0:
        parser.error("--nodes and --rels must be >= 0")
    return args


def make_server(argv) -> ThreadingHTTPServer:
    args = parse_args(argv)
    emulator = Emulator(args)
    return bind_server(Handler, emulator, (args.host, args.port))


def main(argv=None):
    serve_main(make_server, argv)


if __name__ == "__main__":
    main()
