"""Input discovery: which images each participant has, found with pybids before any processing.

Rules (documented in README, "Inputs"):
- post-op contrast T1w: ``ses-<postop>/anat/*_ce-<any label>_T1w.nii[.gz]`` (gadolinium, Gd, GADOLINIUM…);
- post-op T1w: ``*_T1w`` without a ``ce-`` entity; post-op FLAIR: ``*_FLAIR``;
- pre-op contrast T1w: ``ses-<preop>/anat/*_ce-<label>_T1w``;
- pre-op tumour mask: ``ses-<preop>/anat/*_label-tumor[_desc-*]_mask`` in a derivatives dataset (``-d``);
- post-op non-enhancing residual tumour mask (optional, for the RANO resect classes 1 vs 2A):
  ``ses-<postop>/anat/*_label-nonenhancing[_desc-*]_mask`` in a derivatives dataset (``-d``), any grid;
- a participant without sessions: its session-less files are taken as post-operative;
- several matches (``run-1``, ``run-2``, ``acq-…``): the highest run is taken, then the first file
  name in sorted order; the choice is recorded as a note;
- ``site`` comes from participants.tsv (column ``site``, else ``institution`` or ``hospital``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_postop.configurations import ROLE_DESCRIPTIONS, ROLES, Role
from bids_postop.errors import InputDataError, UsageError

NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
# Not a model channel: a measured volume only (RANO resect class 1 vs 2A), in any grid.
NONENHANCING_ROLE = "postop_nonenhancing_mask"

# Keys accepted in --bids-filter-file, mapped to roles (fMRIPrep-style names and our role names).
FILTER_KEYS: dict[str, Role] = {
    "t1ce": "postop_t1ce", "t1w_ce": "postop_t1ce", "postop_t1ce": "postop_t1ce",
    "t1w": "postop_t1", "postop_t1": "postop_t1",
    "flair": "postop_flair", "postop_flair": "postop_flair",
    "preop_t1ce": "preop_t1ce",
    "preop_mask": "preop_mask",
}


@dataclass(frozen=True)
class ParticipantInputs:
    """The input files found for one participant (paths are absolute; roles absent when not found)."""

    subject: str  # without "sub-"
    postop_session: str | None  # None when the participant has no session folders
    preop_session: str | None
    site: str | None
    files: Mapping[Role, Path]
    notes: tuple[str, ...] = field(default=())

    @property
    def available(self) -> frozenset[Role]:
        return frozenset(self.files)

    @property
    def missing(self) -> tuple[Role, ...]:
        return tuple(r for r in ROLES if r not in self.files)

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"


def normalize_label(label: str) -> str:
    """``sub-01`` or ``01`` → ``01``."""
    label = label.strip()
    return label[4:] if label.startswith("sub-") else label


def load_bids_filters(path: str | Path | None) -> dict[Role, dict[str, Any]]:
    """Read a ``--bids-filter-file``: JSON object of role → pybids query overrides."""
    if path is None:
        return {}
    import json

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the BIDS filter file as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the BIDS filter file must hold a JSON object, not {type(raw).__name__}")
    filters: dict[Role, dict[str, Any]] = {}
    for key, query in raw.items():
        if key not in FILTER_KEYS:
            raise UsageError(f"{path}: unknown key {key!r} in the BIDS filter file; allowed: {sorted(FILTER_KEYS)}")
        if not isinstance(query, dict):
            raise UsageError(f"{path}: the value of {key!r} must be a JSON object of BIDS entities")
        filters[FILTER_KEYS[key]] = query
    return filters


def read_sites(bids_dir: Path) -> dict[str, str]:
    """participant label (no ``sub-``) → site, from participants.tsv; empty when there is none.

    UTF-8 with or without a byte-order mark (as spreadsheet programs write it); rows with missing or
    extra cells are tolerated.
    """
    tsv = bids_dir / "participants.tsv"
    if not tsv.is_file():
        return {}
    try:
        with tsv.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            fields = [f for f in (reader.fieldnames or []) if f is not None]
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise InputDataError(f"participants.tsv is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                             f"as UTF-8", tsv) from exc
    columns = {c.strip().lower(): c for c in fields}
    column = next((columns[c] for c in ("site", "institution", "hospital") if c in columns), None)
    if column is None or "participant_id" not in columns:
        return {}
    id_column = columns["participant_id"]
    sites = {}
    for row in rows:
        label, site = row.get(id_column), row.get(column)
        if label and site not in (None, "", "n/a"):
            sites[normalize_label(label)] = site
    return sites


def _pick(files: Sequence[Any], role: Role, notes: list[str]) -> Path | None:
    """Apply the documented rule when several files match a role."""
    if not files:
        return None
    if len(files) == 1:
        return Path(files[0].path)

    def key(f: Any) -> tuple[int, str]:
        run = f.get_entities().get("run")
        return (-int(run) if run is not None else 0, Path(f.path).name)

    chosen = sorted(files, key=key)[0]
    others = ", ".join(sorted(Path(f.path).name for f in files if f is not chosen))
    notes.append(f"{role}: {len(files)} files match; took {Path(chosen.path).name} "
                 f"(highest run, then first name) over {others}")
    return Path(chosen.path)


def _query(layout: Any, subject: str, role: Role, session: str | None,
           filters: Mapping[Role, Mapping[str, Any]], notes: list[str], **entities: Any) -> Path | None:
    from bids.layout import Query

    base = {"subject": subject, "datatype": "anat", "extension": NIFTI_EXTENSIONS,
            "session": session if session is not None else Query.NONE}
    base.update(entities)
    base.update(filters.get(role, {}))
    return _pick(layout.get(**base), role, notes)


def bids_dataset_name(root: str | Path) -> str | None:
    """The ``Name`` of a BIDS dataset's dataset_description.json (None when missing or unreadable): model
    cards record what a model was trained on."""
    try:
        name = json.loads((Path(root) / "dataset_description.json").read_text(encoding="utf-8")).get("Name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name.strip() else None


def _open_layout(root: Path, *, validate: bool, derivative: bool = False) -> Any:
    from bids import BIDSLayout

    if not root.is_dir():
        raise InputDataError("directory does not exist (for containers: is it bind-mounted?)", root)
    if not (root / "dataset_description.json").is_file():
        kind = "derivatives dataset" if derivative else "BIDS dataset"
        raise InputDataError(f"not a {kind}: dataset_description.json is missing", root)
    try:
        if derivative:
            return BIDSLayout(str(root), validate=False, config=["bids", "derivatives"])
        return BIDSLayout(str(root), validate=validate)
    except Exception as exc:  # pybids raises a variety of errors for malformed datasets
        raise InputDataError(f"pybids cannot index this dataset: {exc}", root) from exc


def discover(
    bids_dir: str | Path,
    *,
    participant_labels: Sequence[str] | None = None,
    postop_session: str = "postop",
    preop_session: str = "preop",
    derivatives: Mapping[str, str | Path] | None = None,
    bids_filters: Mapping[Role, Mapping[str, Any]] | None = None,
    validate: bool = True,
) -> list[ParticipantInputs]:
    """Find every participant's inputs. Raises :class:`InputDataError` when the dataset is unusable
    or a requested participant label does not exist."""
    from bids.layout import Query

    bids_dir = Path(bids_dir).resolve()
    layout = _open_layout(bids_dir, validate=validate)
    deriv_layouts = [(name, _open_layout(Path(p).resolve(), validate=False, derivative=True))
                     for name, p in (derivatives or {}).items()]
    filters = dict(bids_filters or {})
    all_subjects = sorted(layout.get_subjects())
    if participant_labels:
        wanted = [normalize_label(label) for label in participant_labels]
        unknown = [w for w in wanted if w not in all_subjects]
        if unknown:
            raise InputDataError(
                f"participant label(s) {', '.join('sub-' + u for u in unknown)} not found; the dataset has "
                f"{', '.join('sub-' + s for s in all_subjects) or 'no participants'}", bids_dir)
        subjects = list(dict.fromkeys(wanted))
    else:
        subjects = all_subjects
    if not subjects:
        raise InputDataError("no participants (sub-*/ folders) found", bids_dir)
    sites = read_sites(bids_dir)

    found: list[ParticipantInputs] = []
    for subject in subjects:
        sessions = set(layout.get_sessions(subject=subject))
        notes: list[str] = []
        if sessions:
            post_ses: str | None = postop_session if postop_session in sessions else None
            pre_ses: str | None = preop_session if preop_session in sessions else None
            if post_ses is None:
                notes.append(f"no ses-{postop_session} (sessions found: {', '.join(sorted(sessions))})")
        else:
            post_ses, pre_ses = None, None

        def query(role: Role, session: str | None, **entities: Any) -> Path | None:
            return _query(layout, subject, role, session, filters, notes, **entities)  # noqa: B023

        files: dict[Role, Path] = {}
        if post_ses is not None or not sessions:
            candidates: dict[Role, Path | None] = {
                "postop_t1ce": query("postop_t1ce", post_ses, suffix="T1w", ceagent=Query.ANY),
                "postop_t1": query("postop_t1", post_ses, suffix="T1w", ceagent=Query.NONE),
                "postop_flair": query("postop_flair", post_ses, suffix="FLAIR"),
            }
            files.update({r: p for r, p in candidates.items() if p is not None})
        if pre_ses is not None:
            pre = query("preop_t1ce", pre_ses, suffix="T1w", ceagent=Query.ANY)
            if pre is not None:
                files["preop_t1ce"] = pre
        for _name, dlayout in deriv_layouts:
            if pre_ses is None or "preop_mask" in files:
                break
            q = {"subject": subject, "session": pre_ses, "suffix": "mask", "label": "tumor",
                 "extension": NIFTI_EXTENSIONS}
            q.update(filters.get("preop_mask", {}))
            mask = _pick(dlayout.get(**q), "preop_mask", notes)
            if mask is not None:
                files["preop_mask"] = mask
        for _name, dlayout in deriv_layouts:
            if (post_ses is None and sessions) or NONENHANCING_ROLE in files:
                break
            q = {"subject": subject, "session": post_ses if post_ses is not None else Query.NONE, "suffix": "mask",
                 "label": "nonenhancing", "extension": NIFTI_EXTENSIONS}
            mask = _pick(dlayout.get(**q), NONENHANCING_ROLE, notes)  # type: ignore[arg-type]
            if mask is not None:
                files[NONENHANCING_ROLE] = mask  # type: ignore[index]
        if "preop_mask" in files and "preop_t1ce" not in files:
            notes.append("pre-op tumour mask found without a pre-op T1w-CE: both are needed; mask ignored")
            del files["preop_mask"]
        found.append(ParticipantInputs(subject=subject, postop_session=post_ses, preop_session=pre_ses,
                                       site=sites.get(subject), files=files, notes=tuple(notes)))
    return found


def expected_names(inputs: ParticipantInputs, postop_session: str, preop_session: str) -> list[str]:
    """Human-readable list of what is missing and where it was looked for."""
    return [f"{role}: {ROLE_DESCRIPTIONS[role]}".replace("<postop>", postop_session).replace("<preop>", preop_session)
            for role in inputs.missing]


def format_inputs_table(participants: Sequence[ParticipantInputs], configs: Mapping[str, str | None]) -> str:
    """A plain-text table of participants × inputs (found ✓ / missing ·) and the configuration each uses."""
    short = {"postop_t1ce": "T1w-CE", "postop_t1": "T1w", "postop_flair": "FLAIR",
             "preop_t1ce": "pre-T1w-CE", "preop_mask": "pre-mask"}
    header = ["participant", "site", *[short[r] for r in ROLES], "config"]
    rows = [[p.participant_id, p.site or "n/a", *["yes" if r in p.files else "-" for r in ROLES],
             configs.get(p.subject) or "skip"] for p in participants]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
