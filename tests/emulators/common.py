"""HTTP plumbing shared by the provider emulators in this folder, and the helpers their tests use
to run one as a subprocess.  Standard library only.

The emulators (``d1.py``, ``dgraph.py``, ``aura.py``, ``dxp.py``) import this module as ``common``
(each puts this folder on ``sys.path`` first, so that works both when run as a script and when
imported as ``emulators.<name>``); the tests import it as ``emulators.common``.

* ``Reply``: one HTTP answer (status, body, content type, extra headers).
* ``BaseHandler``: the request-handler plumbing (HTTP/1.1, no access log, the status code sent is
  kept in ``self._status`` and the request logged as that status line goes out, ``read_body`` with
  chunked decoding, ``write_reply`` for a ``Reply``, ``host()``, ``mark_download()`` so a download's
  log entry gets the range fields).  An emulator's ``Handler`` adds ``server_version``,
  ``dispatch`` and its routes.
* ``bind_server``: the ``ThreadingHTTPServer`` around a handler bound to one emulator.
* ``serve_main``: the command-line serve loop: ``READY <port>`` on stdout, then serve until
  SIGTERM or Ctrl-C.
* ``start_emulator`` / ``stop_emulator``: run an emulator script on a free port for a test.
* ``serve_download``: one implementation of a download URL as an object store serves it (ranges,
  ``If-Range``, validators, the ``RANGE_SWITCHES`` ``ignore_range``, ``etag_generation``,
  ``throttle_kib_per_s`` and ``truncate_after_bytes``), streamed from bytes or a seekable file.
* ``Presigner``: presigned ``/__signed/<token>/…`` URLs with ``X-Amz-Date``/``X-Amz-Expires``
  and a checked signature, each with its own deadline (D1 and Dgraph); ``ttl_switch_changes``
  validates ``signed_url_ttl_s`` and its alias ``url_ttl``.
* The request log: ``REQUEST_LOG_SIZE`` entries; a download's entry has ``method``, ``path``,
  ``status`` and the ``download_log_fields`` ``range``, ``if_range``, ``accept_encoding``,
  ``served_start``, ``served_end`` (exclusive) and ``sent``; ``log_snapshot`` copies it safely.
* Injected faults (``faults`` switch, one mechanism for every emulator): ``faults_problem``
  validates and completes the specs, ``take_fault`` / ``fault_active`` consume them per provider
  step, ``answer_fault`` answers the request-level ones (status, hang, delay, redirect, expiry),
  ``write_cut_reply`` cuts an API answer, and ``LoginOrigin`` is the second origin a
  ``redirect_html`` fault sends the client to.  See "Injected faults" below.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import http.client
import hmac
import threading
import math
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

EMULATORS_DIR = Path(__file__).resolve().parent
RE_READY = re.compile(r"READY (\d+)\n")


# ----- serving ------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list = field(default_factory=list)


class BaseHandler(BaseHTTPRequestHandler):
    """Plumbing for an emulator's handler."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default access log
        pass

    def begin_request(self, path: str) -> None:
        """Starts a request's bookkeeping; call first in ``dispatch``."""
        self._entry = None
        self._status = 0
        self._path = path
        self._logged = False
        self._download = False
        self._step = None  # the provider step the request belongs to, once the route knows it

    def mark_download(self) -> None:
        """Marks this request as a download: its log entry gets the ``download_log_fields``
        (``range``, ``if_range``, ``accept_encoding``, ``served_start``, ``served_end``, ``sent``)
        whatever the answer, a refusal included.  Call before the status line goes out."""
        self._download = True

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)
        # Log the request as its status line goes out, before any body: a client that holds
        # the answer always finds its request in /__control/state.
        self._log_once(code)

    def finish_request(self) -> None:
        """Logs a request that never sent a status line; call in ``dispatch``'s ``finally``."""
        self._log_once(self._status)

    def _log_once(self, status: int) -> None:
        if getattr(self, "_logged", True) or self._path.startswith("/__control"):
            return
        self._logged = True
        self.log_request_status(status)
        if getattr(self, "_download", False) and isinstance(self._entry, dict):
            self._entry.update(download_log_fields(self.headers))

    def log_request_status(self, status: int) -> None:
        """Records this request in the emulator's request log (each emulator overrides it)."""

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply_headers(self) -> list:
        """Headers sent on every ``write_reply``, after ``Content-Length`` and before the reply's own."""
        return []

    def write_reply(self, reply: Reply):
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in self.reply_headers():
            self.send_header(name, value)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def host(self) -> str:
        host, port = self.server.server_address[:2]
        return self.headers.get("Host") or f"{host}:{port}"


def bind_server(handler_class, emulator, address) -> ThreadingHTTPServer:
    """A threading server on ``address`` whose handler is ``handler_class`` bound to ``emulator``."""
    handler = type("BoundHandler", (handler_class,), {"emulator": emulator})
    server = ThreadingHTTPServer(address, handler)
    server.daemon_threads = True
    server.emulator = emulator
    return server


def serve_main(make_server, argv=None, cleanup=None):
    """Build the server from ``argv`` (default: the command line), print ``READY <port>``, serve
    until SIGTERM or Ctrl-C, close the server and then call ``cleanup(server)`` if given."""
    server = make_server(sys.argv[1:] if argv is None else argv)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if cleanup is not None:
            cleanup(server)


# ----- tests --------------------------------------------------------------------------------------
def get_tolerating_cutoff(url: str, headers: dict, timeout: float = 10) -> tuple:
    """GET with http.client; returns ``(response, body, complete?)``, tolerating a cut-off body
    (what the truncation switches produce), which urllib would turn into an exception."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        try:
            return resp, resp.read(), True
        except http.client.IncompleteRead as exc:
            return resp, exc.partial, False
    finally:
        conn.close()


def start_emulator(script_name: str, args) -> tuple:
    """Run ``tests/emulators/<script_name> --port 0 <args>`` and read its first line.

    Returns ``(process, port, first_line)``; ``port`` is None when that line is not
    ``READY <port>`` (what to do then is the caller's business; the process is left running)."""
    process = subprocess.Popen([sys.executable, str(EMULATORS_DIR / script_name), "--port", "0", *args],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = RE_READY.fullmatch(line)
    return process, (int(match.group(1)) if match else None), line


def stop_emulator(process, timeout: float = 5, wait_after_kill: bool = True):
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        if wait_after_kill:
            process.wait()


# ----- download URLs: byte ranges, presigned URLs, request log ----------------------------------------
# Every download URL Ferry copies from (D1's and Dgraph's signed URLs, DXP's downloads) is served by
# ``serve_download``, the way an object store serves a GET (RFC 9110):
#   * 200/206 carry a strong ``ETag`` (quoted), ``Last-Modified``, ``Accept-Ranges: bytes`` and
#     ``Content-Length`` (unless the emulator's own chunked switch is on);
#   * ``Range: bytes=N-`` / ``bytes=N-M`` / ``bytes=-N`` -> 206 with ``Content-Range: bytes N-M/TOTAL``;
#     a start at or past the end -> 416 with ``Content-Range: bytes */TOTAL``; a malformed or
#     multi-range header is ignored (200, whole body);
#   * ``If-Range`` (an ETag, compared strongly, or an HTTP-date, compared to ``Last-Modified``) that
#     does not match -> 200 with the whole body.
# Switches every emulator accepts (``RANGE_SWITCHES``, validated by ``range_switch_problem``):
#   ignore_range (bool, false)          always 200 with the whole body (a server without ranges)
#   etag_generation (int >= 0, 0)       part of ETag and Last-Modified: bump it and the object looks
#                                       replaced (the bytes stay the same)
#   throttle_kib_per_s (number >= 0, 0) pace every download body at that rate (0: unlimited); read
#                                       live, so changing it also re-paces downloads in flight
#   truncate_after_bytes (int >= 0, 0)  every download sends its headers (the full Content-Length)
#                                       but closes the connection after that many body bytes,
#                                       counted from the start of the range served (0: off)
#   accept_ranges_none (bool, false)    a server that supports no ranges for the object and says so:
#                                       `Accept-Ranges: none` on every answer, ranges ignored (RFC
#                                       9110 §14.3: such a server "MAY send Accept-Ranges: none")
#   no_validators (bool, false)         no ETag and no Last-Modified (RFC 9110 §8.8.2/§8.8.3: an origin
#                                       "SHOULD" send them, it need not); without them a client
#                                       sends no If-Range, so a range of a replaced object is
#                                       served from the new object
#   replaced_size (int >= 0, 0)         the object was replaced by a different one of this many bytes
#                                       (its first 64 bytes as before, every later byte changed; a
#                                       new ETag unless no_validators): a range from its end or
#                                       past it is answered 416 `bytes */replaced_size` (0: off)
RANGE_SWITCHES = {"ignore_range": False, "etag_generation": 0, "throttle_kib_per_s": 0, "truncate_after_bytes": 0,
                  "accept_ranges_none": False, "no_validators": False, "replaced_size": 0}
_REPLACED = bytes((b ^ 0x5A) for b in range(256))  # how a replaced object's bytes differ
REQUEST_LOG_SIZE = 2000  # entries kept in each emulator's request log (/__control/state "requests")
RE_BYTES_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_EPOCH = 1_795_000_000  # the Last-Modified of generation 0 (Nov 2026); each generation adds an hour


def range_switch_problem(key: str, value):
    """Why a range switch value is invalid, or None (also None for keys that are not range switches)."""
    if key in ("ignore_range", "accept_ranges_none", "no_validators") and not isinstance(value, bool):
        return f"{key} must be a boolean"
    if key == "replaced_size" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        return "replaced_size must be a non-negative integer (0: off)"
    if key == "etag_generation" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        return "etag_generation must be a non-negative integer"
    if key == "throttle_kib_per_s" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        return "throttle_kib_per_s must be a non-negative number (0: unlimited)"
    if key == "truncate_after_bytes" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        return "truncate_after_bytes must be a non-negative integer (0: off)"
    return None


def download_log_fields(headers) -> dict:
    """The request-log fields of a download before anything is served: the ``Range``, ``If-Range``
    and ``Accept-Encoding`` request headers as received (None when absent), no span, nothing sent."""
    return {"range": headers.get("Range"), "if_range": headers.get("If-Range"),
            "accept_encoding": headers.get("Accept-Encoding"),
            "served_start": None, "served_end": None, "sent": 0}


def log_snapshot(requests) -> list:
    """Copies of the request-log entries (call with the emulator's lock held): entries of downloads
    still in flight keep changing, and JSON-encoding a dict another thread updates is unsafe."""
    return [dict(entry) for entry in requests]


def validators(identity: str, switches: dict) -> tuple[str, str]:
    """The (ETag, Last-Modified) of an object named by ``identity`` under the current switches."""
    generation = int(switches.get("etag_generation") or 0)
    digest = hashlib.sha256(f"{identity}:{generation}".encode()).hexdigest()[:32]
    return f'"{digest}"', formatdate(_EPOCH + generation * 3600, usegmt=True)


def _http_date(value: str):
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def if_range_matches(value: str, etag: str, last_modified: str) -> bool:
    """RFC 9110 §13.1.5: an entity tag matches only strongly (a weak ``W/"…"`` never does); a date
    matches when it is exactly the ``Last-Modified``."""
    value = value.strip()
    if value.startswith(("W/", '"')):
        return value == etag
    when = _http_date(value)
    return when is not None and when == _http_date(last_modified)


def plan_range(headers, size: int, etag: str, last_modified: str, switches: dict):
    """(status, start, end) to serve: 200 whole, 206 [start, end), or 416."""
    header = headers.get("Range")
    if not header or switches.get("ignore_range") or switches.get("accept_ranges_none"):
        return 200, 0, size
    match = RE_BYTES_RANGE.match(header)
    if not match or (match.group(1) == "" and match.group(2) == ""):
        return 200, 0, size  # malformed, another unit or several ranges: ignored
    first, last = match.group(1), match.group(2)
    if first != "" and last != "" and int(last) < int(first):
        return 200, 0, size  # an invalid range-spec: the whole header is ignored
    if_range = headers.get("If-Range")
    if if_range is not None and not if_range_matches(if_range, etag, last_modified):
        return 200, 0, size
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return 416, 0, 0
        return 206, max(0, size - n), size
    start = int(first)
    if start >= size:
        return 416, 0, 0
    end = size if last == "" else min(size, int(last) + 1)
    return 206, start, end


def serve_download(handler, source, size: int, identity: str, content_type: str, switches: dict,
                   extra_headers=(), truncate_after: int | None = None, chunked: bool = False,
                   delay_s: float = 0.0, on_bytes=None, chunk: int = 64 * 1024, live_switches=None) -> None:
    """Answers a GET/HEAD of a download with range support.

    ``source`` is ``bytes`` or a binary file object (seekable: it is seeked to the range's start and
    only the served range is read), written ``chunk`` bytes at a time with ``delay_s`` between
    writes.  ``identity`` names the object (not the URL): the same identity and ``etag_generation``
    give the same validators.  ``switches`` is the emulator's switches as of the request;
    ``live_switches`` (a callable returning the emulator's current switches; default: ``switches``)
    is read at every chunk for ``throttle_kib_per_s``.

    The request's log entry (``handler._entry``, set when the status line goes out) gets the
    ``download_log_fields`` and then ``served_start``/``served_end`` (exclusive; None for a 416) and
    ``sent`` (object bytes actually written so far).  ``truncate_after`` (default: the
    ``truncate_after_bytes`` switch, 0 = off) cuts the body after that many bytes, counted from the
    range's start, and closes the connection; ``on_bytes(n)`` is called for every write."""
    handler.mark_download()
    live = (lambda: switches) if live_switches is None else live_switches
    replaced = int(switches.get("replaced_size") or 0)
    if replaced:
        # Another object now: the old one's first 64 bytes (so it still looks like its kind of file),
        # every later byte changed, cut (or padded) to its new size.
        if not isinstance(source, (bytes, bytearray, memoryview)):
            source.seek(0)
            source = source.read(min(size, replaced))
        old = bytes(source[:min(size, replaced)])
        source = old[:64] + old[64:].translate(_REPLACED) + b"\x00" * (replaced - len(old))
        size, identity = replaced, f"{identity}+replaced-{replaced}"
    etag, last_modified = validators(identity, switches)
    if switches.get("no_validators"):
        etag = last_modified = None
    status, start, end = plan_range(handler.headers, size, etag, last_modified, switches)
    served = {"served_start": start, "served_end": end} if status != 416 else {}
    ranges = "none" if switches.get("accept_ranges_none") else "bytes"
    common_headers = [(k, v) for k, v in (("ETag", etag), ("Last-Modified", last_modified)) if v is not None]
    common_headers += [("Accept-Ranges", ranges), *extra_headers]
    if status == 416:
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidRange</Code>'
                b"<Message>The requested range is not satisfiable</Message></Error>")
        handler.send_response(416)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Range", f"bytes */{size}")
        handler.send_header("Content-Length", str(len(body)))
        for name, value in common_headers:
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
        return
    handler.send_response(status)
    entry = handler._entry if isinstance(getattr(handler, "_entry", None), dict) else None
    if entry is not None:
        entry.update(served)
    handler.send_header("Content-Type", content_type)
    if status == 206:
        handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
    if chunked:
        handler.send_header("Transfer-Encoding", "chunked")
    else:
        handler.send_header("Content-Length", str(end - start))
    for name, value in common_headers:
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command == "HEAD":
        return
    if truncate_after is None:
        truncate_after = int(switches.get("truncate_after_bytes") or 0) or None
    if not isinstance(source, (bytes, bytearray, memoryview)):
        source.seek(start)
    limit = end - start if truncate_after is None else min(end - start, truncate_after)
    due = time.monotonic()  # when the bytes sent so far may have gone out at the throttled pace
    sent = 0
    while sent < limit:
        n = min(chunk, limit - sent)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = source[start + sent:start + sent + n]
        else:
            data = source.read(n)
        if not data:
            break
        if sent and delay_s > 0:
            time.sleep(delay_s)
        rate = float(live().get("throttle_kib_per_s") or 0) * 1024
        now = time.monotonic()
        if rate > 0:  # each chunk goes out no sooner than the pace allows for it
            due = max(due, now - 0.25) + len(data) / rate
            if due > now:
                time.sleep(due - now)
        else:
            due = now
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), bytes(data)) if chunked else data)
        sent += len(data)
        if entry is not None:
            entry["sent"] = sent
        if on_bytes is not None:
            on_bytes(len(data))
    if sent < end - start:
        handler.close_connection = True
        handler.wfile.flush()
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)  # the client sees a short body
        except OSError:
            pass
        return
    if chunked:
        handler.wfile.write(b"0\r\n\r\n")


# ----- presigned URLs (D1, Dgraph) ---------------------------------------------------------------------
AMZ_DATE = "%Y%m%dT%H%M%SZ"


def s3_error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message></Error>").encode()


def ttl_switch_changes(changes: dict, ttl_key: str = "signed_url_ttl_s", alias: str = "url_ttl"):
    """Validates the signed-URL lifetime switch and its older alias, and mirrors the one given into
    the other so both always read the same.  Returns (changes, problem or None)."""
    given = [k for k in (ttl_key, alias) if k in changes]
    for key in given:
        value = changes[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return changes, f"{key} must be a non-negative number of seconds"
    if len(given) == 2 and changes[ttl_key] != changes[alias]:
        return changes, f"{ttl_key} and {alias} are the same switch: give one of them"
    if given:
        changes = {**changes, ttl_key: changes[given[0]], alias: changes[given[0]]}
    return changes, None


@dataclass
class Presigned:
    target: object      # what the URL serves (the emulator's export task)
    issued: float       # time.time() of issue: X-Amz-Date
    ttl: float          # seconds
    deadline: float     # time.monotonic() after which the URL answers 403 "Request has expired"
    signed: bool        # issued with the X-Amz-* query (checked on use)


class Presigner:
    """Issues and checks presigned download URLs ``http://<host>/__signed/<token>/<tail>``.

    A URL carries, like an S3/R2 presigned GET, ``X-Amz-Algorithm``, ``X-Amz-Credential``,
    ``X-Amz-Date`` (its issue time), ``X-Amz-Expires`` (its lifetime in whole seconds, rounded up),
    ``X-Amz-SignedHeaders=host`` and ``X-Amz-Signature`` (an HMAC of the path, the date and the
    expiry under a secret of the emulator).  On use: an unknown token is 404 ``NoSuchKey``; a
    missing signature 403 ``AccessDenied``; a signature that does not match the path, date and
    expiry (the query was altered) 403 ``SignatureDoesNotMatch``; a URL past its deadline 403
    ``AccessDenied`` "Request has expired".  The deadline is kept exactly (fractional seconds), so a
    test may use a TTL below a second.  Every ``issue`` mints a new token; older URLs stay valid
    until their own deadline.  Not thread-safe: call with the emulator's lock held."""

    def __init__(self, region: str = "auto"):
        self.secret = secrets.token_bytes(32)
        self.region = region
        self.urls: dict[str, Presigned] = {}

    def clear(self):
        self.urls.clear()

    def issue(self, target, host: str, tails, ttl_s: float, query: bool = True) -> list[str]:
        token = secrets.token_urlsafe(24)
        issued = time.time()
        self.urls[token] = Presigned(target, issued, float(ttl_s), time.monotonic() + float(ttl_s), query)
        return [self._url(host, f"/__signed/{token}/{tail}", issued, float(ttl_s), query) for tail in tails]

    def _url(self, host: str, path: str, issued: float, ttl: float, query: bool) -> str:
        if not query:
            return f"http://{host}{path}"
        date = time.strftime(AMZ_DATE, time.gmtime(issued))
        expires = str(max(1, math.ceil(ttl)))
        params = urlencode([("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                            ("X-Amz-Credential", f"EMULATOR/{date[:8]}/{self.region}/s3/aws4_request"),
                            ("X-Amz-Date", date), ("X-Amz-Expires", expires), ("X-Amz-SignedHeaders", "host")])
        return f"http://{host}{path}?{params}&X-Amz-Signature={self._sign(path, date, expires)}"

    def _sign(self, path: str, date: str, expires: str) -> str:
        return hmac.new(self.secret, f"GET\n{path}\n{date}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def lookup(self, token: str) -> Presigned | None:
        return self.urls.get(token)

    def refusal(self, entry: Presigned, path: str, query: str):
        """(status, code, message) if the URL must be refused, else None."""
        if entry.signed:
            params = parse_qs(query, keep_blank_values=True)
            date, expires, signature = (params.get(k, [""])[0] for k in ("X-Amz-Date", "X-Amz-Expires",
                                                                        "X-Amz-Signature"))
            if not signature:
                return 403, "AccessDenied", "Access Denied"
            if not hmac.compare_digest(signature, self._sign(path, date, expires)):
                return 403, "SignatureDoesNotMatch", ("The request signature we calculated does not match "
                                                      "the signature you provided.")
        if time.monotonic() > entry.deadline:
            return 403, "AccessDenied", "Request has expired"
        return None


# ----- injected faults ------------------------------------------------------------------------------
# Every emulator takes the ``faults`` switch: a list of specs, each injecting one fault at one
# provider *step* (the emulator names its steps, e.g. D1 ``export``/``poll``/``download``), once,
# N times or every time.  ``POST /__control {"faults": [...]}`` replaces the list; reset empties it.
# A spec is ``{"step", "fault", "times"?, ...}``; ``times`` is a whole number >= 1 (default 1) or
# null for every matching request, and counts down as faults are injected (the state shows what is
# left).  Faults (which steps take which is up to each emulator, see its ``FAULT_STEPS``):
#   5xx                 answer ``status`` (default 503, 500-599) with the provider's error body;
#                       ``retry_after`` (optional) adds a Retry-After header
#   429                 answer 429 with ``Retry-After: retry_after`` (default 1 second)
#   hang                never answer: hold the request ``hang_s`` seconds (default 90, longer than
#                       any client timeout), then close the connection without a status line
#   delay               answer normally, ``delay_s`` seconds late (default 1)
#   truncate            answer normally but close the connection after ``truncate_at`` body bytes
#                       (default: half the body), with the whole body's Content-Length
#   truncate_chunked    the same with chunked transfer coding (no Content-Length)
#   redirect_html       302 to another origin (``LoginOrigin``, another port) answering any request
#                       200 text/html with a login page
#   redirect_307        307 to the same other origin (``LoginOrigin``), which records whether a body
#                       reached it: a 307 keeps the method and the body (RFC 9110 §15.4.8,
#                       https://www.rfc-editor.org/rfc/rfc9110#section-15.4.8; the Fetch standard,
#                       https://fetch.spec.whatwg.org/#http-redirect-fetch, re-sends the body and
#                       drops only the Authorization header on a cross-origin hop)
#   expire              (signed download URLs) 403 AccessDenied "Request has expired", as S3/R2 does
#   content_encoding_gzip  (downloads) the body gzip-encoded once more and labelled
#                       ``Content-Encoding: gzip``, as a misconfigured CDN would serve it
#   provider_error      the provider's documented failure at that step (``message`` overrides the
#                       emulator's default text, which the completed spec shows)
#   stuck               (the export's status step) the export never completes: every poll answers
#                       "still running"; ``times`` is ignored, the fault lasts until removed
# Each injection is recorded in the emulator's ``faults_injected`` (step, fault, monotonic ``t``
# and wall ``at``).
FAULT_KINDS = ("5xx", "429", "hang", "delay", "truncate", "truncate_chunked", "redirect_html", "expire",
               "content_encoding_gzip", "provider_error", "stuck", "redirect_307")
API_FAULTS = frozenset({"5xx", "429", "hang", "delay", "truncate", "truncate_chunked", "redirect_html"})
DOWNLOAD_FAULTS = API_FAULTS | {"content_encoding_gzip"}
SIGNED_DOWNLOAD_FAULTS = DOWNLOAD_FAULTS | {"expire"}
DEFAULT_HANG_S = 90.0
FAULT_SPEC_KEYS = {"step", "fault", "times", "status", "retry_after", "hang_s", "delay_s", "truncate_at", "message"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def faults_problem(value, steps: dict, messages: dict | None = None):
    """Validates a ``faults`` switch value against ``steps`` (step name -> the set of faults it
    takes).  Returns ``(completed specs, None)`` or ``(None, why)``; completing fills ``times``
    and the defaults of ``status``, ``retry_after``, ``hang_s``, ``delay_s`` and the provider
    error ``message`` (from ``messages``: step -> default text)."""
    if not isinstance(value, list):
        return None, "faults must be a list of {step, fault, times?, ...} objects"
    done = []
    for spec in value:
        if not isinstance(spec, dict):
            return None, "faults must be a list of objects"
        extra = sorted(set(spec) - FAULT_SPEC_KEYS)
        if extra:
            return None, f"faults: unknown key(s) {', '.join(extra)}"
        step, fault = spec.get("step"), spec.get("fault")
        if step not in steps:
            return None, f"faults: step must be one of {', '.join(sorted(steps))} (got {step!r})"
        if fault not in FAULT_KINDS:
            return None, f"faults: fault must be one of {', '.join(FAULT_KINDS)} (got {fault!r})"
        if fault not in steps[step]:
            return None, f"faults: the {step} step does not take {fault} (it takes {', '.join(sorted(steps[step]))})"
        spec = copy.deepcopy(spec)
        times = spec.get("times", 1)
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            return None, "faults: times must be a whole number >= 1, or null for every time"
        spec["times"] = times
        if fault == "5xx":
            status = spec.setdefault("status", 503)
            if isinstance(status, bool) or not isinstance(status, int) or not 500 <= status <= 599:
                return None, "faults: a 5xx status must be from 500 to 599"
        if fault == "429":
            spec.setdefault("retry_after", 1)
        retry_after = spec.get("retry_after")
        if retry_after is not None and not (isinstance(retry_after, str) or (_number(retry_after) and retry_after >= 0)):
            return None, "faults: retry_after must be a number of seconds or a string (an HTTP-date)"
        for key, default in (("hang_s", DEFAULT_HANG_S if fault == "hang" else None),
                             ("delay_s", 1.0 if fault == "delay" else None)):
            if default is not None:
                spec.setdefault(key, default)
            if spec.get(key) is not None and not (_number(spec[key]) and spec[key] >= 0):
                return None, f"faults: {key} must be a number of seconds >= 0"
        cut = spec.get("truncate_at")
        if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or cut < 0):
            return None, "faults: truncate_at must be a whole number of bytes >= 0"
        if fault == "provider_error":
            spec.setdefault("message", (messages or {}).get(step))
            if not isinstance(spec["message"], str) or not spec["message"]:
                return None, "faults: message must be a non-empty string"
        done.append(spec)
    return done, None


def take_fault(switches: dict, step: str, injected: list) -> dict | None:
    """The first fault left for ``step`` (``stuck`` excluded, see ``fault_active``), counted down
    and recorded in ``injected``; None when there is none.  Call with the emulator's lock held."""
    if not step:
        return None
    for spec in switches.get("faults") or []:
        if spec["step"] != step or spec["fault"] == "stuck":
            continue
        if spec["times"] is not None:
            if spec["times"] < 1:
                continue
            spec["times"] -= 1
        injected.append({"step": step, "fault": spec["fault"], "t": time.monotonic(), "at": time.time()})
        return dict(spec)
    return None


def fault_active(switches: dict, step: str, fault: str, injected: list | None = None) -> bool:
    """True while a ``fault`` spec for ``step`` is set (``stuck``: not consumed); recorded in
    ``injected`` when given.  Call with the emulator's lock held."""
    found = any(s["step"] == step and s["fault"] == fault for s in switches.get("faults") or [])
    if found and injected is not None:
        injected.append({"step": step, "fault": fault, "t": time.monotonic(), "at": time.time()})
    return found


def close_without_answer(handler) -> None:
    """Ends the connection as a client sees a dead peer: nothing more is sent."""
    handler.close_connection = True
    try:
        handler.wfile.flush()
    except OSError:
        pass
    try:
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def write_cut_reply(handler, reply: Reply, cut_at: int | None = None, chunked: bool = False,
                    extra_headers=()) -> None:
    """Sends ``reply``'s status line and headers (the whole body's ``Content-Length``, or chunked
    transfer coding), then only ``cut_at`` body bytes (default: half), then closes the connection:
    the client sees a body that ends early."""
    body = reply.body
    cut = len(body) // 2 if cut_at is None else min(cut_at, len(body))
    handler.send_response(reply.status)
    handler.send_header("Content-Type", reply.content_type)
    if chunked:
        handler.send_header("Transfer-Encoding", "chunked")
    else:
        handler.send_header("Content-Length", str(len(body)))
    for name, value in [*handler.reply_headers(), *extra_headers, *reply.headers]:
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD" and cut > 0:
        handler.wfile.write(b"%x\r\n%s\r\n" % (cut, body[:cut]) if chunked else body[:cut])
    close_without_answer(handler)


def gzip_once_more(data: bytes) -> bytes:
    """What a CDN that compresses on the fly sends for ``data`` (already gzip or not)."""
    return gzip.compress(bytes(data), compresslevel=6, mtime=0)


LOGIN_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
              b"<body><form method=\"post\" action=\"/login\"><input name=\"user\"><input name=\"password\" "
              b"type=\"password\"><button>Sign in</button></form></body></html>\n")


class _LoginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "login-origin"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        self.server.origin.record(self.command, self.path, self.headers, len(body))
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(LOGIN_PAGE)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(LOGIN_PAGE)

    do_GET = do_POST = do_HEAD = do_PUT = answer


class LoginOrigin:
    """The other origin a ``redirect_html`` fault sends a client to: a tiny HTTP server on another
    port of 127.0.0.1 answering every request 200 ``text/html`` with a sign-in page (an SSO front
    end).  It records each request's method, path and header *names* (lower-case), so a test can
    tell whether credentials followed the redirect.  One per process, started on first use."""

    _instance = None
    _guard = threading.Lock()

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _LoginHandler)
        self.server.daemon_threads = True
        self.server.origin = self
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="login-origin", daemon=True).start()

    @classmethod
    def get(cls) -> "LoginOrigin":
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def snapshot(cls) -> list:
        """The requests it received so far (none when it never started)."""
        origin = cls._instance
        if origin is None:
            return []
        with origin.lock:
            return [dict(r) for r in origin.requests]

    @classmethod
    def clear(cls) -> None:
        origin = cls._instance
        if origin is not None:
            with origin.lock:
                origin.requests.clear()

    def record(self, method: str, path: str, headers, body_bytes: int = 0) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "t": time.time(), "body_bytes": body_bytes,
                                  "headers": sorted({k.lower() for k in headers.keys()})})

    def url(self, from_path: str) -> str:
        return f"http://127.0.0.1:{self.port}/login?next={quote(from_path, safe='')}"


def answer_fault(handler, spec: dict | None, error_reply) -> bool:
    """Answers the request-level faults: ``5xx``, ``429`` (with ``error_reply(status, message,
    headers)``, the provider's error shape), ``hang``, ``redirect_html`` and ``expire``; sleeps for
    ``delay``.  Returns True when the request is answered (the route must not run)."""
    if spec is None:
        return False
    fault = spec["fault"]
    if fault == "delay":
        time.sleep(float(spec["delay_s"]))
        return False
    headers = [] if spec.get("retry_after") is None else [("Retry-After", f"{spec['retry_after']:g}"
                                                           if _number(spec["retry_after"]) else spec["retry_after"])]
    if fault == "5xx":
        handler.write_reply(error_reply(int(spec["status"]), "Injected server error", headers))
    elif fault == "429":
        handler.write_reply(error_reply(429, "Too many requests", headers))
    elif fault == "hang":
        time.sleep(float(spec["hang_s"]))
        close_without_answer(handler)
    elif fault == "redirect_html":
        target = LoginOrigin.get().url(urlsplit(handler.path).path)
        handler.write_reply(Reply(302, b"", "text/html", [("Location", target)]))
    elif fault == "redirect_307":
        target = LoginOrigin.get().url(urlsplit(handler.path).path)
        handler.write_reply(Reply(307, b"", "text/html", [("Location", target)]))
    elif fault == "expire":
        handler.write_reply(Reply(403, s3_error_body("AccessDenied", "Request has expired"), "application/xml"))
    else:
        return False
    return True


def s3_error_reply(status: int, message: str, headers=()) -> Reply:
    """An object store's error answer for a download (S3/R2 XML)."""
    code = {429: "SlowDown", 503: "SlowDown", 500: "InternalError"}.get(status, "InternalError")
    return Reply(status, s3_error_body(code, message), "application/xml", list(headers))
