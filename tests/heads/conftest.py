import sys
from pathlib import Path

# the eviction tests' shared checks (plain references, no method code) serve the head-level methods too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eviction"))
