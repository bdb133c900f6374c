"""A real S3-compatible server for the tests, one that checks SigV4 signatures and IAM policies.

``S3Server`` runs moto's stand-alone server (PyPI ``moto[server]`` 5.2.1, installed by
scripts/setup.sh) on a free port of 127.0.0.1, switches on moto's IAM-like access control, creates
an IAM user whose policy allows ``s3:*`` on one bucket and its objects only, gives it an access key,
and creates the bucket with that key. Ferry (or a test) then talks to ``endpoint`` with
``access_key_id`` / ``secret_access_key`` in ``region``, path-style. Nothing here reaches the
internet: the server listens on 127.0.0.1 and every client below is built without proxies.

What the tests rely on, and where it comes from:

* Access control (https://docs.getmoto.org/en/latest/docs/iam.html, "IAM-like Access Control"):
  moto skips authentication for the first ``INITIAL_NO_AUTH_ACTION_COUNT`` actions and checks every
  later one; unset, the count is infinite and nothing is ever checked. moto/settings.py reads the
  variable once, at import; moto/core/authorization.py
  (``ActionAuthenticatorMixin._authenticate_and_authorize_action``) counts the unchecked actions,
  then builds an ``IAMRequest`` / ``S3IAMRequest`` (moto/iam/access_control.py) and calls
  ``check_signature()`` and ``check_action_permitted(resource)``. Only requests that reach an
  AWS action are counted: moto's own ``/moto-api/...`` pages are not, so the readiness probe below
  does not use up the count.
* Which keys exist: moto/iam/access_control.py ``create_access_key`` accepts only the access keys of
  IAM users (``IAMUserAccessKey``, looked up in the IAM backend) and of roles assumed through STS
  (``AssumedRoleAccessKey``). There is no built-in root or default key: any other key id fails with
  ``CreateAccessKeyFailure("InvalidId")``, answered as ``InvalidClientTokenId`` (IAM) or
  ``InvalidAccessKeyId`` (S3). So the count cannot be 0 (nothing could create the first user); it is
  exactly the three unsigned bootstrap actions of ``_bootstrap`` (an admin user, its inline policy,
  its key). Everything after is signed with a real key and checked, and ``_bootstrap`` verifies that
  the unchecked window has closed.
* A wrong secret: ``check_signature`` recomputes the signature with botocore's ``S3SigV4Auth`` from
  the stored secret and raises ``S3SignatureDoesNotMatchError`` / ``BucketSignatureDoesNotMatchError``
  (moto/s3/exceptions.py): 403 ``SignatureDoesNotMatch``.
* A key whose user has no policy allowing the action on the resource (the ARN of the bucket, or of
  ``bucket/key``; moto/core/authorization.py ``_authenticate_and_authorize_s3_action``):
  ``check_action_permitted`` finds nothing permitted and raises 403 ``AccessDenied``. The IAM
  policy's ``Resource`` is matched (``IAMPolicyStatement.is_action_permitted``), so the scoped key
  cannot list buckets or touch another bucket.

Two bugs of moto 5.2.1's check are fixed in the server process (``_patch_moto``; the server is
started as `python3 tests/s3_server.py -H 127.0.0.1 -p PORT`, i.e. moto/server.py ``main`` with the
options of `python3 -m moto.server`, after the patch; ``S3Server(..., patched=False)`` runs plain
`python3 -m moto.server`, and tests/test_s3_server.py pins both bugs there):

* moto signs over the URL werkzeug rebuilds after decoding the target, not the target the client
  signed: keys or query values with ``: + = , @ ; ( ) * $ & '``, ``%2F`` or non-ASCII characters fail
  with ``SignatureDoesNotMatch`` even from boto3, e.g. every ListObjectsV2 with ``prefix=a/``
  (https://github.com/getmoto/moto/issues/5948, still open). Patched: the canonical URI and query
  are those of the raw target, as S3 computes them.
* An unsigned request (no ``Authorization`` header) makes ``IAMRequestBase.__init__`` raise
  ``KeyError``: 500. Patched: 403 ``AccessDenied``, as S3 answers anonymous requests on a private
  bucket.

Known limits left (real S3 is stricter; see ``test_known_limits_of_moto``):

* The payload is not verified: the canonical request takes the client's ``x-amz-content-sha256``
  header as given (botocore ``SigV4Auth.canonical_request``), so a body that does not match its
  signed hash is stored (real S3 answers ``XAmzContentSHA256Mismatch``). Neither is the request
  date's age checked (real S3: ``RequestTimeTooSkewed``), nor are the chunk signatures of
  ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` uploads (moto/s3/responses.py only decodes the chunks).
* Presigned URLs (signature in the query, no ``Authorization``) are refused: 403 here, 500 unpatched.
* ``/moto-api/reset-auth`` and ``/moto-api/reset`` are unauthenticated control endpoints (they turn
  checking off or forget every user); nothing here calls them, tests must not either.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from harness import Process, free_port

REGION = "us-east-1"
ADMIN_USER = "ferry-s3-admin"
# The unsigned actions _bootstrap makes before every request must be signed: create_user,
# put_user_policy and create_access_key of the admin user. Must match _bootstrap exactly.
BOOTSTRAP_ACTIONS = 3
# The key id the unsigned bootstrap calls carry (moto checks nothing then; no such user exists).
UNREGISTERED_KEY = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
# werkzeug's access log line: 127.0.0.1 - - [date] "PUT /bucket/key HTTP/1.1" 200 -
_ACCESS_LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ')
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def canonical_target(raw_uri: str) -> str:
    """The SigV4 canonical URI and query string (for S3) of a request target as the client sent it:
    the path decoded once and URI-encoded again, '/' kept, no normalisation; each query name and value
    decoded and URI-encoded, pairs sorted. This is what S3 signs ("Create a canonical request",
    https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv-create-signed-request.html)."""
    parts = urlsplit(raw_uri)
    path = quote(unquote(parts.path or "/"), safe="/~")
    pairs = []
    for pair in filter(None, parts.query.split("&")):
        name, _, value = pair.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return path + ("?" + "&".join(f"{n}={v}" for n, v in sorted(pairs)) if pairs else "")


def _patch_moto() -> None:
    """Two fixes to moto 5.2.1's S3 access check, run in the server process only; neither skips a
    check, both make moto answer as S3 does.

    1. moto recomputes the signature over ``self.uri``, the URL werkzeug rebuilds after decoding the
       target (werkzeug's ``get_current_url`` / ``uri_to_iri``), not the target the client signed, so
       a correct client's signature fails for any key or query value holding ``: + = , @ ( ) * $ & '``,
       ``%2F`` or non-ASCII characters: ListObjectsV2 with ``prefix=a/`` (sent as ``a%2F``) is
       refused. Open upstream: https://github.com/getmoto/moto/issues/5948 (fix proposed in
       https://github.com/getmoto/moto/pull/5949). Here the check uses ``canonical_target`` of the raw
       target (werkzeug's ``RAW_URI``, which moto itself reads for ``raw_path``).
    2. A request without ``Authorization`` makes ``IAMRequestBase.__init__`` raise ``KeyError``
       (500); S3 answers 403 ``AccessDenied`` to an anonymous request on a private bucket.
    """
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam.access_control import S3IAMRequest
    from moto.s3.exceptions import BucketAccessDeniedError, S3AccessDeniedError

    original = ActionAuthenticatorMixin._authenticate_and_authorize_action
    part_delay = float(os.environ.get("S3_PART_DELAY_S") or 0)

    def checked(self, iam_request_cls, resource="*"):
        environ = getattr(getattr(self, "request", None), "environ", None)
        if part_delay and environ is not None and "partNumber=" in (environ.get("QUERY_STRING") or ""):
            time.sleep(part_delay)  # a slow link (S3Server's part_delay_s), so a test can act between parts
        if (iam_request_cls is not S3IAMRequest or environ is None
                or ActionAuthenticatorMixin.request_count < settings.INITIAL_NO_AUTH_ACTION_COUNT):
            return original(self, iam_request_cls, resource)
        if "Authorization" not in self.headers:
            bucket = (self.data or {}).get("BucketName")
            raise BucketAccessDeniedError(bucket=bucket) if bucket else S3AccessDeniedError()
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not raw:
            return original(self, iam_request_cls, resource)
        uri = self.uri
        self.uri = "http://canonical" + canonical_target(raw)
        try:
            return original(self, iam_request_cls, resource)
        finally:
            self.uri = uri

    ActionAuthenticatorMixin._authenticate_and_authorize_action = checked


def bucket_policy(bucket: str) -> dict:
    """An IAM policy allowing every S3 action on ``bucket`` and its objects, and nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        }],
    }


class S3Server:
    """moto's S3 server on 127.0.0.1 with SigV4 and IAM checks on, a bucket and a scoped key."""

    def __init__(self, workdir: Path, bucket: str = "ferry-replica", user: str = "ferry",
                 ready_timeout: float = 30, log_name: str = "s3-server.log", patched: bool = True,
                 part_delay_s: float = 0.0):
        """Starts the server and sets it up; ``patched=False`` runs plain `python3 -m moto.server`
        (without _patch_moto's two fixes, for comparison). ``part_delay_s``: each multipart part
        upload is answered that much later (a slow link; patched server only)."""
        self.workdir = workdir
        self.bucket = bucket
        self.user = user
        self.region = REGION
        self.log_path = workdir / log_name
        self._log_offset = 0
        self._clients: dict = {}
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(BOOTSTRAP_ACTIONS), S3_PART_DELAY_S=str(part_delay_s))
        env.pop("MOTO_ACCOUNT_ID", None)  # one default account for every key
        self.process = None
        for _ in range(3):  # free_port() can race with another process taking the port
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            server = [str(Path(__file__).resolve())] if patched else ["-m", "moto.server"]
            self.process = Process([sys.executable, *server, "-H", "127.0.0.1", "-p", str(self.port)],
                                   self.log_path, env=env)
            if self._wait_ready(ready_timeout):
                break
            self.process.stop(kill=True)
        else:
            raise RuntimeError("moto.server did not start:\n" + self.process.tail())
        try:
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        self._log_offset = self.log_path.stat().st_size

    # ----- start-up -------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> bool:
        """Polls moto's own API (not an AWS action, so not counted) until the server answers."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.process.alive():
            try:
                _NO_PROXY.open(self.endpoint + "/moto-api/reset-auth", timeout=2).close()
                return True
            except urllib.error.HTTPError:  # a GET answers 400 "Need to POST": it is up
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def _bootstrap(self) -> None:
        # The BOOTSTRAP_ACTIONS unchecked actions: an admin user allowed everything, and its key.
        iam = self._client("iam", *UNREGISTERED_KEY)
        iam.create_user(UserName=ADMIN_USER)
        iam.put_user_policy(UserName=ADMIN_USER, PolicyName="everything", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
        self._admin_key = (key["AccessKeyId"], key["SecretAccessKey"])
        # From here on every request is checked: the unregistered key must now be refused.
        from botocore.exceptions import ClientError
        try:
            iam.get_user(UserName=ADMIN_USER)
        except ClientError as e:
            if e.response["Error"]["Code"] != "InvalidClientTokenId":
                raise
        else:
            raise RuntimeError("moto still accepts unchecked requests after the bootstrap; "
                               "BOOTSTRAP_ACTIONS does not match _bootstrap")
        # Signed with the admin key: Ferry's user, scoped to the bucket, and its key.
        self.access_key_id, self.secret_access_key = self.add_key(self.user, bucket_policy(self.bucket))
        # Created with Ferry's key itself, which proves the key and its policy work.
        self.client().create_bucket(Bucket=self.bucket)

    # ----- clients --------------------------------------------------------------------------
    def _client(self, service: str, access_key_id: str, secret_access_key: str):
        """A boto3 client (cached: building one costs ~0.1 s), path-style, no retries, no proxy."""
        cache_key = (service, access_key_id, secret_access_key)
        if cache_key not in self._clients:
            import boto3
            from botocore.config import Config
            config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                            proxies={}, connect_timeout=5, read_timeout=60)
            self._clients[cache_key] = boto3.session.Session().client(
                service, endpoint_url=self.endpoint, region_name=self.region, config=config,
                aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
        return self._clients[cache_key]

    def client(self, access_key_id: str | None = None, secret_access_key: str | None = None):
        """A boto3 S3 client; by default with Ferry's key (``access_key_id``/``secret_access_key``)."""
        return self._client("s3", access_key_id or self.access_key_id,
                            secret_access_key or self.secret_access_key)

    def admin(self, service: str = "s3"):
        """A boto3 client signed with the admin key (allowed everything), e.g. ``admin("iam")``."""
        return self._client(service, *self._admin_key)

    def add_key(self, user: str, policy: dict | None = None) -> tuple[str, str]:
        """A new access key of IAM user ``user`` (created if missing), with ``policy`` (an IAM
        policy document) attached as a managed policy when given. Returns (key id, secret)."""
        iam = self.admin("iam")
        try:
            iam.create_user(UserName=user)
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        if policy is not None:
            name = f"{user}-policy-{len(iam.list_attached_user_policies(UserName=user)['AttachedPolicies'])}"
            arn = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
            iam.attach_user_policy(UserName=user, PolicyArn=arn)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    # ----- the bucket, behind Ferry's back (admin key) -------------------------------------
    def keys(self, prefix: str = "") -> list[str]:
        pages = self.admin().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.admin().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.admin().put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.admin().delete_object(Bucket=self.bucket, Key=key)

    def open_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload neither completed nor aborted."""
        pages = self.admin().get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket)
        return sorted((u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", []))

    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, path with query, status) of every request since the fixture's set-up, from the
        server's access log (werkzeug writes the line before the response body)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode(errors="replace")
        return [(m[1], m[2], int(m[3])) for m in _ACCESS_LINE.finditer(text)]

    # ----- lifetime -------------------------------------------------------------------------
    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    # `python3 tests/s3_server.py -H 127.0.0.1 -p PORT`: moto's own server (moto/server.py ``main``,
    # same options as `python3 -m moto.server`) with _patch_moto applied.
    _patch_moto()
    from moto.server import main
    main(sys.argv[1:])
