"""Validation of the input dataset with the official BIDS validator (``bids-validator-deno``, a dependency).

As fMRIPrep does, only the participants being run are held to it: errors located under another participant's
folder are dropped (a bad file of participant 07 must not stop participant 01's job of a Slurm array), while
dataset-level errors (dataset_description.json, participants.tsv, …) always count. When the validator is missing
(a broken install), the run goes on with pybids' file-name checks and says so as a WARNING and in the provenance.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bids_postop.errors import InputDataError
from bids_postop.executables import find_executable

VALIDATOR = "bids-validator-deno"
_SUBJECT_LOCATION = re.compile(r"^/sub-([A-Za-z0-9]+)(/|_|$)")


@dataclass
class ValidationResult:
    """What the validation did, for the log and the provenance."""

    validator: str  # "bids-validator-deno <version>" or "not installed"
    participants: list[str] | None = None  # participants held to it (None: all)
    warnings: list[str] = field(default_factory=list)  # warning codes
    errors_of_other_participants: int = 0
    note: str = ""

    def provenance(self) -> dict:
        return {"validator": self.validator, "participants": self.participants or "all",
                "warnings": self.warnings, "errors_of_other_participants_ignored": self.errors_of_other_participants,
                **({"note": self.note} if self.note else {})}


def _version() -> str:
    # the package's version: the binary's own --version prints the git revision of the current folder
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(VALIDATOR)
    except PackageNotFoundError:
        return "unknown version"


def validate_dataset(bids_dir: Path, *, participants: Sequence[str] | None = None,
                     timeout_s: int = 600) -> ValidationResult:
    """Run the BIDS validator on ``bids_dir``; raise :class:`InputDataError` listing the errors that concern the
    dataset or the given ``participants`` (labels, with or without ``sub-``; ``None``: every participant)."""
    labels = None if participants is None else sorted({p.removeprefix("sub-") for p in participants})
    exe = find_executable(VALIDATOR)
    if exe is None:
        return ValidationResult(validator="not installed", participants=labels,
                                note=f"{VALIDATOR} not found: only pybids' file-name checks were applied "
                                     f"(reinstall bids_postop, or pass --skip-bids-validation to silence this)")
    proc = subprocess.run([exe, str(bids_dir), "--format", "json", "--ignoreNiftiHeaders"], capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    result = ValidationResult(validator=f"{VALIDATOR} {_version()}", participants=labels)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        result.note = f"{VALIDATOR} gave no readable report (exit {proc.returncode}): {proc.stderr.strip()[:300]}"
        return result
    issues = report.get("issues", {}).get("issues", [])
    errors = []
    for issue in (i for i in issues if i.get("severity") == "error"):
        match = _SUBJECT_LOCATION.match(str(issue.get("location", "")))
        if labels is not None and match is not None and match.group(1) not in labels:
            result.errors_of_other_participants += 1
            continue
        errors.append(issue)
    if errors:
        lines = sorted({f"{i.get('code')}: {i.get('location', '')} {i.get('issueMessage', '') or ''}".strip()
                        for i in errors})
        shown = "\n  ".join(lines[:15]) + (f"\n  … and {len(lines) - 15} more" if len(lines) > 15 else "")
        raise InputDataError(f"the BIDS validator found {len(errors)} error(s):\n  {shown}\n"
                             f"Fix them, or rerun with --skip-bids-validation", bids_dir)
    result.warnings = sorted({str(i.get("code")) for i in issues if i.get("severity") == "warning"})
    return result
