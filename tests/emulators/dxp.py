#!/usr/bin/env python3
"""Local emulator of the Liferay DXP Cloud (Liferay Cloud) backup service (provider-apis.md §4, §6.4).

Run::

    python3 tests/emulators/dxp.py --port 0 --workdir DIR --user EMAIL --password PW \\
        --user-token UT --master-token MT [--backups 3] [--volume-mib 2] [--database-kib 64] [--seed 1]

It builds (or reuses from ``DIR``) the backup artifacts, then prints one line ``READY <port>`` once it
listens on 127.0.0.1.  Standard library only.

Big volumes: ``--volume-mib N`` (a float) makes the newest backup's ``volume.tgz`` about N MiB
(within ~16 KiB), e.g. ``--volume-mib 1024`` for 1 GiB or ``--volume-mib 6144`` for 6 GiB.  It is
generated once in bounded memory (deterministic pseudo-random data, 1 MiB at a time, in a tar
member gzip-compressed at level 0, i.e. stored deflate blocks) and cached in ``DIR`` under a name
holding the seed and size, so later starts with the same options reuse it at once.  Building
takes about 4-5 s per GiB on one core (measured: 1 GiB 4.4 s, 6 GiB 27 s, peak RSS ~31 MB) and
needs that much free disk.  Downloads stream it from disk 64 KiB at a time (RSS stays flat) and a
range request seeks straight to its start.

What is emulated
----------------
* Authentication, any one of: HTTP Basic ``EMAIL:PW``; ``dxpcloud-authorization: Bearer <UT>`` (the
  user token, backup service >= 3.2.0); ``Authorization: Bearer <MT>`` (the project master token,
  < 3.2.0).  Anything else answers 401 ``{"message":"Unauthorized"}``.
* ``GET /backup/list`` (undocumented, [3P]) -> ``{"backups":[{backupId, createdAt, status, type, size}]}``
  with the newest last.
* ``GET /backup/download/database/{id}`` -> the stored ``database.gz`` bytes (gzip of a mysqldump made
  with ``--databases --add-drop-database lportal``), ``GET /backup/download/volume/{id}`` -> the stored
  ``volume.tgz`` bytes (tar+gzip of ``document_library/``).  Served as-is (no ``Content-Encoding``),
  streamed from disk in 64 KiB chunks, ``Content-Type: application/gzip``,
  ``Content-Disposition: attachment; filename="database.gz"`` / ``"volume.tgz"``.
* ``POST /backup/upload`` -> ``multipart/form-data`` with both ``database`` and ``volume`` file fields,
  at most one accepted upload per 60 s (``upload_interval_s`` shortens it for tests; a concurrent
  one is refused the same way: 429 with ``Retry-After``); the upload is streamed to disk and becomes
  a backup of type ``Uploaded``, whose state entry also has ``upload``: ``content_length`` (null
  when chunked), ``chunked`` and the parts' ``filenames``.
* Backup ids ``dxpcloud-<18 lower-case letters>-<YYYYMMDDHHmm>``, one ``Auto`` backup a day at a time
  inside the default ``[5-55][0-1] * * *`` UTC schedule, the newest today.

Documented quirks reproduced (as switches)
------------------------------------------
* SSO mode (``sso``): Basic is refused, tokens still work.
* Missing ``Content-Length`` (``chunked``), POST on the download paths (``allow_post``, older scripts).
* The backup service >= 5.9.0 mode (``rest_disabled``): every ``/backup/*`` call is a 404.
* The backup service < 4.2 mode (``database_tgz``): the database download is a ``.tgz`` wrapping
  ``database.gz`` (``filename="database.tgz"``).
* Failed backups are listed and flagged (``include_failed``): a newest ``status:"failed"`` entry whose
  downloads are 404.
* Downloads serve byte ranges like an object store (``common.serve_download``): a strong ``ETag``
  and ``Last-Modified`` of the artifact (backup id and file name), ``Accept-Ranges: bytes``,
  ``Content-Length``; ``Range: bytes=N-``/``N-M`` → 206 with ``Content-Range``, past the end →
  416 ``bytes */TOTAL``, malformed/multi-range → 200 whole, ``If-Range`` mismatch → 200 whole.
  The service does not document ranges, hence ``ignore_range``.
* ``html_downloads`` answers every download with a ``200 text/html`` login page (an SSO redirect).
* Variants of the undocumented list shape (``list_shape``) and a WAF-style HTML body with status 200
  (``malformed_list``).

Control API: ``POST /__control`` merges JSON into the switches (unknown key or bad value -> 400),
``POST /__control/reset`` restores the defaults (keeps the built artifacts, drops uploaded backups and
counters), ``GET /__control/state`` reports switches, backups (with each artifact's size, sha256 and
path), the last 2000 requests, ``downloads`` and ``bytes_sent``.  The download switches:

* ``ignore_range`` (bool): answer every download 200 with the whole body.
* ``etag_generation`` (int ≥ 0): part of the ETag and Last-Modified; bump it and the backups look
  replaced (an ``If-Range`` with the old ETag gets a full 200; the bytes stay the same).
* ``throttle_kib_per_s`` (number ≥ 0, 0 = unlimited): pace download bodies (read live).
* ``download_delay_ms`` (number ≥ 0): a pause between 64 KiB chunks (snapshot at request start).
* ``truncate_after_bytes`` (int ≥ 0, 0 = off): every download declares its full ``Content-Length``
  but the connection closes after that many body bytes, counted from the start of the range
  served; ``truncate_after`` (int or null): the same for the next download only.
* ``chunked`` (bool): no ``Content-Length``, chunked transfer coding (ranges still apply).

Injected faults (``faults``, see ``common.py``): steps ``list`` (``GET /backup/list``),
``download`` (either download's GET; a HEAD of a download is logged as step ``probe`` and takes no
fault) and ``upload`` (``POST /backup/upload``; ``provider_error`` there
refuses it 400 with the documented GCS message, taking nothing).  ``provider_error`` at ``list`` lists every backup as
``status:"failed"`` (the service flags failed backups; the message is unused); at ``download``
it answers 401 ``{"message": "Token expired"}``.  There is no export to be ``stuck``: the service
only offers backups it already made.  Every request-log entry has ``t`` and its ``step``.

Each download's request-log entry has ``method``, ``path``, ``status``, ``range``, ``if_range``,
``accept_encoding`` (request headers as received, null when absent), ``served_start``,
``served_end`` (the byte span served, end exclusive, null when nothing was) and ``sent`` (body
bytes actually written); other requests log ``method``, ``path`` and ``status`` only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import datetime as dt
import email.message
import gzip
import hashlib
import http
import json
import os
import random
import re
import secrets
import shutil
import string
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (API_FAULTS, BaseHandler, DOWNLOAD_FAULTS, RANGE_SWITCHES, REQUEST_LOG_SIZE,  # noqa: E402
                    LoginOrigin, Reply, answer_fault, bind_server, faults_problem, gzip_once_more, log_snapshot,
                    range_switch_problem, serve_download, serve_main, take_fault, write_cut_reply)

HOST = "127.0.0.1"
CHUNK = 64 * 1024
PRNG_BLOCK = 1024 * 1024
UPLOAD_INTERVAL_S = 60.0
ARTIFACT_FORMAT = 1  # bump when the generated content changes, to invalidate cached artifacts
VOLUME_FORMAT = 2    # the same for volumes (2: gzip level 0, fast enough for 6 GiB)
VOLUME_GZIP_LEVEL = 0  # stored deflate blocks: the PRNG data does not compress at any level anyway
STORED_BLOCK = 32768   # zlib's stored deflate blocks for tarfile's 16 KiB writes (5 header bytes each)
OLD_VOLUME_BYTES = 16 * 1024  # PRNG file size of the volumes of every backup but the newest
OLD_DATABASE_KIB = 8
TAR_MTIME = 1_700_000_000

LIST_SHAPES = ("backups", "array", "id_key", "newest_first")
REST_DISABLED_MESSAGE = "The backup REST API is not available from backup service 5.9.0; use the lcp CLI"

RE_DOWNLOAD = re.compile(r"^/backup/download/(database|volume)/([^/]+)/?$")
# The provider steps faults can be injected at, and what each takes (common.py, "Injected faults").
FAULT_STEPS = {
    "list": API_FAULTS | {"provider_error"},
    "download": DOWNLOAD_FAULTS | {"provider_error"},
    "upload": API_FAULTS | {"provider_error"},
}
PROVIDER_ERRORS = {
    "list": "failed",  # every backup's status (the list carries no message)
    "download": "Token expired",
    # The error the docs quote for projects whose document library is not on GCS.
    "upload": "Project [portal] does not have GCS enabled for Document Library Store.",
}

DEFAULT_SWITCHES = {
    "sso": False,
    "list_shape": "backups",
    "malformed_list": 0,
    "chunked": False,
    "allow_post": False,
    "rest_disabled": False,
    "fail_next": [],
    "download_delay_ms": 0,
    "truncate_after": None,
    "expired_tokens": False,
    "database_tgz": False,
    "include_failed": False,
    "html_downloads": False,
    "upload_interval_s": UPLOAD_INTERVAL_S,
    "faults": [],
    **RANGE_SWITCHES,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers=()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)


def json_reply(status: int, payload, headers=()) -> Reply:
    return Reply(status, json.dumps(payload).encode(), "application/json", list(headers))


def message_reply(status: int, message: str, headers=()) -> Reply:
    return json_reply(status, {"message": message}, headers)


# ----- artifacts ----------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: str
    size: int
    sha256: str

    def info(self) -> dict:
        return {"size": self.size, "sha256": self.sha256, "path": self.path}


@dataclass
class Backup:
    backup_id: str
    created: dt.datetime
    type: str
    database: Artifact
    volume: Artifact
    database_tgz: Artifact | None = None
    status: str = "success"
    uploaded: bool = False
    upload: dict | None = None  # uploads only: how the request came (content_length, chunked, filenames)

    def listing(self, id_key: str = "backupId") -> dict:
        return {id_key: self.backup_id, "createdAt": rfc3339(self.created), "status": self.status,
                "type": self.type, "size": self.database.size + self.volume.size}

    def state(self) -> dict:
        out = {"backupId": self.backup_id, "createdAt": rfc3339(self.created), "type": self.type,
               "status": self.status, "database": self.database.info(), "volume": self.volume.info()}
        if self.database_tgz is not None:
            out["database_tgz"] = self.database_tgz.info()
        if self.upload is not None:
            out["upload"] = dict(self.upload)
        return out


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self):
        self.raw.flush()


class PrngReader:
    """A readable stream of ``size`` deterministic pseudo-random bytes, generated 1 MiB at a time."""

    def __init__(self, size: int, seed: str):
        self.remaining, self.rng = size, random.Random(seed)
        self.block, self.pos = b"", 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.remaining
        n = min(n, self.remaining)
        pieces = []
        while n > 0:
            if self.pos >= len(self.block):
                self.block, self.pos = self.rng.randbytes(min(PRNG_BLOCK, self.remaining)), 0
            piece = self.block[self.pos:self.pos + n]
            self.pos += len(piece)
            self.remaining -= len(piece)
            n -= len(piece)
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def build_cached(workdir: Path, name: str, builder, fmt: int = ARTIFACT_FORMAT) -> Artifact:
    """Reuse ``workdir/name`` if its metadata sidecar matches, else build it atomically."""
    path = workdir / name
    meta = workdir / (name + ".json")
    try:
        info = json.loads(meta.read_text())
        if info.get("format") == fmt and path.stat().st_size == info["size"]:
            return Artifact(str(path), info["size"], info["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = HashingWriter(raw)
            builder(writer)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    art = Artifact(str(path), writer.size, writer.sha.hexdigest())
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.json.", dir=workdir)
    with os.fdopen(fd, "w") as out:
        json.dump({"format": fmt, "size": art.size, "sha256": art.sha256}, out)
    os.replace(tmp, meta)
    return art


TABLES = {
    "ClassName_": "`mvccVersion` bigint(20) NOT NULL DEFAULT '0',\n  `classNameId` bigint(20) NOT NULL,\n"
                  "  `value` varchar(200) DEFAULT NULL,\n  PRIMARY KEY (`classNameId`)",
    "Company": "`mvccVersion` bigint(20) NOT NULL DEFAULT '0',\n  `companyId` bigint(20) NOT NULL,\n"
               "  `webId` varchar(75) DEFAULT NULL,\n  `mx` varchar(200) DEFAULT NULL,\n"
               "  PRIMARY KEY (`companyId`)",
    "Group_": "`mvccVersion` bigint(20) NOT NULL DEFAULT '0',\n  `groupId` bigint(20) NOT NULL,\n"
              "  `companyId` bigint(20) DEFAULT NULL,\n  `name` longtext,\n  `friendlyURL` varchar(255) DEFAULT NULL,\n"
              "  PRIMARY KEY (`groupId`)",
    "User_": "`mvccVersion` bigint(20) NOT NULL DEFAULT '0',\n  `userId` bigint(20) NOT NULL,\n"
             "  `companyId` bigint(20) DEFAULT NULL,\n  `screenName` varchar(75) DEFAULT NULL,\n"
             "  `emailAddress` varchar(254) DEFAULT NULL,\n  PRIMARY KEY (`userId`)",
    "DLFileEntry": "`mvccVersion` bigint(20) NOT NULL DEFAULT '0',\n  `fileEntryId` bigint(20) NOT NULL,\n"
                   "  `groupId` bigint(20) DEFAULT NULL,\n  `fileName` varchar(255) DEFAULT NULL,\n"
                   "  `size_` bigint(20) DEFAULT NULL,\n  PRIMARY KEY (`fileEntryId`)",
    "JournalArticle": "`mvccVersion` bigint(20) NOT NULL DEFAULT '0',\n  `id_` bigint(20) NOT NULL,\n"
                      "  `groupId` bigint(20) DEFAULT NULL,\n  `articleId` varchar(75) DEFAULT NULL,\n"
                      "  `content` longtext,\n  PRIMARY KEY (`id_`)",
}

DUMP_HEAD = """-- MySQL dump 10.13  Distrib 8.0.36, for Linux (x86_64)
--
-- Host: database    Database: lportal
-- ------------------------------------------------------
-- Server version\t8.0.36

/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
/*!40101 SET @OLD_CHARACTER_SET_RESULTS=@@CHARACTER_SET_RESULTS */;
/*!40101 SET @OLD_COLLATION_CONNECTION=@@COLLATION_CONNECTION */;
/*!50503 SET NAMES utf8mb4 */;
/*!40103 SET @OLD_TIME_ZONE=@@TIME_ZONE */;
/*!40103 SET TIME_ZONE='+00:00' */;
/*!40014 SET @OLD_UNIQUE_CHECKS=@@UNIQUE_CHECKS, UNIQUE_CHECKS=0 */;
/*!40014 SET @OLD_FOREIGN_KEY_CHECKS=@@FOREIGN_KEY_CHECKS, FOREIGN_KEY_CHECKS=0 */;
/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='NO_AUTO_VALUE_ON_ZERO' */;
/*!40111 SET @OLD_SQL_NOTES=@@SQL_NOTES, SQL_NOTES=0 */;

--
-- Current Database: `lportal`
--

/*!40000 DROP DATABASE IF EXISTS `lportal`*/;

CREATE DATABASE /*!32312 IF NOT EXISTS*/ `lportal` /*!40100 DEFAULT CHARACTER SET utf8 */;

USE `lportal`;
"""

DUMP_TAIL = """/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;

/*!40101 SET SQL_MODE=@OLD_SQL_MODE */;
/*!40014 SET FOREIGN_KEY_CHECKS=@OLD_FOREIGN_KEY_CHECKS */;
/*!40014 SET UNIQUE_CHECKS=@OLD_UNIQUE_CHECKS */;
/*!40101 SET CHARACTER_SET_CLIENT=@OLD_CHARACTER_SET_CLIENT */;
/*!40101 SET CHARACTER_SET_RESULTS=@OLD_CHARACTER_SET_RESULTS */;
/*!40101 SET COLLATION_CONNECTION=@OLD_COLLATION_CONNECTION */;
/*!40111 SET SQL_NOTES=@OLD_SQL_NOTES */;

-- Dump completed on 2024-01-01  0:35:00
"""


def table_block(name: str, columns: str) -> str:
    return (f"\n--\n-- Table structure for table `{name}`\n--\n\n"
            f"DROP TABLE IF EXISTS `{name}`;\n"
            "/*!40101 SET @saved_cs_client     = @@character_set_client */;\n"
            "/*!50503 SET character_set_client = utf8mb4 */;\n"
            f"CREATE TABLE `{name}` (\n  {columns}\n) ENGINE=InnoDB DEFAULT CHARSET=utf8mb3;\n"
            "/*!40101 SET character_set_client = @saved_cs_client */;\n\n"
            f"--\n-- Dumping data for table `{name}`\n--\n\n"
            f"LOCK TABLES `{name}` WRITE;\n/*!40000 ALTER TABLE `{name}` DISABLE KEYS */;\n")


def table_end(name: str) -> str:
    return f"/*!40000 ALTER TABLE `{name}` ENABLE KEYS */;\nUNLOCK TABLES;\n"


def write_dump(out, content_bytes: int, seed: str):
    """Write a mysqldump-style text of about ``content_bytes`` bytes to the binary stream ``out``."""
    rng = random.Random(seed)
    written = 0

    def emit(text: str):
        nonlocal written
        data = text.encode()
        out.write(data)
        written += len(data)

    emit(DUMP_HEAD)
    names = list(TABLES)
    row_id = 20000
    for index, name in enumerate(names):
        emit(table_block(name, TABLES[name]))
        # share what is left of the budget between this table and the ones still to come
        later = sum(len(table_block(n, TABLES[n])) + len(table_end(n)) + 30 for n in names[index + 1:])
        left = content_bytes - written - len(DUMP_TAIL) - later - len(table_end(name)) - 30
        target = written + left // (len(names) - index)
        first = True
        line = []
        line_len = 0
        while first or written + line_len < target:
            row_id += 1
            text = rng.randbytes(24).hex()
            if name == "ClassName_":
                row = f"(0,{row_id},'com.liferay.portal.kernel.model.M{text[:12]}')"
            elif name == "Company":
                row = f"(0,{row_id},'liferay-{text[:8]}.com','{text[8:20]}.example')"
            elif name == "Group_":
                row = f"(0,{row_id},20097,'<?xml version=\\'1.0\\'?><root><Name>{text}</Name></root>','/g-{text[:10]}')"
            elif name == "User_":
                row = f"(0,{row_id},20097,'user{row_id}','user{row_id}@{text[:8]}.example')"
            elif name == "DLFileEntry":
                row = f"(0,{row_id},20121,'{text[:16]}.pdf',{rng.randrange(1, 10**9)})"
            else:
                row = f"(0,{row_id},20121,'{text[:8].upper()}','<p>{text} {rng.randbytes(32).hex()}</p>')"
            first = False
            line.append(row)
            line_len += len(row) + 1
            if line_len > 60000:  # mysqldump's extended inserts wrap at net_buffer_length
                emit(f"INSERT INTO `{name}` VALUES " + ",".join(line) + ";\n")
                line, line_len = [], 0
        if line:
            emit(f"INSERT INTO `{name}` VALUES " + ",".join(line) + ";\n")
        emit(table_end(name))
    emit(DUMP_TAIL)


def build_database(out, content_bytes: int, seed: str):
    with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=out, mtime=0) as gz:
        write_dump(gz, content_bytes, seed)


def tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.uid = info.gid = 1000  # the documented `chown -R 1000:1000 data/document_library/`
    info.uname = info.gname = "liferay"
    info.mtime = TAR_MTIME
    return info


def build_volume(out, target_bytes: int, big_bytes: int | None, seed: str):
    """Write a ``.tgz`` of ``document_library/``; the PRNG file makes the archive ~``target_bytes``."""
    rng = random.Random(seed + "-small")
    small = []
    for n in range(4):
        text = (f"Liferay document {n} of backup {seed}\n" + rng.randbytes(200).hex() + "\n") * (n + 1)
        small.append((f"document_library/20097/20121/{101 + n}/1.0", text.encode()))
    if big_bytes is None:
        # 14 tar headers, the small files and the end of the archive, then 5 bytes per stored block
        overhead = 14 * 512 + sum(len(data) + 512 for _, data in small) + 1024 + 18
        big_bytes = max(1024, int((target_bytes - overhead) * STORED_BLOCK / (STORED_BLOCK + 5)))
    dirs = ["document_library/", "document_library/20097/", "document_library/20097/20121/"]
    dirs += [f"document_library/20097/20121/{101 + n}/" for n in range(5)]
    with gzip.GzipFile(filename="", mode="wb", compresslevel=VOLUME_GZIP_LEVEL, fileobj=out, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name in dirs:
                tar.addfile(tar_info(name, directory=True))
            for name, data in small:
                tar.addfile(tar_info(name, len(data)), fileobj=_BytesReader(data))
            tar.addfile(tar_info("document_library/20097/20121/105/1.0", big_bytes),
                        fileobj=PrngReader(big_bytes, seed + "-big"))


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else self.pos + n
        out = self.data[self.pos:end]
        self.pos += len(out)
        return out


def build_database_tgz(out, database_path: str):
    """The backup service < 4.2 format: ``tar zcvf database.tgz database.gz``."""
    with gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=out, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            info = tar_info("database.gz", os.path.getsize(database_path))
            with open(database_path, "rb") as src:
                tar.addfile(info, fileobj=src)


def make_backups(args, workdir: Path, now: dt.datetime) -> list[Backup]:
    """Build (or reuse) the artifacts and describe ``--backups`` daily backups ending today."""
    backups = []
    volume_bytes = int(args.volume_mib * 1024 * 1024)
    today = now.astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    for i in range(args.backups):
        newest = i == args.backups - 1
        rng = random.Random(f"dxp-{args.seed}-{i}")
        letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(18))
        # LCP_BACKUP_CREATE_SCHEDULE default `[5-55][0-1] * * *` (UTC)
        created = today - dt.timedelta(days=args.backups - 1 - i) + dt.timedelta(
            hours=rng.randrange(2), minutes=rng.randrange(5, 56), seconds=rng.randrange(60))
        if created > now:
            created = now.replace(microsecond=0)
        backup_id = f"dxpcloud-{letters}-{created:%Y%m%d%H%M}"
        seed = f"{args.seed}-{i}"
        kib = args.database_kib if newest else min(args.database_kib, OLD_DATABASE_KIB)
        db_name = f"database-s{args.seed}-b{i}-k{kib}.gz"
        database = build_cached(workdir, db_name, lambda out, k=kib, s=seed: build_database(out, k * 1024, s))
        if newest:
            vol_name = f"volume-s{args.seed}-b{i}-m{args.volume_mib:g}.tgz"
            volume = build_cached(workdir, vol_name,
                                  lambda out, s=seed: build_volume(out, volume_bytes, None, s), VOLUME_FORMAT)
        else:
            vol_name = f"volume-s{args.seed}-b{i}-old{OLD_VOLUME_BYTES}.tgz"
            volume = build_cached(workdir, vol_name,
                                  lambda out, s=seed: build_volume(out, 0, OLD_VOLUME_BYTES, s), VOLUME_FORMAT)
        legacy = build_cached(workdir, db_name[:-3] + ".tgz",
                              lambda out, p=database.path: build_database_tgz(out, p))
        kind = "Manual" if args.backups >= 3 and i == args.backups - 2 else "Auto"
        backups.append(Backup(backup_id, created, kind, database, volume, legacy))
    return backups


# ----- multipart upload ---------------------------------------------------------------------------
class BodyReader:
    """Reads a request body (Content-Length or chunked) without ever buffering more than asked."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = headers.get("Transfer-Encoding", "").lower() == "chunked"
        self.remaining = 0 if self.chunked else int(headers.get("Content-Length") or 0)
        self.done = not self.chunked and self.remaining <= 0

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.chunked:
            if self.remaining == 0:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    self.done = True
                    return b""
                self.remaining = size
            data = self.rfile.read(min(n, self.remaining))
            if not data:
                raise ConnectionResetError("request body ended early")
            self.remaining -= len(data)
            if self.remaining == 0:
                self.rfile.readline()
            return data
        data = self.rfile.read(min(n, self.remaining))
        if not data:
            raise ConnectionResetError("request body ended early")
        self.remaining -= len(data)
        self.done = self.remaining == 0
        return data

    def drain(self):
        while self.read(CHUNK):
            pass


def header_params(value: str) -> tuple[str, dict]:
    msg = email.message.Message()
    msg["content-type"] = value
    params = dict((k.lower(), v) for k, v in msg.get_params(failobj=[], header="content-type")[1:])
    return msg.get_content_type(), params


def parse_multipart(reader: BodyReader, boundary: str, sink_for):
    """Stream a multipart body; ``sink_for(name, filename)`` returns a writable or None (discard).

    Returns ``{name: (filename, sink_result)}`` where sink_result is what the sink's ``close()``
    returned.  Raises ApiError(400) on a malformed body.
    """
    delim = b"\r\n--" + boundary.encode("latin-1")
    buf = b"\r\n"  # so that the first boundary also starts with CRLF
    parts = {}

    def fill() -> bool:
        nonlocal buf
        data = reader.read(CHUNK)
        buf += data
        return bool(data)

    # skip the preamble
    while True:
        at = buf.find(delim)
        if at >= 0:
            buf = buf[at + len(delim):]
            break
        buf = buf[-len(delim):]
        if not fill():
            raise ApiError(400, "Malformed multipart body: no boundary")
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf.startswith(b"--"):
            reader.drain()
            return parts
        while b"\r\n\r\n" not in buf:
            if len(buf) > 16384 or not fill():
                raise ApiError(400, "Malformed multipart body: bad part headers")
        head, buf = buf.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.split(b"\r\n")[1:]:  # the first line is the rest of the boundary line
            if b":" in line:
                key, value = line.split(b":", 1)
                headers[key.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
        disposition = headers.get("content-disposition", "")
        _, params = header_params("application/x-disposition; " + disposition.partition(";")[2])
        name, filename = params.get("name"), params.get("filename")
        sink = sink_for(name, filename) if name is not None else None
        try:
            while True:
                at = buf.find(delim)
                if at >= 0:
                    if sink is not None:
                        sink.write(buf[:at])
                    buf = buf[at + len(delim):]
                    break
                keep = len(delim) - 1
                if len(buf) > keep:
                    if sink is not None:
                        sink.write(buf[:-keep])
                    buf = buf[-keep:]
                if not fill():
                    raise ApiError(400, "Malformed multipart body: unterminated part")
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        if sink is not None:
            if name in parts:
                sink.abort()
            else:
                parts[name] = (filename, sink.close())


class FileSink:
    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "wb")
        self.writer = HashingWriter(self.raw)

    def write(self, data: bytes):
        if data:
            self.writer.write(data)

    def close(self) -> Artifact:
        self.raw.close()
        return Artifact(str(self.path), self.writer.size, self.writer.sha.hexdigest())

    def abort(self):
        self.raw.close()
        try:
            self.path.unlink()
        except OSError:
            pass


class NullSink:
    def write(self, data: bytes):
        pass

    def close(self):
        return None

    def abort(self):
        pass


# ----- emulator state -----------------------------------------------------------------------------
class Emulator:
    def __init__(self, args, backups: list[Backup], uploads_dir: Path):
        self.user, self.password = args.user, args.password
        self.user_token, self.master_token = args.user_token, args.master_token
        self.seed = args.seed
        self.built = backups
        self.uploads_dir = uploads_dir
        self.lock = threading.RLock()
        self._reset_state()

    def _reset_state(self):
        self.switches = copy.deepcopy(DEFAULT_SWITCHES)
        self.uploaded: list[Backup] = []
        self.requests = deque(maxlen=REQUEST_LOG_SIZE)
        self.downloads = 0
        self.bytes_sent = 0
        self.last_upload = None  # time.monotonic() of the last accepted upload
        self.upload_counter = 0
        self.failed_id = None
        self.faults_injected: list = []

    def reset(self) -> dict:
        with self.lock:
            old = self.uploaded
            self._reset_state()
            LoginOrigin.clear()
        for backup in old:
            shutil.rmtree(Path(backup.database.path).parent, ignore_errors=True)
        return {"switches": self.switches}

    def update_switches(self, changes) -> dict:
        if not isinstance(changes, dict):
            raise ApiError(400, "control body must be a JSON object")
        unknown = sorted(set(changes) - set(DEFAULT_SWITCHES))
        if unknown:
            raise ApiError(400, f"unknown switch(es): {', '.join(unknown)}")
        for key, value in changes.items():
            if key != "faults":
                validate_switch(key, value)
        if "faults" in changes:
            faults, problem = faults_problem(changes["faults"], FAULT_STEPS, PROVIDER_ERRORS)
            if problem:
                raise ApiError(400, problem)
            changes = {**changes, "faults": faults}
        with self.lock:
            self.switches.update(copy.deepcopy(changes))
            return {"switches": self.switches}

    def backups(self) -> list[Backup]:
        with self.lock:
            return sorted(self.built + self.uploaded, key=lambda b: b.created)

    def state(self) -> dict:
        with self.lock:
            return {"switches": copy.deepcopy(self.switches),
                    "backups": [b.state() for b in self.backups()],
                    "requests": log_snapshot(self.requests),
                    "downloads": self.downloads,
                    "bytes_sent": self.bytes_sent,
                    "faults_injected": [dict(f) for f in self.faults_injected],
                    "login_requests": LoginOrigin.snapshot()}

    def take_fault(self, step: str | None) -> dict | None:
        with self.lock:
            return take_fault(self.switches, step, self.faults_injected)

    def record_request(self, method: str, path: str, status: int, step: str | None = None) -> dict:
        entry = {"method": method, "path": path, "status": status, "t": time.time(), "step": step}
        with self.lock:
            self.requests.append(entry)
        return entry

    def count_bytes(self, n: int):
        with self.lock:
            self.bytes_sent += n

    # ----- gatekeeping ---------------------------------------------------------------------------
    def pop_fail_next(self) -> Reply | None:
        with self.lock:
            queue = self.switches.get("fail_next") or []
            if not queue:
                return None
            spec = queue.pop(0)
        status = int(spec.get("status", 503))
        retry_after = spec.get("retry_after", "1" if status == 429 else None)
        headers = [("Retry-After", str(retry_after))] if retry_after is not None else []
        if spec.get("body") is not None:
            return Reply(status, str(spec["body"]).encode(), "text/html", headers)
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        return message_reply(status, phrase, headers)

    def authorise(self, headers):
        with self.lock:
            sso, expired = self.switches["sso"], self.switches["expired_tokens"]
        refusals = []
        user_header = headers.get("dxpcloud-authorization", "")
        if user_header:
            scheme, _, token = user_header.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                if expired:
                    # A user token is the browser's access_token cookie and expires (Liferay Cloud,
                    # "Authentication": learn.liferay.com/liferay-cloud/latest/en/infrastructure-
                    # and-operations/security/authentication.html). The service's exact words on
                    # expiry are undocumented; this 401 body is the emulator's stand-in.
                    refusals.append("Token expired")
                elif secrets.compare_digest(token.strip().encode(), self.user_token.encode()):
                    return
        auth = headers.get("Authorization", "")
        if auth:
            scheme, _, value = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                if expired:
                    refusals.append("Token expired")
                elif secrets.compare_digest(value.strip().encode(), self.master_token.encode()):
                    return
            elif scheme.lower() == "basic":
                if sso:
                    refusals.append("SSO is enabled: use a user token")
                else:
                    try:
                        pair = base64.b64decode(value.strip(), validate=True).decode("utf-8")
                    except (binascii.Error, UnicodeDecodeError):
                        pair = ""
                    user, sep, password = pair.partition(":")
                    if sep and secrets.compare_digest(user.encode(), self.user.encode()) \
                            and secrets.compare_digest(password.encode(), self.password.encode()):
                        return
        for message in ("Token expired", "SSO is enabled: use a user token"):
            if message in refusals:
                raise ApiError(401, message)
        raise ApiError(401, "Unauthorized")

    def find(self, backup_id: str) -> Backup:
        for backup in self.backups():
            if backup.backup_id == backup_id:
                return backup
        raise ApiError(404, "Backup not found")

    # ----- list ----------------------------------------------------------------------------------
    def list_reply(self, all_failed: bool = False) -> Reply:
        with self.lock:
            if int(self.switches["malformed_list"] or 0) > 0:
                self.switches["malformed_list"] = int(self.switches["malformed_list"]) - 1
                return Reply(200, b"<html>502</html>", "text/html")
            shape = self.switches["list_shape"]
            include_failed = self.switches["include_failed"]
        id_key = "id" if shape == "id_key" else "backupId"
        items = [b.listing(id_key) for b in self.backups()]
        if all_failed:
            items = [{**item, "status": "failed"} for item in items]
        if include_failed:
            items.append(self.failed_listing(id_key))
        if shape == "newest_first":
            items.reverse()
        return json_reply(200, items if shape == "array" else {"backups": items})

    def failed_listing(self, id_key: str) -> dict:
        newest = max(b.created for b in self.backups())
        created = max(newest, dt.datetime.now(dt.timezone.utc).replace(microsecond=0))
        with self.lock:
            if self.failed_id is None:
                rng = random.Random(f"dxp-{self.seed}-failed")
                letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(18))
                self.failed_id = (f"dxpcloud-{letters}-{created:%Y%m%d%H%M}", created)
            failed_id, created = self.failed_id
        return {id_key: failed_id, "createdAt": rfc3339(created), "status": "failed",
                "type": "Manual", "size": 0}

    # ----- upload --------------------------------------------------------------------------------
    def upload(self, content_type: str, reader: BodyReader) -> Reply:
        kind, params = header_params(content_type or "text/plain")
        if kind != "multipart/form-data" or not params.get("boundary"):
            reader.drain()
            raise ApiError(400, "Expected multipart/form-data with the fields database and volume")
        with self.lock:
            now = time.monotonic()
            interval = float(self.switches["upload_interval_s"])
            if self.last_upload is not None and now - self.last_upload < interval:
                wait = max(1, int(interval - (now - self.last_upload) + 0.999))
                reader.drain()
                raise ApiError(429, "Only one backup upload is allowed per minute; "
                               f"try again in {wait} seconds", [("Retry-After", str(wait))])
            previous, self.last_upload = self.last_upload, now
            self.upload_counter += 1
            counter = self.upload_counter
        declared = None if reader.chunked else reader.remaining
        folder = self.uploads_dir / f"upload-{counter}"
        folder.mkdir(parents=True, exist_ok=True)
        accepted = False
        try:
            def sink_for(name, filename):
                if name in ("database", "volume") and filename is not None:
                    return FileSink(folder / ("database.gz" if name == "database" else "volume.tgz"))
                return NullSink()

            parts = parse_multipart(reader, params["boundary"], sink_for)
            missing = [n for n in ("database", "volume") if not isinstance(parts.get(n, (None, None))[1], Artifact)]
            if missing:
                raise ApiError(400, f"Missing required file field(s): {', '.join(missing)}")
            created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
            rng = random.Random()
            letters = "".join(rng.choice(string.ascii_lowercase) for _ in range(18))
            backup = Backup(f"dxpcloud-{letters}-{created:%Y%m%d%H%M}", created, "Uploaded",
                            parts["database"][1], parts["volume"][1], uploaded=True,
                            upload={"content_length": declared, "chunked": reader.chunked,
                                    "filenames": {n: parts[n][0] for n in ("database", "volume")}})
            with self.lock:
                self.uploaded.append(backup)
            accepted = True
            return json_reply(200, backup.listing())
        finally:
            if not accepted:
                shutil.rmtree(folder, ignore_errors=True)
                with self.lock:
                    if self.last_upload == now:
                        self.last_upload = previous


def validate_switch(key: str, value):
    def bad(why: str):
        raise ApiError(400, f"{key}: {why}")

    if key in ("sso", "chunked", "allow_post", "rest_disabled", "expired_tokens", "database_tgz",
               "include_failed", "html_downloads"):
        if not isinstance(value, bool):
            bad("must be a boolean")
    elif key == "list_shape":
        if value not in LIST_SHAPES:
            bad(f"must be one of {', '.join(LIST_SHAPES)}")
    elif key == "malformed_list":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            bad("must be a non-negative integer")
    elif key == "upload_interval_s":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            bad("must be a non-negative number")
    elif key == "download_delay_ms":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            bad("must be a non-negative number")
    elif key in RANGE_SWITCHES:
        problem = range_switch_problem(key, value)
        if problem:
            bad(problem.split(" ", 1)[1])
    elif key == "truncate_after":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            bad("must be null or a non-negative integer")
    elif key == "fail_next":
        if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
            bad("must be a list of objects")
        for spec in value:
            extra = set(spec) - {"status", "retry_after", "body"}
            if extra:
                bad(f"unknown key(s) {', '.join(sorted(extra))}")
            status = spec.get("status", 503)
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                bad("status must be an HTTP status code")
            if spec.get("retry_after") is not None and not isinstance(spec["retry_after"], (str, int)):
                bad("retry_after must be null or a string")
            if spec.get("body") is not None and not isinstance(spec["body"], str):
                bad("body must be null or a string")


# ----- HTTP ---------------------------------------------------------------------------------------
class Handler(BaseHandler):
    server_version = "dxp-backup-emulator"
    emulator: Emulator  # set on the subclass built by make_server

    def dispatch(self):
        path = unquote(urlsplit(self.path).path)
        self.begin_request(path)
        if RE_DOWNLOAD.match(path):
            self.mark_download()
        reader = BodyReader(self.rfile, self.headers)
        try:
            if path.startswith("/__control"):
                self.handle_control(path, reader)
            else:
                # A HEAD of a download (a client reading the archive's name) is step "probe": it
                # serves no bytes, so the download faults and counters are left to the GETs.
                self._step = "list" if path.rstrip("/") == "/backup/list" else \
                    ("probe" if self.command == "HEAD" else "download") if RE_DOWNLOAD.match(path) else \
                    "upload" if path.rstrip("/") == "/backup/upload" else None
                fault = self.emulator.take_fault(self._step)
                if fault is not None:
                    reader.drain()
                if answer_fault(self, fault, message_reply):
                    return
                try:
                    reply = self.route(path, reader, fault)
                except ApiError as exc:
                    reply = message_reply(exc.status, exc.message, exc.headers)
                if reply is not None:
                    reader.drain()  # keep keep-alive connections in sync
                    if fault is not None and fault["fault"] in ("truncate", "truncate_chunked"):
                        write_cut_reply(self, reply, fault.get("truncate_at"),
                                        chunked=fault["fault"] == "truncate_chunked")
                    else:
                        self.write_reply(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # an emulator bug: make it loud but keep serving
            traceback.print_exc()
            if not self._status:
                self.write_reply(message_reply(500, "DXP emulator internal error"))
            self.close_connection = True
        finally:
            self.finish_request()

    def log_request_status(self, status: int) -> None:
        self._entry = self.emulator.record_request(self.command, self._path, status, self._step)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

    def route(self, path: str, reader: BodyReader, fault: dict | None = None) -> Reply | None:
        emu = self.emulator
        if not path.startswith("/backup/"):
            raise ApiError(404, "Not found")
        canned = emu.pop_fail_next()
        if canned is not None:
            return canned
        with emu.lock:
            rest_disabled = emu.switches["rest_disabled"]
        if rest_disabled:
            raise ApiError(404, REST_DISABLED_MESSAGE)
        emu.authorise(self.headers)
        if path.rstrip("/") == "/backup/list":
            if self.command not in ("GET", "HEAD"):
                raise ApiError(405, "Method not allowed", [("Allow", "GET")])
            return emu.list_reply(all_failed=fault is not None and fault["fault"] == "provider_error")
        if path.rstrip("/") == "/backup/upload":
            if self.command != "POST":
                raise ApiError(405, "Method not allowed", [("Allow", "POST")])
            if fault is not None and fault["fault"] == "provider_error":
                raise ApiError(400, fault["message"])
            return emu.upload(self.headers.get("Content-Type", ""), reader)
        match = RE_DOWNLOAD.match(path)
        if match:
            with emu.lock:
                allow_post = emu.switches["allow_post"]
            allowed = ("GET", "HEAD", "POST") if allow_post else ("GET", "HEAD")
            if self.command not in allowed:
                raise ApiError(405, "Method not allowed", [("Allow", "GET, POST" if allow_post else "GET")])
            backup = emu.find(match.group(2))
            reader.drain()
            if fault is not None and fault["fault"] == "provider_error":
                raise ApiError(401, fault["message"])
            self.stream(backup, match.group(1), fault)
            return None
        raise ApiError(404, "Not found")

    def stream(self, backup: Backup, kind: str, fault: dict | None = None):
        emu = self.emulator
        with emu.lock:
            switches = copy.deepcopy(emu.switches)
        if switches["html_downloads"]:
            # What an SSO front end answers once a redirect has been followed: a login page, 200.
            page = b"<!DOCTYPE html><html><head><title>Sign in - Liferay</title></head><body>Sign in</body></html>"
            self.write_reply(Reply(200, page, "text/html; charset=utf-8"))
            return
        with emu.lock:
            truncate = switches["truncate_after"]
            if self.command != "HEAD":
                if truncate is not None:
                    emu.switches["truncate_after"] = None
                emu.downloads += 1
        if kind == "volume":
            artifact, filename = backup.volume, "volume.tgz"
        elif switches["database_tgz"] and backup.database_tgz is not None:
            # Backup service < 4.2 serves the database as a .tgz wrapping database.gz, 4.2 and later
            # as database.gz (Liferay, "Downloading and Uploading Backups"). The name travels in
            # Content-Disposition, on GET and on HEAD alike.
            artifact, filename = backup.database_tgz, "database.tgz"
        else:
            artifact, filename = backup.database, "database.gz"
        chunked = bool(switches["chunked"])
        delay = float(switches["download_delay_ms"] or 0) / 1000.0
        identity = f"{backup.backup_id}/{filename}"
        extra = [("Content-Disposition", f'attachment; filename="{filename}"')]
        kind = fault["fault"] if fault is not None else None
        if kind in ("truncate", "truncate_chunked"):
            chunked = chunked or kind == "truncate_chunked"
            truncate = fault.get("truncate_at")
            if truncate is None:
                truncate = artifact.size // 2
        # truncate_after (once) wins over the truncate_after_bytes switch serve_download applies.
        with open(artifact.path, "rb") as src:
            if kind == "content_encoding_gzip":
                body = gzip_once_more(src.read())
                serve_download(self, body, len(body), identity + "+cdn-gzip", "application/gzip", switches,
                               extra_headers=extra + [("Content-Encoding", "gzip")], truncate_after=truncate,
                               chunked=chunked, delay_s=delay, on_bytes=emu.count_bytes,
                               live_switches=lambda: emu.switches)
                return
            serve_download(self, src, artifact.size, identity, "application/gzip", switches, extra_headers=extra,
                           truncate_after=truncate, chunked=chunked, delay_s=delay, on_bytes=emu.count_bytes,
                           live_switches=lambda: emu.switches)

    def handle_control(self, path: str, reader: BodyReader):
        emu = self.emulator
        body = reader.read(1 << 20)
        reader.drain()
        try:
            if path == "/__control/state" and self.command == "GET":
                reply = json_reply(200, emu.state())
            elif path == "/__control/reset" and self.command == "POST":
                reply = json_reply(200, emu.reset())
            elif path == "/__control" and self.command == "POST":
                try:
                    changes = json.loads(body or b"{}")
                except ValueError:
                    raise ApiError(400, "control body must be JSON")
                reply = json_reply(200, emu.update_switches(changes))
            else:
                raise ApiError(404, "No such control endpoint")
        except ApiError as exc:
            reply = message_reply(exc.status, exc.message)
        self.write_reply(reply)


# ----- startup ------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description="Liferay DXP Cloud backup service emulator")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", required=True, help="artifact cache and upload folder")
    parser.add_argument("--user", required=True, help="HTTP Basic user (an email)")
    parser.add_argument("--password", required=True)
    parser.add_argument("--user-token", required=True, help="accepted in dxpcloud-authorization: Bearer")
    parser.add_argument("--master-token", required=True, help="accepted in Authorization: Bearer")
    parser.add_argument("--backups", type=int, default=3)
    parser.add_argument("--volume-mib", type=float, default=2.0,
                        help="size of the newest backup's volume.tgz in MiB (e.g. 6144 for 6 GiB)")
    parser.add_argument("--database-kib", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.backups < 1:
        parser.error("--backups must be >= 1")
    if args.volume_mib < 0 or args.database_kib < 0:
        parser.error("sizes must be >= 0")
    return args


def make_server(argv) -> ThreadingHTTPServer:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backups = make_backups(args, workdir, dt.datetime.now(dt.timezone.utc))
    uploads = Path(tempfile.mkdtemp(prefix="uploads-", dir=workdir))
    emulator = Emulator(args, backups, uploads)
    return bind_server(Handler, emulator, (HOST, args.port))


def remove_uploads(server):
    shutil.rmtree(server.emulator.uploads_dir, ignore_errors=True)


def main(argv=None):
    serve_main(make_server, argv, cleanup=remove_uploads)


if __name__ == "__main__":
    main()
