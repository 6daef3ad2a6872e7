"""Makes the shared helpers of this folder (schedule_helpers.py) importable by its tests."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
