"""HTTP plumbing shared by the provider emulators in this folder, and the helpers their tests use
to run one as a subprocess.  Standard library only.

The emulators (``d1.py``, ``dgraph.py``, ``aura.py``, ``dxp.py``) import this module as ``common``
(each puts this folder on ``sys.path`` first, so that works both when run as a script and when
imported as ``emulators.<name>``); the tests import it as ``emulators.common``.

* ``Reply``: one HTTP answer (status, body, content type, extra headers).
* ``BaseHandler``: the request-handler plumbing (HTTP/1.1, no access log, the status code sent is
  kept in ``self._status`` and the request logged as that status line goes out, ``read_body`` with chunked decoding, ``write_reply`` for a ``Reply``,
  ``host()``).  An emulator's ``Handler`` adds ``server_version``, ``dispatch`` and its routes.
* ``bind_server``: the ``ThreadingHTTPServer`` around a handler bound to one emulator.
* ``serve_main``: the command-line serve loop: ``READY <port>`` on stdout, then serve until
  SIGTERM or Ctrl-C.
* ``start_emulator`` / ``stop_emulator``: run an emulator script on a free port for a test.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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


# ----- byte ranges on download URLs -----------------------------------------------------------------
# Every download URL Ferry copies from (D1's and Dgraph's signed URLs, DXP's downloads) serves
# ranges the way an object store does (RFC 9110): ``Range: bytes=N-`` / ``bytes=N-M`` -> 206 with
# ``Content-Range``; a start at or past the end -> 416 ``bytes */TOTAL``; a malformed or multi-range
# header is ignored (200, whole body); ``If-Range`` with a validator that does not match -> 200,
# whole body.  Switches each emulator accepts:
#   ignore_range (bool)        always 200 with the whole body (a server without range support)
#   etag_generation (int)      part of ETag and Last-Modified: bump it and the object looks replaced
#   throttle_kib_per_s (num)   pace every download (0: unlimited)
RANGE_SWITCHES = {"ignore_range": False, "etag_generation": 0, "throttle_kib_per_s": 0}
RE_BYTES_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_EPOCH = 1_795_000_000  # a fixed Last-Modified base (Nov 2026)


def range_switch_problem(key: str, value):
    """Why a range switch value is invalid, or None (also None for keys that are not range switches)."""
    if key == "ignore_range" and not isinstance(value, bool):
        return "ignore_range must be a boolean"
    if key == "etag_generation" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        return "etag_generation must be a non-negative integer"
    if key == "throttle_kib_per_s" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        return "throttle_kib_per_s must be a non-negative number"
    return None


def validators(identity: str, switches: dict) -> tuple[str, str]:
    """The (ETag, Last-Modified) of an object named by ``identity`` under the current switches."""
    from email.utils import formatdate
    generation = int(switches.get("etag_generation") or 0)
    digest = hashlib.sha256(f"{identity}:{generation}".encode()).hexdigest()[:32]
    return f'"{digest}"', formatdate(_EPOCH + generation * 3600, usegmt=True)


def plan_range(headers, size: int, etag: str, last_modified: str, switches: dict):
    """(status, start, end) to serve: 200 whole, 206 [start, end), or 416."""
    header = headers.get("Range")
    if not header or switches.get("ignore_range"):
        return 200, 0, size
    if_range = headers.get("If-Range")
    if if_range is not None and if_range.strip() not in (etag, last_modified):
        return 200, 0, size
    match = RE_BYTES_RANGE.match(header)
    if not match or (match.group(1) == "" and match.group(2) == ""):
        return 200, 0, size
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            return 416, 0, 0
        return 206, max(0, size - n), size
    start = int(first)
    if start >= size:
        return 416, 0, 0
    end = size if last == "" else min(size, int(last) + 1)
    if end <= start:
        return 200, 0, size
    return 206, start, end


def serve_download(handler, source, size: int, identity: str, content_type: str, switches: dict,
                   extra_headers=(), truncate_after: int | None = None,
                   chunked: bool = False, delay_s: float = 0.0, on_bytes=None, chunk: int = 64 * 1024) -> None:
    """Answers a GET/HEAD of a download with range support.

    ``source`` is ``bytes`` or a binary file object (seekable; only the served range is read),
    written ``chunk`` bytes at a time with ``delay_s`` between writes.
    The request's log entry (``handler._entry``, set when the status line goes out by emulators
    whose ``record_request`` returns it) gets ``range``, ``if_range``, ``accept_encoding``,
    ``served_start``, ``served_end`` (exclusive) and ``sent`` (bytes actually written).  ``truncate_after`` cuts the body after that
    many bytes (from the range's start) and closes the connection."""
    etag, last_modified = validators(identity, switches)
    status, start, end = plan_range(handler.headers, size, etag, last_modified, switches)
    fields = dict(range=handler.headers.get("Range"), if_range=handler.headers.get("If-Range"),
                  accept_encoding=handler.headers.get("Accept-Encoding"),
                  served_start=start if status != 416 else None, served_end=end if status != 416 else None, sent=0)

    def logged() -> dict | None:
        entry = getattr(handler, "_entry", None)
        if isinstance(entry, dict):
            entry.update(fields)
            return entry
        return None
    common_headers = [("ETag", etag), ("Last-Modified", last_modified), ("Accept-Ranges", "bytes"), *extra_headers]
    if status == 416:
        body = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidRange</Code>" \
               b"<Message>The requested range is not satisfiable</Message></Error>"
        handler.send_response(416)
        logged()
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
    entry = logged()
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
    if not isinstance(source, (bytes, bytearray)):
        source.seek(start)
    limit = end - start if truncate_after is None else min(end - start, truncate_after)
    rate = float(switches.get("throttle_kib_per_s") or 0) * 1024
    began = time.monotonic()
    sent = 0
    while sent < limit:
        n = min(chunk, limit - sent)
        data = source[start + sent:start + sent + n] if isinstance(source, (bytes, bytearray)) else source.read(n)
        if not data:
            break
        if sent and delay_s > 0:
            time.sleep(delay_s)
        if rate > 0:  # each chunk goes out no sooner than the pace allows for it
            ahead = (sent + len(data)) / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        sent += len(data)
        if entry is not None:
            entry["sent"] = sent
        if on_bytes is not None:
            on_bytes(len(data))
    if sent < end - start:
        handler.close_connection = True
        handler.wfile.flush()
        try:
            handler.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees a short body
        except OSError:
            pass
        return
    if chunked:
        handler.wfile.write(b"0\r\n\r\n")
