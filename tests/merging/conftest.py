import sys
from pathlib import Path

# merging methods are eviction methods with a merge hook: their tests reuse the eviction tests' shared checks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eviction"))
