"""Tests for the Liferay DXP Cloud backup service emulator (tests/emulators/dxp.py).

The emulator runs as a subprocess on a free port, exactly as the end-to-end tests use it; every
request goes through urllib / http.client to 127.0.0.1.  The 200 MiB test is marked ``slow`` (it
runs by default; deselect it with ``-m "not slow"``).
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest

from emulators.common import get_tolerating_cutoff, start_emulator, stop_emulator

USER = "joe.bloggs@example.com"
PASSWORD = "s3cret:with:colons"
USER_TOKEN = "user-token-0123456789"
MASTER_TOKEN = "master-token-abcdef"
ID_RE = re.compile(r"^dxpcloud-([a-z]+)-(\d{12})$")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never use a proxy


def _slow_mark():
    # Registered markers live in configuration files this suite does not own; silence the
    # "unknown mark" warning instead so `-m "not slow"` still works.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.mark.slow


slow = _slow_mark()


# ----- process helpers ---------------------------------------------------------------------------
class Emu:
    def __init__(self, proc, port, workdir, startup_s):
        self.proc, self.port, self.workdir, self.startup_s = proc, port, workdir, startup_s
        self.base = f"http://127.0.0.1:{port}"

    def stop(self):
        stop_emulator(self.proc, timeout=10)
        self.proc.stdout.close()


def start(workdir, *extra) -> Emu:
    began = time.monotonic()
    proc, port, line = start_emulator("dxp.py", [
        "--workdir", str(workdir), "--user", USER, "--password", PASSWORD,
        "--user-token", USER_TOKEN, "--master-token", MASTER_TOKEN, *extra])
    startup = time.monotonic() - began
    if port is None:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        pytest.fail(f"unexpected first line {line!r}")
    return Emu(proc, port, Path(workdir), startup)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dxp")
    server = start(workdir, "--backups", "3", "--volume-mib", "1", "--database-kib", "64", "--seed", "7")
    server.today = dt.datetime.now(dt.timezone.utc).date()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fresh(request):
    if "emu" in request.fixturenames:
        control(request.getfixturevalue("emu"), "/__control/reset")


# ----- HTTP helpers ------------------------------------------------------------------------------
class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def basic(user=USER, password=PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


USER_AUTH = {"dxpcloud-authorization": f"Bearer {USER_TOKEN}"}
MASTER_AUTH = {"Authorization": f"Bearer {MASTER_TOKEN}"}


def call(emu, path, method="GET", headers=None, data=None, timeout=30) -> Resp:
    req = urllib.request.Request(emu.base + path, data=data, method=method,
                                 headers=basic() if headers is None else headers)
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


def control(emu, path="/__control", body=None) -> dict:
    if path.endswith("/state"):
        resp = call(emu, path, headers={})
    else:
        resp = call(emu, path, "POST", {"Content-Type": "application/json"}, json.dumps(body or {}).encode())
    assert resp.status == 200, resp.body
    return resp.json()


def set_switches(emu, **switches):
    return control(emu, "/__control", switches)


def state(emu) -> dict:
    return control(emu, "/__control/state")


def backups(emu) -> list:
    resp = call(emu, "/backup/list")
    assert resp.status == 200, resp.body
    return resp.json()["backups"]


def newest(emu) -> str:
    return backups(emu)[-1]["backupId"]


def stream(emu, path, method="GET", headers=None, sample=None):
    """Stream a download in 64 KiB reads; return (status, headers, sha256, size)."""
    req = urllib.request.Request(emu.base + path, method=method, headers=basic() if headers is None else headers)
    sha, size = hashlib.sha256(), 0
    with OPENER.open(req, timeout=120) as r:
        while True:
            chunk = r.read(64 * 1024)
            if not chunk:
                break
            sha.update(chunk)
            size += len(chunk)
            if sample is not None:
                sample(size)
        return r.status, r.headers, sha.hexdigest(), size


def raw_get(emu, path, headers=None):
    """A download tolerating a cut-off body; Basic auth unless ``headers`` are given."""
    return get_tolerating_cutoff(f"http://127.0.0.1:{emu.port}{path}", basic() if headers is None else headers, timeout=30)


def multipart(fields) -> tuple[bytes, str]:
    """fields: list of (name, filename-or-None, bytes)."""
    boundary = "----ferry" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, filename, data in fields:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disposition}\r\n".encode())
        if filename:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def upload(emu, fields, headers=None) -> Resp:
    body, ctype = multipart(fields)
    return call(emu, "/backup/upload", "POST", {**(basic() if headers is None else headers), "Content-Type": ctype}, body)


def sha_file(path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def rss_kib(pid, key="VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


# ----- authentication -----------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [basic(), USER_AUTH, MASTER_AUTH], ids=["basic", "user-token", "master-token"])
def test_three_auth_modes_accepted(emu, headers):
    resp = call(emu, "/backup/list", headers=headers)
    assert resp.status == 200
    assert len(resp.json()["backups"]) == 3
    status, _, _, size = stream(emu, f"/backup/download/database/{newest(emu)}", headers=headers)
    assert status == 200 and size > 0


@pytest.mark.parametrize("headers", [
    {},
    basic(password="wrong"),
    basic(user="someone@else.com"),
    {"Authorization": "Basic not-base64!!"},
    {"dxpcloud-authorization": "Bearer wrong"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {USER_TOKEN}"},          # user token in the wrong header
    {"dxpcloud-authorization": f"Bearer {MASTER_TOKEN}"},  # master token in the wrong header
    {"dxpcloud-authorization": USER_TOKEN},               # no Bearer scheme
    {"Authorization": f"Token {MASTER_TOKEN}"},
], ids=["none", "bad-password", "bad-user", "bad-basic", "bad-user-token", "bad-master-token",
        "user-token-as-master", "master-token-as-user", "no-scheme", "wrong-scheme"])
def test_bad_credentials_are_401_json(emu, headers):
    for path in ("/backup/list", f"/backup/download/volume/{newest(emu)}"):
        resp = call(emu, path, headers=headers)
        assert resp.status == 401
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.json() == {"message": "Unauthorized"}


def test_sso_refuses_basic_but_not_tokens(emu):
    set_switches(emu, sso=True)
    for headers in (basic(), basic(password="wrong")):
        resp = call(emu, "/backup/list", headers=headers)
        assert resp.status == 401
        assert resp.json() == {"message": "SSO is enabled: use a user token"}
    assert call(emu, "/backup/list", headers=USER_AUTH).status == 200
    assert call(emu, "/backup/list", headers=MASTER_AUTH).status == 200
    # a valid token wins even when a (refused) Basic header is also sent
    assert call(emu, "/backup/list", headers={**basic(), **USER_AUTH}).status == 200


def test_expired_tokens(emu):
    set_switches(emu, expired_tokens=True)
    for headers in (USER_AUTH, MASTER_AUTH, {"Authorization": "Bearer anything"}):
        resp = call(emu, "/backup/list", headers=headers)
        assert resp.status == 401 and resp.json() == {"message": "Token expired"}
    assert call(emu, "/backup/list", headers=basic()).status == 200
    set_switches(emu, expired_tokens=False)
    assert call(emu, "/backup/list", headers=USER_AUTH).status == 200


# ----- listing -----------------------------------------------------------------------------------
def test_list_ids_dates_and_order(emu):
    items = backups(emu)
    st = state(emu)["backups"]
    assert [b["backupId"] for b in items] == [b["backupId"] for b in st]
    days = []
    for item, info in zip(items, st):
        assert set(item) == {"backupId", "createdAt", "status", "type", "size"}
        match = ID_RE.match(item["backupId"])
        assert match, item["backupId"]
        assert item["backupId"].count("-") == 2
        created = dt.datetime.strptime(item["createdAt"], "%Y-%m-%dT%H:%M:%SZ")
        assert match.group(2) == created.strftime("%Y%m%d%H%M")
        assert item["status"] == "success"
        assert item["type"] in ("Auto", "Manual", "Uploaded")
        assert item["size"] == info["database"]["size"] + info["volume"]["size"]
        days.append(created.date())
    assert days[-1] == emu.today
    assert [(b - a).days for a, b in zip(days, days[1:])] == [1, 1]
    assert len({b["backupId"] for b in items}) == 3


def test_list_shapes(emu):
    ids = [b["backupId"] for b in backups(emu)]
    set_switches(emu, list_shape="array")
    arr = call(emu, "/backup/list").json()
    assert isinstance(arr, list) and [b["backupId"] for b in arr] == ids
    set_switches(emu, list_shape="id_key")
    items = call(emu, "/backup/list").json()["backups"]
    assert [b["id"] for b in items] == ids and all("backupId" not in b for b in items)
    set_switches(emu, list_shape="newest_first")
    items = call(emu, "/backup/list").json()["backups"]
    assert [b["backupId"] for b in items] == ids[::-1]
    set_switches(emu, list_shape="backups")
    assert [b["backupId"] for b in backups(emu)] == ids


def test_malformed_list_counts_down(emu):
    set_switches(emu, malformed_list=2)
    for _ in range(2):
        resp = call(emu, "/backup/list")
        assert resp.status == 200 and resp.body == b"<html>502</html>"
        assert resp.headers["Content-Type"].startswith("text/html")
    assert call(emu, "/backup/list").json()["backups"]
    assert state(emu)["switches"]["malformed_list"] == 0


def test_include_failed_backup(emu):
    ids = [b["backupId"] for b in backups(emu)]
    set_switches(emu, include_failed=True)
    items = backups(emu)
    assert [b["backupId"] for b in items[:-1]] == ids
    failed = items[-1]
    assert failed["status"] == "failed" and ID_RE.match(failed["backupId"])
    assert call(emu, f"/backup/download/database/{failed['backupId']}").status == 404


# ----- downloads ---------------------------------------------------------------------------------
def test_downloads_are_byte_identical_to_state(emu):
    st = state(emu)
    for info in st["backups"]:
        for kind, filename in (("database", "database.gz"), ("volume", "volume.tgz")):
            status, headers, sha, size = stream(emu, f"/backup/download/{kind}/{info['backupId']}")
            assert status == 200
            assert headers["Content-Type"] == "application/gzip"
            assert headers["Content-Disposition"] == f'attachment; filename="{filename}"'
            assert headers["Content-Length"] == str(info[kind]["size"])
            assert headers.get("Content-Encoding") is None and headers.get("Transfer-Encoding") is None
            assert (sha, size) == (info[kind]["sha256"], info[kind]["size"])
            assert sha_file(info[kind]["path"]) == sha and os.path.getsize(info[kind]["path"]) == size
    after = state(emu)
    assert after["downloads"] == 6
    assert after["bytes_sent"] == sum(b["database"]["size"] + b["volume"]["size"] for b in st["backups"])
    last = after["requests"][-1]
    assert {k: last[k] for k in ("method", "path", "status")} == {
        "method": "GET", "path": f"/backup/download/volume/{st['backups'][-1]['backupId']}", "status": 200}
    assert (last["range"], last["served_start"], last["served_end"]) == (None, 0, st["backups"][-1]["volume"]["size"])


def test_database_is_a_mysqldump_gzip(emu):
    ident = newest(emu)
    resp = call(emu, f"/backup/download/database/{ident}")
    assert resp.body[:2] == b"\x1f\x8b"
    text = gzip.decompress(resp.body).decode()
    header = ["-- Current Database: `lportal`",
              "/*!40000 DROP DATABASE IF EXISTS `lportal`*/;",
              "CREATE DATABASE /*!32312 IF NOT EXISTS*/ `lportal` /*!40100 DEFAULT CHARACTER SET utf8 */;",
              "USE `lportal`;"]
    lines = text.splitlines()
    positions = [lines.index(line) for line in header]
    assert positions == sorted(positions)
    first_create = next(i for i, line in enumerate(lines) if line.startswith("CREATE TABLE"))
    assert positions[-1] < first_create
    tables = re.findall(r"^CREATE TABLE `([^`]+)`", text, re.M)
    assert len(tables) >= 4 and all(re.fullmatch(r"[A-Z][A-Za-z]*_?", t) for t in tables)
    assert any(t[1:] != t[1:].lower() for t in tables)  # PascalCase, not just capitalised
    for table in tables:
        assert f"INSERT INTO `{table}` VALUES (" in text
    assert 60 * 1024 <= len(text.encode()) <= 72 * 1024  # --database-kib 64
    assert "DROP DATABASE" in text and "CREATE DATABASE" in text


def test_volume_is_a_document_library_tgz(emu):
    items = state(emu)["backups"]
    for info in items:
        resp = call(emu, f"/backup/download/volume/{info['backupId']}")
        with tarfile.open(fileobj=io.BytesIO(resp.body), mode="r:gz") as tar:
            members = tar.getmembers()
        names = [m.name.rstrip("/") for m in members]
        assert "document_library" in names and all(n.startswith("document_library") for n in names)
        files = [m for m in members if m.isfile()]
        assert len(files) >= 3
        assert all((m.uid, m.gid) == (1000, 1000) for m in members)
    newest_size = items[-1]["volume"]["size"]
    assert abs(newest_size - 1024 * 1024) < 32 * 1024  # --volume-mib 1
    assert all(b["volume"]["size"] < 64 * 1024 for b in items[:-1])  # older backups stay tiny


def test_database_tgz_mode(emu):
    ident = newest(emu)
    info = state(emu)["backups"][-1]
    plain = call(emu, f"/backup/download/database/{ident}").body
    set_switches(emu, database_tgz=True)
    status, headers, sha, size = stream(emu, f"/backup/download/database/{ident}")
    assert headers["Content-Disposition"] == 'attachment; filename="database.tgz"'
    assert (sha, size) == (info["database_tgz"]["sha256"], info["database_tgz"]["size"])
    body = call(emu, f"/backup/download/database/{ident}").body
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert tar.getnames() == ["database.gz"]
        assert tar.extractfile("database.gz").read() == plain


def test_chunked_mode_has_no_content_length(emu):
    info = state(emu)["backups"][-1]
    set_switches(emu, chunked=True)
    for kind in ("database", "volume"):
        status, headers, sha, size = stream(emu, f"/backup/download/{kind}/{info['backupId']}")
        assert status == 200
        assert headers.get("Content-Length") is None
        assert headers["Transfer-Encoding"] == "chunked"
        assert headers.get("Content-Encoding") is None
        assert (sha, size) == (info[kind]["sha256"], info[kind]["size"])
    # the keep-alive connection stays usable after a chunked body
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=30)
    for _ in range(2):
        conn.request("GET", f"/backup/download/database/{info['backupId']}", headers=basic())
        resp = conn.getresponse()
        assert hashlib.sha256(resp.read()).hexdigest() == info["database"]["sha256"]
    conn.close()


def test_unknown_id_is_404(emu):
    for kind in ("database", "volume"):
        resp = call(emu, f"/backup/download/{kind}/dxpcloud-nosuchbackup-202001010000")
        assert resp.status == 404 and resp.json() == {"message": "Backup not found"}
    assert call(emu, "/backup/download/logs/x").status == 404
    assert call(emu, "/nothing/here").status == 404


def test_head_gives_headers_only(emu):
    info = state(emu)["backups"][-1]
    resp = call(emu, f"/backup/download/volume/{info['backupId']}", method="HEAD")
    assert resp.status == 200 and resp.body == b""
    assert resp.headers["Content-Length"] == str(info["volume"]["size"])
    assert state(emu)["downloads"] == 0


def test_post_download_only_with_allow_post(emu):
    info = state(emu)["backups"][-1]
    path = f"/backup/download/database/{info['backupId']}"
    resp = call(emu, path, method="POST", headers=MASTER_AUTH, data=b"")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    assert "message" in resp.json()
    set_switches(emu, allow_post=True)
    status, headers, sha, size = stream(emu, path, method="POST", headers=MASTER_AUTH)
    assert status == 200 and sha == info["database"]["sha256"]
    assert call(emu, path, method="PUT", data=b"x").status == 405


def test_rest_disabled(emu):
    set_switches(emu, rest_disabled=True)
    ident = state(emu)["backups"][-1]["backupId"]
    expected = {"message": "The backup REST API is not available from backup service 5.9.0; use the lcp CLI"}
    for method, path in (("GET", "/backup/list"), ("GET", f"/backup/download/database/{ident}"),
                         ("GET", f"/backup/download/volume/{ident}"), ("POST", "/backup/upload")):
        for headers in (basic(), USER_AUTH, {}):
            resp = call(emu, path, method, headers=headers, data=b"" if method == "POST" else None)
            assert resp.status == 404 and resp.json() == expected


def test_fail_next_503_and_429_with_retry_after(emu):
    ident = newest(emu)
    set_switches(emu, fail_next=[{"status": 503, "retry_after": "1", "body": None},
                                 {"status": 429},
                                 {"status": 503, "retry_after": None, "body": "<html>upstream</html>"},
                                 {"status": 429, "retry_after": None}])
    first = call(emu, "/backup/list")
    assert first.status == 503 and first.headers["Retry-After"] == "1" and "message" in first.json()
    second = call(emu, f"/backup/download/volume/{ident}")
    assert second.status == 429 and second.headers["Retry-After"] == "1"
    third = call(emu, "/backup/list")
    assert third.status == 503 and third.body == b"<html>upstream</html>" and third.headers.get("Retry-After") is None
    fourth = call(emu, "/backup/list")
    assert fourth.status == 429 and fourth.headers.get("Retry-After") is None
    assert call(emu, "/backup/list").status == 200
    assert state(emu)["switches"]["fail_next"] == []
    statuses = [r["status"] for r in state(emu)["requests"]]
    assert statuses[-5:] == [503, 429, 503, 429, 200]


def test_truncate_after_gives_a_short_body_once(emu):
    info = state(emu)["backups"][-1]
    path = f"/backup/download/volume/{info['backupId']}"
    set_switches(emu, truncate_after=100_000)
    resp, body, complete = raw_get(emu, path)
    assert resp.status == 200 and resp.getheader("Content-Length") == str(info["volume"]["size"])
    assert not complete and len(body) == 100_000
    assert state(emu)["switches"]["truncate_after"] is None
    resp, body, complete = raw_get(emu, path)
    assert complete and hashlib.sha256(body).hexdigest() == info["volume"]["sha256"]


def test_truncate_after_in_chunked_mode(emu):
    info = state(emu)["backups"][-1]
    set_switches(emu, chunked=True, truncate_after=70_000)
    resp, body, complete = raw_get(emu, f"/backup/download/volume/{info['backupId']}")
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert not complete and len(body) <= 70_000
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        set_switches(emu, truncate_after=10)
        stream(emu, f"/backup/download/database/{info['backupId']}")


def test_download_delay_slows_it(emu):
    path = f"/backup/download/volume/{newest(emu)}"  # ~1 MiB = 16 chunks of 64 KiB
    began = time.monotonic()
    stream(emu, path)
    fast = time.monotonic() - began
    set_switches(emu, download_delay_ms=40)
    began = time.monotonic()
    status, _, sha, _ = stream(emu, path)
    slow_s = time.monotonic() - began
    assert sha == state(emu)["backups"][-1]["volume"]["sha256"]
    assert slow_s >= 15 * 0.040 and slow_s > fast + 0.3


# ----- upload ------------------------------------------------------------------------------------
def test_upload_rules(emu):
    db = gzip.compress(b"-- uploaded dump\n")
    vol = b"\x1f\x8b fake volume " + os.urandom(100_000) + b"\r\n--not-a-boundary"
    # missing fields and wrong content types are refused without starting the 60 s window
    for fields in ([("database", "database.gz", db)], [("volume", "volume.tgz", vol)],
                   [("database", None, db), ("volume", "volume.tgz", vol)], []):
        resp = upload(emu, fields)
        assert resp.status == 400, fields
        assert "message" in resp.json()
    resp = call(emu, "/backup/upload", "POST", {**basic(), "Content-Type": "application/json"}, b"{}")
    assert resp.status == 400
    assert upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)], headers={}).status == 401
    assert call(emu, "/backup/upload").status == 405

    resp = upload(emu, [("note", None, b"hello"), ("database", "database.gz", db), ("volume", "volume.tgz", vol)])
    assert resp.status == 200, resp.body
    items = backups(emu)
    assert len(items) == 4
    new = items[-1]
    assert new["type"] == "Uploaded" and ID_RE.match(new["backupId"]) and new["size"] == len(db) + len(vol)
    assert resp.json()["backupId"] == new["backupId"]
    assert call(emu, f"/backup/download/database/{new['backupId']}").body == db
    assert call(emu, f"/backup/download/volume/{new['backupId']}").body == vol
    info = state(emu)["backups"][-1]
    assert info["volume"]["sha256"] == hashlib.sha256(vol).hexdigest()

    again = upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)])
    assert again.status == 429
    assert "minute" in again.json()["message"]
    assert 1 <= int(again.headers["Retry-After"]) <= 60
    assert len(backups(emu)) == 4

    # reset drops the uploaded backup (and its files) and the 60 s window
    control(emu, "/__control/reset")
    assert len(backups(emu)) == 3
    assert not os.path.exists(info["volume"]["path"])
    assert upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)]).status == 200


def test_upload_state_shows_how_it_came_and_the_interval_switch_shortens_the_minute(emu):
    db = gzip.compress(b"-- uploaded dump\n")
    vol = os.urandom(50_000)
    set_switches(emu, upload_interval_s=1)
    assert upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)]).status == 200
    info = state(emu)["backups"][-1]
    body, _ = multipart([("database", "database.gz", db), ("volume", "volume.tgz", vol)])
    assert info["type"] == "Uploaded"
    assert info["upload"] == {"content_length": len(body), "chunked": False,
                              "filenames": {"database": "database.gz", "volume": "volume.tgz"}}
    assert info["database"]["sha256"] == hashlib.sha256(db).hexdigest()
    assert sha_file(info["volume"]["path"]) == hashlib.sha256(vol).hexdigest()
    again = upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)])
    assert again.status == 429 and again.headers["Retry-After"] == "1"
    time.sleep(1.1)
    assert upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)]).status == 200


def test_upload_fault_refuses_with_the_services_message_and_takes_nothing(emu):
    db, vol = gzip.compress(b"x"), b"v" * 1000
    set_switches(emu, faults=[{"step": "upload", "fault": "provider_error", "times": 1}])
    resp = upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)])
    assert resp.status == 400 and "GCS enabled" in resp.json()["message"]
    assert state(emu)["requests"][-1]["step"] == "upload"
    assert len(backups(emu)) == 3
    # Nothing was taken, so the minute did not start.
    assert upload(emu, [("database", "database.gz", db), ("volume", "volume.tgz", vol)]).status == 200


# ----- control API -------------------------------------------------------------------------------
def test_control_api(emu):
    defaults = state(emu)["switches"]
    assert defaults == {"sso": False, "list_shape": "backups", "malformed_list": 0, "chunked": False,
                        "allow_post": False, "rest_disabled": False, "fail_next": [], "download_delay_ms": 0,
                        "truncate_after": None, "expired_tokens": False, "database_tgz": False,
                        "include_failed": False, "truncate_after_bytes": 0, "html_downloads": False, "ignore_range": False,
                        "etag_generation": 0, "throttle_kib_per_s": 0, "accept_ranges_none": False, "no_validators": False,
                        "replaced_size": 0, "upload_interval_s": 60.0, "faults": []}
    for bad in ({"nope": 1}, {"sso": "yes"}, {"list_shape": "xml"}, {"malformed_list": -1},
                {"truncate_after": "10"}, {"ignore_range": 1}, {"etag_generation": -1}, {"throttle_kib_per_s": "x"},
                {"truncate_after_bytes": None}, {"replaced_size": -1}, {"no_validators": 1}, {"upload_interval_s": -1}, {"fail_next": {"status": 503}}, {"fail_next": [{"status": 42}]}):
        resp = call(emu, "/__control", "POST", {"Content-Type": "application/json"}, json.dumps(bad).encode())
        assert resp.status == 400, bad
    assert state(emu)["switches"] == defaults
    set_switches(emu, sso=True, list_shape="array", download_delay_ms=5)
    assert state(emu)["switches"]["sso"] is True
    call(emu, "/backup/list", headers=USER_AUTH)
    st = state(emu)
    assert {k: v for k, v in st["requests"][-1].items() if k != "t"} == \
        {"method": "GET", "path": "/backup/list", "status": 200, "step": "list"}
    control(emu, "/__control/reset")
    st = state(emu)
    assert st["switches"] == defaults and st["requests"] == [] and st["downloads"] == 0 and st["bytes_sent"] == 0
    assert len(st["backups"]) == 3


def test_second_start_reuses_cached_artifacts(emu):
    before = state(emu)["backups"]
    mtimes = {b[k]["path"]: os.stat(b[k]["path"]).st_mtime_ns for b in before for k in ("database", "volume")}
    other = start(emu.workdir, "--backups", "3", "--volume-mib", "1", "--database-kib", "64", "--seed", "7")
    try:
        after = state(other)["backups"]
    finally:
        other.stop()
    assert [(b["backupId"], b["database"], b["volume"]) for b in after] == \
        [(b["backupId"], b["database"], b["volume"]) for b in before]
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    # a different seed gives different backups
    third = start(emu.workdir, "--backups", "2", "--volume-mib", "0.25", "--database-kib", "16", "--seed", "8")
    try:
        ids = {b["backupId"] for b in state(third)["backups"]}
    finally:
        third.stop()
    assert len(ids) == 2 and not ids & {b["backupId"] for b in before}


# ----- 200 MiB -----------------------------------------------------------------------------------
@slow
def test_200_mib_volume_builds_fast_and_streams_with_flat_memory(tmp_path):
    args = ("--backups", "2", "--volume-mib", "200", "--database-kib", "256")
    server = start(tmp_path, *args)
    try:
        assert server.startup_s < 45, f"start-up took {server.startup_s:.1f} s"
        info = state(server)["backups"][-1]
        assert abs(info["volume"]["size"] - 200 * 1024 * 1024) < 256 * 1024
        pid = server.proc.pid
        baseline = rss_kib(pid)
        samples = []

        def sample(received):
            if received % (4 * 1024 * 1024) < 64 * 1024:
                samples.append(rss_kib(pid))

        status, headers, sha, size = stream(server, f"/backup/download/volume/{info['backupId']}", sample=sample)
        assert status == 200 and headers["Content-Length"] == str(size)
        assert (sha, size) == (info["volume"]["sha256"], info["volume"]["size"])
        assert len(samples) >= 40
        assert max(samples) < 100 * 1024, f"RSS peaked at {max(samples)} KiB"
        assert max(samples) - baseline < 32 * 1024, f"RSS grew from {baseline} to {max(samples)} KiB"
        assert rss_kib(pid, "VmHWM") < 100 * 1024  # the build itself stayed flat too
        # A range near the end is served straight from there (a seek), quickly and exactly.
        began = time.monotonic()
        tail = call(server, f"/backup/download/volume/{info['backupId']}",
                    headers={**basic(), "Range": f"bytes={size - 1_000_000}-"})
        assert tail.status == 206 and time.monotonic() - began < 2
        with open(info["volume"]["path"], "rb") as src:
            src.seek(size - 1_000_000)
            assert tail.body == src.read()
    finally:
        server.stop()
    print(f"200 MiB start-up: {server.startup_s:.1f} s")

    again = start(tmp_path, *args)
    try:
        assert again.startup_s < 5, f"cached start-up took {again.startup_s:.1f} s"
        assert state(again)["backups"][-1]["volume"] == info["volume"]
    finally:
        again.stop()


# ----- byte ranges --------------------------------------------------------------------------------
def test_downloads_serve_ranges_if_range_416_and_switches(emu):
    backup_id = newest(emu)
    path = f"/backup/download/volume/{backup_id}"
    whole = call(emu, path, headers=basic())
    etag, size = whole.headers["ETag"], len(whole.body)
    assert whole.headers["Accept-Ranges"] == "bytes" and whole.headers["Last-Modified"]
    mid = size // 3
    part = call(emu, path, headers={**basic(), "Range": f"bytes={mid}-", "If-Range": etag})
    assert part.status == 206 and part.body == whole.body[mid:]
    assert part.headers["Content-Range"] == f"bytes {mid}-{size - 1}/{size}"
    assert part.headers["Content-Length"] == str(size - mid)
    bounded = call(emu, path, headers={**basic(), "Range": "bytes=10-19"})
    assert bounded.status == 206 and bounded.body == whole.body[10:20]
    past = call(emu, path, headers={**basic(), "Range": f"bytes={size}-"})
    assert past.status == 416 and past.headers["Content-Range"] == f"bytes */{size}"
    assert call(emu, path, headers={**basic(), "Range": "bytes=1-2,5-6"}).status == 200, "multi-range is ignored"
    set_switches(emu, etag_generation=1)
    replaced = call(emu, path, headers={**basic(), "Range": f"bytes={mid}-", "If-Range": etag})
    assert replaced.status == 200 and replaced.body == whole.body and replaced.headers["ETag"] != etag
    set_switches(emu, ignore_range=True)
    assert call(emu, path, headers={**basic(), "Range": f"bytes={mid}-"}).status == 200
    log = [r for r in state(emu)["requests"] if r["path"] == path]
    assert (log[1]["range"], log[1]["if_range"], log[1]["served_start"], log[1]["served_end"], log[1]["sent"]) == (
        f"bytes={mid}-", etag, mid, size, size - mid)


def test_truncate_after_bytes_cuts_every_download_and_throttle_paces_it(emu):
    path = f"/backup/download/database/{newest(emu)}"
    set_switches(emu, truncate_after_bytes=1000)
    for _ in range(2):
        with pytest.raises((http.client.IncompleteRead, urllib.error.URLError, ConnectionError)):
            call(emu, path, headers=basic())
    set_switches(emu, truncate_after_bytes=0, throttle_kib_per_s=64)
    began = time.monotonic()
    body = call(emu, path, headers=basic()).body
    assert time.monotonic() - began >= len(body) / (64 * 1024) * 0.8


def test_range_responses_carry_validators_and_ranges_work_in_chunked_mode(emu):
    info = state(emu)["backups"][-1]
    path = f"/backup/download/volume/{info['backupId']}"
    whole = call(emu, path)
    size = info["volume"]["size"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', whole.headers["ETag"])
    mid = size // 2 + 1
    part = call(emu, path, headers={**basic(), "Range": f"bytes={mid}-", "If-Range": whole.headers["Last-Modified"]})
    assert part.status == 206 and part.body == whole.body[mid:]
    for name in ("ETag", "Last-Modified", "Accept-Ranges", "Content-Disposition"):
        assert part.headers[name] == whole.headers[name], name
    suffix = call(emu, path, headers={**basic(), "Range": "bytes=-100"})
    assert suffix.status == 206 and suffix.body == whole.body[-100:]
    assert suffix.headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"
    set_switches(emu, chunked=True)
    resp, body, complete = raw_get(emu, path, {**basic(), "Range": f"bytes={mid}-"})
    assert resp.status == 206 and resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Range") == f"bytes {mid}-{size - 1}/{size}"
    assert complete and body == whole.body[mid:]


def test_truncate_after_bytes_counts_from_the_start_of_the_range(emu):
    info = state(emu)["backups"][-1]
    path = f"/backup/download/volume/{info['backupId']}"
    whole = call(emu, path).body
    set_switches(emu, truncate_after_bytes=70_000)
    start = 300_001
    resp, body, complete = raw_get(emu, path, {**basic(), "Range": f"bytes={start}-"})
    assert resp.status == 206 and resp.getheader("Content-Length") == str(len(whole) - start)
    assert not complete and body == whole[start:start + 70_000]
    last = state(emu)["requests"][-1]
    assert (last["served_start"], last["served_end"], last["sent"]) == (start, len(whole), 70_000)
    set_switches(emu, truncate_after_bytes=0, truncate_after=10)  # the one-shot switch wins once
    resp, body, complete = raw_get(emu, path, {**basic(), "Range": f"bytes={start}-"})
    assert not complete and body == whole[start:start + 10]
    assert raw_get(emu, path, {**basic(), "Range": f"bytes={start}-"})[2]


def test_throttle_is_read_live_so_a_slow_download_can_be_sped_up(emu):
    import threading
    path = f"/backup/download/volume/{newest(emu)}"  # ~1 MiB: 16 s at 64 KiB/s
    set_switches(emu, throttle_kib_per_s=64)
    done = {}

    def fetch():
        began = time.monotonic()
        done["body"] = call(emu, path).body
        done["took"] = time.monotonic() - began

    thread = threading.Thread(target=fetch)
    thread.start()
    time.sleep(1.3)  # each 64 KiB chunk goes out once its second at 64 KiB/s is over
    assert 0 < state(emu)["requests"][-1]["sent"] <= 128 * 1024, "paced while throttled"
    set_switches(emu, throttle_kib_per_s=0)
    thread.join(timeout=10)
    assert not thread.is_alive() and done["took"] < 5
    assert hashlib.sha256(done["body"]).hexdigest() == state(emu)["backups"][-1]["volume"]["sha256"]


def test_refused_downloads_are_logged_with_their_range_headers_and_no_span(emu):
    backup_id = newest(emu)
    call(emu, f"/backup/download/volume/{backup_id}", headers={"Range": "bytes=5-"})  # no credentials
    call(emu, "/backup/download/volume/dxpcloud-nope-202401010000", headers={**basic(), "Range": "bytes=6-",
                                                                           "If-Range": '"x"'})
    call(emu, "/backup/list")
    log = state(emu)["requests"]
    assert [(r["status"], r["range"], r["if_range"], r["served_start"], r["served_end"], r["sent"])
            for r in log[-3:-1]] == [(401, "bytes=5-", None, None, None, 0), (404, "bytes=6-", '"x"', None, None, 0)]
    assert {k: v for k, v in log[-1].items() if k != "t"} == {"method": "GET", "path": "/backup/list", "status": 200,
                                                          "step": "list"}, "other requests log no range fields"


class _FakeHandler:
    """Just enough of a request handler for common.serve_download."""

    def __init__(self, headers, command="GET"):
        self.headers, self.command, self._entry = headers, command, {}
        self.status, self.sent_headers, self.wfile = None, {}, io.BytesIO()

    def mark_download(self):
        pass

    def send_response(self, code):
        self.status = code

    def send_header(self, name, value):
        self.sent_headers[name] = value

    def end_headers(self):
        pass


class _SpyFile(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.seeks, self.reads = [], []

    def seek(self, pos, whence=0):
        self.seeks.append(pos)
        return super().seek(pos, whence)

    def read(self, n=-1):
        self.reads.append(n)
        return super().read(n)


def test_serve_download_seeks_to_the_range_and_reads_only_it_in_bounded_chunks():
    from emulators.common import serve_download
    data = os.urandom(1_000_000)
    src = _SpyFile(data)
    handler = _FakeHandler({"Range": "bytes=900000-"})
    serve_download(handler, src, len(data), "x/volume.tgz", "application/gzip", {"etag_generation": 0})
    assert handler.status == 206 and handler.wfile.getvalue() == data[900_000:]
    assert src.seeks == [900_000] and sum(src.reads) == 100_000 and max(src.reads) <= 64 * 1024
    assert handler.sent_headers["Content-Range"] == f"bytes 900000-999999/{len(data)}"
    assert handler._entry == {"served_start": 900_000, "served_end": len(data), "sent": 100_000}
