import sys
from pathlib import Path

import pytest

# Make `harness` and `emulators` importable from every test module.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Rows (provider, step, fault, outcome, seconds) the fault suite (test_e2e_faults.py) collects.
_FAULT_ROWS: list = []


@pytest.fixture(scope="session")
def fault_table() -> list:
    """The fault suite's table of cases and outcomes, printed at the end of the session."""
    return _FAULT_ROWS


def pytest_terminal_summary(terminalreporter):
    """Prints the fault suite's table (also under -q)."""
    if not _FAULT_ROWS:
        return
    rows = sorted(_FAULT_ROWS, key=lambda r: (r[0], r[1], r[2]))
    head = ("provider", "step", "fault", "seconds", "outcome")
    widths = [max(len(head[i]), *(len(str(r[i])) for r in rows)) for i in range(3)]
    terminalreporter.section("fault suite: cases and outcomes")
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells[:3], widths)) + \
        f"  {cells[3]:>7}  {cells[4]}"  # noqa: E731
    terminalreporter.write_line(line(head))
    for provider, step, fault, outcome, seconds in rows:
        terminalreporter.write_line(line((provider, step, fault, f"{seconds:.1f}", outcome)))
