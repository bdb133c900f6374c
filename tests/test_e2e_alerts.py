"""End to end: alerts, under `wrangler dev` against the D1 emulator, delivered through the local
Cloudflare Queue to receivers running in this test.

- `ops` is a generic webhook receiver that verifies every delivery's Standard Webhooks signature
  with the destination's own secret, as a real receiver would.
- `chat` is a Slack incoming-webhook stand-in that checks each message against Slack's documented
  payload shape and answers as Slack does (`ok`, or 400 `invalid_payload`).
- `flaky` answers 500 to everything: its deliveries are retried with growing delays, then given up,
  while backups go on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import D1Emulator, Ferry, d1_source

TRIGGER = "*/5 * * * *"
MINUTE_MS = 60 * 1000
OPS_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
FLAKY_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
SECRETS = {"/ops": OPS_SECRET, "/flaky": FLAKY_SECRET}

# Slack's documented incoming-webhook payload (api.slack.com/messaging/webhooks, Block Kit).
SLACK_TOP_LEVEL = {"text", "blocks", "attachments", "thread_ts", "mrkdwn", "unfurl_links", "unfurl_media"}
SLACK_SECTION_KEYS = {"type", "text", "block_id", "fields", "accessory", "expand"}


def verify_standard_webhook(secret: str, headers: dict, body: bytes) -> str | None:
    """What a receiver does (standardwebhooks.com): None when the delivery is genuine."""
    msg_id, ts, sigs = headers.get("webhook-id"), headers.get("webhook-timestamp"), headers.get("webhook-signature")
    if not (msg_id and ts and sigs):
        return "missing header"
    if abs(time.time() - int(ts)) > 300:
        return "timestamp outside the tolerance"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    for entry in sigs.split():
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return None
    return "no matching signature"


def slack_problems(headers: dict, body: bytes) -> list[str]:
    problems = []
    if not headers.get("content-type", "").startswith("application/json"):
        problems.append("content-type is not application/json")
    try:
        payload = json.loads(body)
    except ValueError:
        return problems + ["not JSON"]
    if not isinstance(payload, dict):
        return problems + ["not an object"]
    problems += [f"unknown top-level key {k}" for k in payload if k not in SLACK_TOP_LEVEL]
    if not isinstance(payload.get("text"), str) or not payload["text"].strip():
        problems.append("text (the fallback, required with blocks) is missing")
    blocks = payload.get("blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 50:
        return problems + ["blocks must be a list of 1 to 50 blocks"]
    for b in blocks:
        if b.get("type") != "section":
            problems.append(f"unexpected block {b.get('type')}")
            continue
        problems += [f"unknown section key {k}" for k in b if k not in SLACK_SECTION_KEYS]
        text = b.get("text") or {}
        if text.get("type") not in ("mrkdwn", "plain_text") or not 1 <= len(text.get("text", "")) <= 3000:
            problems.append(f"bad section text {text}")
    return problems


class Receivers:
    """The three receivers on one local HTTP server; every request is kept."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                entry = {"path": self.path, "headers": headers, "body": body, "at": time.time()}
                if self.path in SECRETS:
                    entry["signature_problem"] = verify_standard_webhook(SECRETS[self.path], headers, body)
                    entry["payload"] = json.loads(body)
                    status, answer = (500, b"boom") if self.path == "/flaky" else (204, b"")
                    if entry["signature_problem"]:
                        status, answer = 401, b"bad signature"
                elif self.path == "/slack":
                    entry["problems"] = slack_problems(headers, body)
                    entry["payload"] = json.loads(body) if not entry["problems"] else None
                    status, answer = (400, b"invalid_payload") if entry["problems"] else (200, b"ok")
                else:
                    status, answer = 404, b"no such receiver"
                with receivers.lock:
                    receivers.requests.append(entry)
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str, source: str | None = None, type_: str | None = None) -> list[dict]:
        with self.lock:
            found = [r for r in self.requests if r["path"] == path]
        if source is not None:
            found = [r for r in found if r.get("payload") and source in json.dumps(r["payload"])]
        if type_ is not None:
            found = [r for r in found if r.get("payload", {}).get("type") == type_]
        return found

    def wait(self, path: str, count: int, timeout: float = 30, **match) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.at(path, **match)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{path} {match}: {len(self.at(path, **match))} deliveries, expected {count}")

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("alerts-e2e")
    db = sqlite3.connect(work / "db.sqlite")
    db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t (v) VALUES ('a'), ('b');")
    db.commit()
    db.close()
    emulator = D1Emulator(work, {"db-uuid": work / "db.sqlite"})
    receivers = Receivers()
    sources = [
        d1_source("broken-db", emulator, "missing-uuid"),
        d1_source("stale-db", emulator, "db-uuid", max_age_minutes=60),
        d1_source("shop", emulator, "db-uuid"),
    ]
    alerts = [
        {"name": "ops", "kind": "webhook", "url": f"{receivers.url}/ops", "secret_secret": "OPS_HOOK_SECRET",
         "events": ["failed", "stale", "recovered", "committed"], "dashboard_url": "https://ferry.example.dev/"},
        {"name": "chat", "kind": "slack", "url_secret": "SLACK_WEBHOOK_URL", "events": ["failed", "stale", "recovered"],
         "sources": ["broken-db", "stale-db"], "dashboard_url": "https://ferry.example.dev/"},
        {"name": "flaky", "kind": "webhook", "url": f"{receivers.url}/flaky", "secret_secret": "FLAKY_HOOK_SECRET",
         "events": ["committed"], "sources": ["shop"], "max_attempts": 4, "retry_delay_seconds": 2},
    ]
    secrets = {"OPS_HOOK_SECRET": OPS_SECRET, "FLAKY_HOOK_SECRET": FLAKY_SECRET,
               "SLACK_WEBHOOK_URL": f"{receivers.url}/slack"}
    ferry = Ferry(work / "ferry", sources, secrets=secrets, alerts=alerts)
    yield {"ferry": ferry, "receivers": receivers}
    ferry.stop()
    receivers.stop()
    emulator.stop()


def settle(seconds: float = 3) -> None:
    """Long enough for a duplicate to arrive, were one sent (the queue's batch timeout is 1 s)."""
    time.sleep(seconds)


def test_each_failed_job_raises_exactly_one_failed_notification_signed_and_in_slacks_shape(world):
    ferry, rx = world["ferry"], world["receivers"]
    jobs = [ferry.webhook_job("broken-db") for _ in range(2)]
    assert all(j["phase"] == "failed" for j in jobs), jobs
    ops = rx.wait("/ops", 2, source="broken-db", type_="ferry.backup.failed")
    slack = rx.wait("/slack", 2, source="broken-db")
    settle()
    ops = rx.at("/ops", source="broken-db", type_="ferry.backup.failed")
    assert len(ops) == 2, [r["payload"] for r in ops]
    assert sorted(r["payload"]["data"]["job_id"] for r in ops) == sorted(j["id"] for j in jobs)
    assert len({r["headers"]["webhook-id"] for r in ops}) == 2, "one event per job, each with its own id"
    for r in ops:
        assert r["signature_problem"] is None, r["signature_problem"]
        data = r["payload"]["data"]
        job = next(j for j in jobs if j["id"] == data["job_id"])
        assert data["source"] == "broken-db" and data["kind"] == "d1" and data["phase"] == "failed"
        assert data["error"] == job["error"] and "could not be found" in data["error"], data
        assert data["dashboard_url"] == "https://ferry.example.dev/#source=broken-db"
    slack = rx.at("/slack", source="broken-db")
    assert len(slack) == 2, slack
    for r in slack:
        assert r["problems"] == [], r["problems"]
        text = "\n".join(b["text"]["text"] for b in r["payload"]["blocks"])
        assert "broken-db" in r["payload"]["text"] and "could not be found" in text, r["payload"]
        assert "<https://ferry.example.dev/#source=broken-db|" in text, text
    assert not rx.at("/ops", source="broken-db", type_="ferry.backup.recovered")


def test_a_stale_source_raises_one_stale_per_episode_and_recovers_once(world):
    ferry, rx = world["ferry"], world["receivers"]
    first = ferry.webhook_job("stale-db")
    assert first["phase"] == "committed", first
    now_ms = int(time.time() * 1000)
    # Health is judged at each tick's own time: 61 minutes on, the backup is older than max_age.
    ferry.scheduled(TRIGGER, at_ms=now_ms + 61 * MINUTE_MS)
    (stale,) = rx.wait("/ops", 1, source="stale-db", type_="ferry.backup.stale")
    assert stale["signature_problem"] is None
    data = stale["payload"]["data"]
    assert data["max_age_seconds"] == 3600 and "more than max_age (1 h 0 min)" in data["reason"], data
    assert data["last_backup_at"] == first["finished_at"], data
    rx.wait("/slack", 1, source="stale-db")
    ferry.scheduled(TRIGGER, at_ms=now_ms + 70 * MINUTE_MS)  # the same episode
    settle()
    assert len(rx.at("/ops", source="stale-db", type_="ferry.backup.stale")) == 1
    second = ferry.webhook_job("stale-db")  # the next success ends the episode
    assert second["phase"] == "committed", second
    (recovered,) = rx.wait("/ops", 1, source="stale-db", type_="ferry.backup.recovered")
    assert recovered["payload"]["data"]["recovered_from"] == ["stale"]
    assert recovered["payload"]["data"]["job_id"] == second["id"]
    ferry.scheduled(TRIGGER, at_ms=now_ms + 140 * MINUTE_MS)  # a new episode
    rx.wait("/ops", 2, source="stale-db", type_="ferry.backup.stale")
    ferry.scheduled(TRIGGER, at_ms=now_ms + 150 * MINUTE_MS)
    settle()
    stales = rx.at("/ops", source="stale-db", type_="ferry.backup.stale")
    assert len(stales) == 2 and len({r["headers"]["webhook-id"] for r in stales}) == 2, stales
    assert len(rx.at("/ops", source="stale-db", type_="ferry.backup.recovered")) == 1
    slack = rx.at("/slack", source="stale-db")
    assert len(slack) == 3 and all(r["problems"] == [] for r in slack), slack  # stale, recovered, stale
    assert not rx.at("/ops", source="broken-db", type_="ferry.backup.stale"), "other sources are not stale"


def test_a_receiver_answering_500_gets_retries_while_backups_keep_running(world):
    ferry, rx = world["ferry"], world["receivers"]
    first = ferry.webhook_job("shop")
    assert first["phase"] == "committed", first
    (attempt,) = rx.wait("/flaky", 1, source=first["id"])
    event_id = attempt["headers"]["webhook-id"]
    # The receiver is failing; another backup of the same source runs and commits meanwhile.
    second = ferry.webhook_job("shop")
    assert second["phase"] == "committed", second
    during = len(rx.at("/flaky", source=first["id"]))
    assert during < 4, f"the first event's retries were over before the second backup ended ({during})"
    attempts = rx.wait("/flaky", 4, timeout=60, source=first["id"])
    rx.wait("/flaky", 4, timeout=60, source=second["id"])
    settle()
    attempts = rx.at("/flaky", source=first["id"])
    assert len(attempts) == 4, "max_attempts, then given up"
    assert {a["headers"]["webhook-id"] for a in attempts} == {event_id}, "one id across retries"
    assert all(a["signature_problem"] is None for a in attempts), [a["signature_problem"] for a in attempts]
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 1.5 and gaps[1] > gaps[0] + 1 and gaps[2] > gaps[1] + 2, gaps  # 2 s, 4 s, 8 s
    # The receiver that answers gets both committed events once each.
    ops = [r for r in rx.at("/ops", type_="ferry.backup.committed") if r["payload"]["data"]["source"] == "shop"]
    assert sorted(r["payload"]["data"]["job_id"] for r in ops) == sorted([first["id"], second["id"]])

    assert ferry.api("/v1/alerts", token=None)[0] == 401
    view = ferry.api_json("/v1/alerts")
    flaky = next(d for d in view["destinations"] if d["name"] == "flaky")
    assert flaky["failures"] == 8 and flaky["delivered"] == 0, flaky
    assert flaky["last_attempt"]["next"] == "give_up" and flaky["last_attempt"]["status"] == 500
    recorded = [a for a in view["attempts"] if a["event_id"] == event_id and a["destination"] == "flaky"]
    assert sorted(a["attempt"] for a in recorded) == [1, 2, 3, 4], recorded
    assert [a["next"] for a in sorted(recorded, key=lambda a: a["attempt"])] == ["retry"] * 3 + ["give_up"]
    assert all(a["error"] == "HTTP 500: boom" and a["status"] == 500 for a in recorded), recorded
    (to_ops,) = [a for a in view["attempts"] if a["event_id"] == event_id and a["destination"] == "ops"]
    assert (to_ops["attempt"], to_ops["status"], to_ops["next"]) == (1, 204, "delivered"), "the same event, its own delivery"
    ops_view = next(d for d in view["destinations"] if d["name"] == "ops")
    assert ops_view["failures"] == 0 and ops_view["delivered"] >= 2, ops_view

    status, _, body = ferry.api("/metrics")
    text = body.decode()
    assert 'ferry_notification_failures_total{destination="flaky"} 8' in text.splitlines(), text
    assert 'ferry_notification_failures_total{destination="ops"} 0' in text.splitlines()
    assert "# TYPE ferry_notification_failures_total counter" in text
