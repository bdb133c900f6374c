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

import re
import signal
import subprocess
import sys
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
