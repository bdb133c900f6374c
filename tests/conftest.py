import sys
from pathlib import Path

# Make `harness` and `emulators` importable from every test module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
