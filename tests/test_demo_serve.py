"""The demo's `--serve` mode in a real browser (Debian's Chromium driven by Playwright for Python).

`python3 scripts/demo.py --serve` (what `bash scripts/demo.sh --serve` runs after set-up and the
build) backs up its four sources against the emulators, then keeps the emulators and the Worker
running and prints the dashboard's URL and the API token. The dashboard signs in with that token;
"Back up now" on the DXP source runs to committed with its progress bar; a file of the D1 source
downloads byte for byte; "Drill now" on the D1 source passes. Then SIGINT, as Ctrl-C sends it,
stops everything: exit 0, a line saying so, and neither the Worker's nor any emulator's port
answers any more.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import ROOT, ensure_built
from test_e2e_dashboard import CHROMIUM, CHROMIUM_ARGS, browser_tools

READY_TIMEOUT = 240  # emulators, wrangler dev and four backups; about 30 s on a quiet machine
STOP_TIMEOUT = 40    # the demo stops each child with SIGTERM, SIGKILL after 10 s


class Demo:
    """`scripts/demo.py --serve` in its own process group, its output collected line by line."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--serve", "--workdir", str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        regex = re.compile(pattern)
        while time.time() < deadline:
            for line in list(self.lines):
                if m := regex.search(line):
                    return m
            if self.proc.poll() is not None:
                self.reader.join(5)
                pytest.fail(f"demo.py --serve exited {self.proc.returncode} before printing /{pattern}/:\n"
                            + self.output())
            time.sleep(0.2)
        pytest.fail(f"demo.py --serve printed no /{pattern}/ within {timeout:.0f} s:\n" + self.output())

    def interrupt(self) -> int:
        """SIGINT to its process group, as Ctrl-C in a terminal; its exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"demo.py --serve did not exit within {STOP_TIMEOUT} s of SIGINT:\n" + self.output())
        self.reader.join(5)
        return code

    def kill(self) -> None:
        """Teardown after a failure: SIGTERM (the demo stops its children), SIGKILL as a last resort."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_mentioning(text: str) -> list[str]:
    """Running processes whose command line mentions `text` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in args and state not in ("Z", "X"):
            found.append(f"{cmdline.parent.name}: {args}")
    return found


def test_demo_serve_runs_the_dashboard_until_ctrl_c(tmp_path):
    tools = browser_tools()
    expect, sync_playwright = tools.expect, tools.sync_playwright
    ensure_built()  # the suite builds first; demo.py runs build/ as it is
    work = tmp_path / "demo"
    demo = Demo(work)
    try:
        base = demo.wait_for(r"^  dashboard: (http://127\.0\.0\.1:\d+)/$", READY_TIMEOUT).group(1)
        token = demo.wait_for(r"^  API token: (\S+)$", 5).group(1)
        demo.wait_for(r"Press Ctrl-C to stop", 5)
        worker_port = int(base.rsplit(":", 1)[1])
        emulator_ports = [int(p) for p in re.findall(r"emulator on http://127\.0\.0\.1:(\d+)", demo.output())]
        assert len(emulator_ports) == 4 and answers(worker_port), demo.output()

        problems: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(base + "/")
                expect(page.locator("#login")).to_be_visible()
                page.fill("#token", token)
                page.click("#login button[type=submit]")
                card = lambda name: page.locator(f'article.card[data-source="{name}"]')  # noqa: E731
                for name in ("shop", "catalog-graph", "social-graph", "intranet"):
                    expect(card(name)).to_have_attribute("data-light", "green", timeout=15_000)
                intranet, shop = card("intranet"), card("shop")
                expect(intranet.locator(".backups-summary")).to_have_text("Backups (1)")
                expect(shop.locator(".drill-now")).to_be_visible()

                # "Back up now" on the paced DXP source: in flight with its bar, then committed.
                intranet.locator(".backup-now").click()
                expect(intranet.locator(".action-result")).to_have_text(
                    re.compile(r"^Backup started: job [0-9a-f]{16}$"))
                expect(intranet.locator(".inflight")).to_be_visible(timeout=10_000)
                expect(intranet.locator(".inflight progress.bar")).to_be_visible()
                expect(intranet.locator(".inflight")).to_be_hidden(timeout=60_000)
                expect(intranet.locator(".last-run")).to_contain_text("backup committed")
                expect(intranet.locator(".backups-summary")).to_have_text("Backups (2)", timeout=10_000)

                # A file of the D1 backup downloads, matching the sha256 the page shows.
                shop.locator("details.backups summary").click()
                button = shop.locator("button.file").first
                expect(button).to_be_visible()
                sha256 = re.search(r"sha256 ([0-9a-f]{64})", button.get_attribute("title")).group(1)
                with page.expect_download() as download:
                    button.click()
                saved = tmp_path / "download"
                download.value.save_as(saved)
                assert hashlib.sha256(saved.read_bytes()).hexdigest() == sha256

                # "Drill now" on the D1 source: a scratch database, every table compared, passed.
                shop.locator(".drill-now").click()
                expect(shop.locator(".action-result")).to_contain_text("Restore drill started: job")
                expect(shop.locator(".last-run")).to_contain_text("drill passed", timeout=60_000)
                expect(shop.locator(".drill .good")).to_have_text("passed", timeout=10_000)
            finally:
                browser.close()
        assert problems == [], problems

        code = demo.interrupt()
        assert code == 0, demo.output()
        assert re.search(r"^stopped: ", demo.output(), re.M), demo.output()
        assert not answers(worker_port), f"the Worker's port {worker_port} still answers"
        assert [p for p in emulator_ports if answers(p)] == [], "an emulator's port still answers"
        assert processes_mentioning(str(work)) == [], "a child of the demo is still running"
    finally:
        demo.kill()
