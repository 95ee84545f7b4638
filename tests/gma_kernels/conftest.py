"""The float64 reference (``reference.py``) and the shared helpers (``gk_util.py``) are
importable from every test folder below this one, which mirror the package's layout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
