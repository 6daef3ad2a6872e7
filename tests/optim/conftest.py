"""Makes tests/optim/optim_helpers.py importable (``--import-mode=importlib`` does not add
test directories to ``sys.path``)."""

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
