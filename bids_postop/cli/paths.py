"""The run's folders, checked before anything is written, and the work directory's ownership marker.

Order (``bids_postop`` main): the arguments are parsed, then :func:`check_run_paths` refuses every unsafe
combination of folders without writing anything; only then are the output and work folders created
(:func:`prepare_output_dir`, :func:`prepare_work_dir`) and the log file opened.

Rules:

- The BIDS folder must exist (exit 66). The output folder may not be the BIDS dataset, contain it, lie inside it
  outside ``derivatives/``, or be a raw BIDS dataset itself (arguments swapped?) (exit 73).
- The work folder may not be, lie inside or contain the BIDS dataset, any ``-d`` dataset or the output folder,
  and may not be or contain the home folder or ``/`` (exit 64): intermediate files never land in a user's
  data, and ``--clean-workdir`` can never reach them.
- ``--clean-workdir`` empties only a folder that bids_postop created (it holds :data:`WORK_MARKER`), and only
  what lies under it: symbolic links are removed, never followed.
- A folder that cannot be created or written is exit 73, with the path named.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from bids_postop import __version__
from bids_postop.errors import InputDataError, OutputError, UsageError

WORK_MARKER = ".bids_postop_workdir.json"
DERIVATIVES = "derivatives"
PIPELINE_NAME = "bids_postop"


def _relation(a: Path, b: Path) -> str | None:
    """How folder ``a`` relates to folder ``b``: "is", "is inside", "contains" or None (both resolved)."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_bids_dir(bids_dir: Path) -> Path:
    """The input dataset must be an existing folder (exit 66)."""
    if not bids_dir.is_dir():
        raise InputDataError("the BIDS directory does not exist (for containers: is it bind-mounted, "
                             "e.g. docker -v /path/to/bids:/data:ro?)", bids_dir)
    return bids_dir


def _is_raw_bids_dataset(folder: Path) -> bool:
    description = folder / "dataset_description.json"
    if not description.is_file():
        return False
    try:
        kind = json.loads(description.read_text()).get("DatasetType", "raw")
    except (OSError, ValueError, AttributeError):
        return False
    return str(kind).lower() == "raw"


def check_output_dir(output_dir: Path, bids_dir: Path) -> Path:
    """Refuse output folders that would damage or pollute the input dataset (exit 73); writes nothing."""
    out, bids = output_dir.resolve(), bids_dir.resolve()
    suggestion = bids / DERIVATIVES / PIPELINE_NAME
    if out == bids:
        raise OutputError(f"{out}: the output directory is the BIDS dataset itself; use {suggestion} instead")
    if bids in out.parents and (bids / DERIVATIVES) not in (out, *out.parents):
        raise OutputError(f"{out}: the output directory lies inside the BIDS dataset outside derivatives/; "
                          f"use {suggestion}")
    if out in bids.parents:
        raise OutputError(f"{out}: the output directory contains the BIDS dataset; choose a separate folder")
    if _is_raw_bids_dataset(out):
        raise OutputError(f"{out}: the output directory is a raw BIDS dataset (its dataset_description.json has "
                          f"no DatasetType 'derivative'); were BIDS_DIR and OUTPUT_DIR swapped? The order is "
                          f"bids_postop BIDS_DIR OUTPUT_DIR participant")
    return out


def check_work_dir(work_dir: Path, *, bids_dir: Path, output_dir: Path,
                   derivatives: Mapping[str, Path] | None = None) -> Path:
    """Refuse a work folder that is, lies inside or contains a dataset or the output, or holds home (exit 64)."""
    work = work_dir.resolve()
    protected = {"the BIDS dataset": bids_dir, "the output directory": output_dir,
                 **{f"the -d dataset '{name}'": path for name, path in (derivatives or {}).items()}}
    for what, path in protected.items():
        how = _relation(work, Path(path).expanduser().resolve())
        if how is not None:
            raise UsageError(f"-w {work}: the work directory {how} {what} ({Path(path).resolve()}); intermediate "
                             f"files must not mix with data or results: give a separate folder, e.g. -w "
                             f"{Path.cwd().resolve() / 'work'} or a scratch folder")
    home = Path.home().resolve()
    for what, path in (("the home folder", home), ("the file-system root", Path("/"))):
        if work == path or work in path.parents:
            raise UsageError(f"-w {work}: the work directory is or contains {what}; give a dedicated folder")
    return work


def _writable(folder: Path, what: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write to the {what} ({exc.strerror or exc}); for containers, bind it "
                          f"writable (docker -v {folder}:{folder}, singularity -B {folder})") from exc
    return folder


def prepare_output_dir(output_dir: Path) -> Path:
    """Create the output folder and check it can be written (exit 73)."""
    return _writable(output_dir, "output directory")


def prepare_work_dir(work_dir: Path) -> Path:
    """Create the work folder (exit 73 when it cannot be written) and mark it as bids_postop's when it is new or
    empty, so that ``--clean-workdir`` may later empty it."""
    existed = work_dir.is_dir() and any(work_dir.iterdir())
    _writable(work_dir, "work directory")
    marker = work_dir / WORK_MARKER
    if not existed and not marker.exists():
        marker.write_text(json.dumps({"created_by": f"bids_postop {__version__}",
                                      "note": "intermediate files; safe to delete once a cohort is finished"},
                                     indent=2) + "\n")
    return work_dir


def clean_work_dir(work_dir: Path) -> int:
    """Empty a work folder that bids_postop created (it holds :data:`WORK_MARKER`); returns the entries removed.

    Refuses (exit 64) a folder without the marker: bids_postop did not create it, so it may hold anything.
    Only what lies under the folder is removed; symbolic links are unlinked, never followed.
    """
    work = work_dir.resolve()
    if not work.is_dir():
        return 0
    marker = work / WORK_MARKER
    entries = [child for child in work.iterdir() if child.name != WORK_MARKER]
    if not marker.is_file():
        if not entries:
            return 0
        raise UsageError(f"--clean-workdir: refusing to empty {work}: bids_postop did not create it (no "
                         f"{WORK_MARKER}); delete it yourself if it holds only intermediate files, or give a new -w")
    for child in entries:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return len(entries)


def check_run_paths(*, bids_dir: Path, output_dir: Path, work_dir: Path | None,
                    derivatives: Mapping[str, Path] | None = None) -> None:
    """Every folder check of a run, before anything is written (66, 73, 64 as documented)."""
    check_bids_dir(bids_dir)
    check_output_dir(output_dir, bids_dir)
    for name, path in (derivatives or {}).items():
        if not Path(path).expanduser().is_dir():
            raise InputDataError(f"the derivatives dataset '{name}' (-d {name}={path}) does not exist", path)
    if work_dir is not None:
        check_work_dir(work_dir, bids_dir=bids_dir, output_dir=output_dir, derivatives=derivatives)
