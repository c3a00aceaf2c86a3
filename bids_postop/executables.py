"""Find the command-line tools installed alongside this Python (a virtual environment's ``bin/``).

Users often run ``/path/to/venv/bin/bids_postop`` without activating the environment, and the README's
test command is ``.venv/bin/python -m pytest``: ``PATH`` then lacks the environment's ``bin/``, so a
plain ``shutil.which`` would miss tools installed with the package (the BIDS validator, ``bosh``,
``hadolint``) and silently skip what they check.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_executable(name: str) -> str | None:
    """The path of ``name`` next to the running interpreter, else on ``PATH``, else ``None``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)
