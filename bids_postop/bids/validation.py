"""Validation of the input dataset with the official BIDS validator, when it is installed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bids_postop.errors import InputDataError
from bids_postop.executables import find_executable

VALIDATOR = "bids-validator-deno"


def validate_dataset(bids_dir: Path, *, timeout_s: int = 600) -> list[str]:
    """Run the BIDS validator; return warnings, raise :class:`InputDataError` listing errors.

    Returns ``["validator not installed …"]`` when the executable is missing (pybids then still checks
    file names while indexing).
    """
    exe = find_executable(VALIDATOR)
    if exe is None:
        return [f"{VALIDATOR} not found: only pybids' file-name checks were applied"]
    proc = subprocess.run([exe, str(bids_dir), "--json", "--ignoreNiftiHeaders"], capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return [f"{VALIDATOR} gave no readable report (exit {proc.returncode}): {proc.stderr.strip()[:300]}"]
    issues = report.get("issues", {}).get("issues", [])
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        lines = sorted({f"{i.get('code')}: {i.get('location', '')} {i.get('issueMessage', '') or ''}".strip()
                        for i in errors})
        shown = "\n  ".join(lines[:15]) + (f"\n  … and {len(lines) - 15} more" if len(lines) > 15 else "")
        raise InputDataError(f"the BIDS validator found {len(errors)} error(s):\n  {shown}\n"
                             f"Fix them, or rerun with --skip-bids-validation", bids_dir)
    return sorted({str(i.get("code")) for i in issues if i.get("severity") == "warning"})
