"""Published models: the catalogue, what to fetch, and the local cache (the transfer itself — download with
progress, resume and md5, safe zip extraction — is :mod:`bids_postop.models.transfer`).

The catalogue has the format of the Raidionics release's ``raidionics_cloud_models_list_github.csv``:
columns ``Model`` (name), ``link`` (zip URL), ``sum`` (md5 of the zip; empty = unknown) and
``dependencies`` (names separated by ``;``). The package ships :data:`BUNDLED_CATALOGUE` listing the
post-operative models ``MRI_GBM_Postop_FV_1p`` … ``_5p`` and ``MRI_Brain`` of release 1.2.0. Its
checksums are empty because they could not be verified when it was written, and only the ``_5p`` and
``MRI_Brain`` asset names were confirmed (``_1p`` … ``_4p`` follow the ``_5p`` pattern). When an entry
has no checksum, :func:`fetch` first tries the release's own catalogue (:data:`CATALOGUE_URL`); a
catalogue given explicitly (URL or path) is used as is.

Models are cached under ``$BIDS_POSTOP_HOME`` (default ``~/.cache/bids_postop/models``), one folder per
model, named as in the catalogue. A download goes to ``.downloads/<asset>.zip.part`` (resumed with an
HTTP Range request when the command is run again), is checked against its md5, extracted into a
staging folder (entries with absolute paths, ``..`` or symlinks leading outside are refused), and moved
into place with one rename. Every installed folder holds ``bids_postop_install.json`` (source URL or
path, md5, whether the md5 was verified, date).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from bids_postop import __version__
from bids_postop.errors import ModelError
from bids_postop.models.transfer import (
    DownloadError,
    download,
    failure_reason,
    file_md5,
    http_request,
    safe_extract,
)
from bids_postop.segmentation.models import CARD_NAME

LOG = logging.getLogger("bids_postop")

RELEASE_URL = "https://github.com/raidionics/Raidionics-models/releases/download/1.2.0"
CATALOGUE_URL = f"{RELEASE_URL}/raidionics_cloud_models_list_github.csv"
BUNDLED_CATALOGUE = Path(__file__).resolve().parents[1] / "data" / "raidionics_models_1.2.0.csv"
HOME_ENV = "BIDS_POSTOP_HOME"
DEFAULT_HOME = "~/.cache/bids_postop/models"
INSTALL_RECORD = "bids_postop_install.json"
MODEL_MARKERS = ("pre_processing.ini", CARD_NAME, "plans.json")  # Raidionics, bids_postop card, nnU-Net
DOWNLOADS = ".downloads"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MD5_PATTERN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    url: str
    md5: str | None  # None: unknown
    dependencies: tuple[str, ...] = ()

    @property
    def archive_name(self) -> str:
        return PurePosixPath(urllib.parse.urlparse(self.url).path).name or f"{self.name}.zip"


def models_home(home: str | Path | None = None) -> Path:
    """The cache folder: ``home`` if given, else ``$BIDS_POSTOP_HOME``, else ``~/.cache/bids_postop/models``."""
    return Path(home or os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def _check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ModelError(f"{name!r} is not a valid model name (letters, digits, '_', '-', '.'; no path)")
    return name


# ------------------------------------------------------------------------------------------------
# catalogue


def parse_catalogue(text: str, *, source: str) -> dict[str, CatalogueEntry]:
    """Entries of a catalogue CSV (columns Model, link, sum, dependencies; others ignored)."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "Model" not in columns or "link" not in columns:
        raise ModelError(f"{source}: not a model catalogue (columns {columns}; needs Model, link, sum, dependencies)")
    entries: dict[str, CatalogueEntry] = {}
    for row in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("Model"):
            continue
        md5 = row.get("sum", "").lower() or None
        if md5 is not None and not MD5_PATTERN.match(md5):
            LOG.warning("%s: %s has a checksum that is not an md5 (%r); treated as unknown", source, row["Model"], md5)
            md5 = None
        deps = tuple(d.strip() for d in row.get("dependencies", "").split(";") if d.strip() and d.strip() != "nan")
        entries[row["Model"]] = CatalogueEntry(row["Model"], row["link"], md5, deps)
    return entries


def read_catalogue(source: str | Path | None = None, *, timeout: float = 30) -> dict[str, CatalogueEntry]:
    """The catalogue from ``source``: ``None`` (the bundled one), an http(s)/file URL, or a local path."""
    if source is None:
        source = BUNDLED_CATALOGUE
    text_source = str(source)
    if re.match(r"^(https?|file)://", text_source):
        try:
            with urllib.request.urlopen(http_request(text_source), timeout=timeout) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"cannot read the model catalogue {text_source}: {failure_reason(exc)}") from exc
    else:
        try:
            text = Path(source).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"{source}: cannot read the model catalogue ({exc})") from exc
    return parse_catalogue(text, source=text_source)


# ------------------------------------------------------------------------------------------------
# the cache


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in MODEL_MARKERS)


def installed_models(home: str | Path | None = None) -> dict[str, Path]:
    """Installed models by name (folders of the cache that hold a model)."""
    root = models_home(home)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if not p.name.startswith(".") and is_model_folder(p)}


def resolve_installed(name: str, *, home: str | Path | None = None) -> Path:
    """The folder of an installed model, for ``--model NAME`` / ``--brain-model NAME``.

    Raises :class:`ModelError` naming the cache folder, what is installed and the command that installs it.
    """
    folder = models_home(home) / _check_name(name)
    if is_model_folder(folder):
        return folder
    installed = ", ".join(installed_models(home)) or "none"
    raise ModelError(f"model {name!r} is not installed in {models_home(home)} (installed: {installed}); run "
                     f"`bids_postop-models fetch {name}` (needs internet) or `bids_postop-models import PATH`, or "
                     f"set {HOME_ENV} to the folder that holds it")


def read_install_record(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / INSTALL_RECORD).read_text()))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------
# installation


def find_model_root(folder: Path) -> Path:
    """The shallowest folder under ``folder`` holding a model (pre_processing.ini, a card or plans.json)."""
    found = {p.parent for marker in MODEL_MARKERS for p in folder.rglob(marker) if "__MACOSX" not in p.parts}
    if not found:
        raise ModelError(f"{folder}: holds no model ({', '.join(MODEL_MARKERS)} not found)")
    depth = min(len(p.parts) for p in found)
    shallowest = sorted(p for p in found if len(p.parts) == depth)
    return shallowest[0] if len(shallowest) == 1 else Path(os.path.commonpath(shallowest))


def _check_model(root: Path) -> None:
    if (root / "pre_processing.ini").is_file():
        from bids_postop.segmentation.raidionics_model import model_files, read_preprocessing_ini

        read_preprocessing_ini(root)
        model_files(root)


def _move_into_place(root: Path, dest: Path, *, force: bool) -> Path:
    if dest.exists():
        if not force:
            raise ModelError(f"{dest} exists already; use --force to replace it")
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(dest, old)
        os.replace(root, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(root, dest)
    return dest


def _install_tree(home: Path, fill: Any, record: dict[str, Any], *, force: bool, name: str | None = None,
                  fallback_name: str = "model") -> Path:
    """Fill a staging folder (``fill(staging)``), find the model in it, check it and rename it into place.

    The model is installed as ``name``, else as the name of its folder in the staging area, else as
    ``fallback_name`` (files at the top of an archive).
    """
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=home)).resolve()
    try:
        fill(staging)
        root = find_model_root(staging)
        model_name = _check_name(name or (root.name if root != staging else fallback_name))
        _check_model(root)
        (root / INSTALL_RECORD).write_text(json.dumps(
            {"name": model_name, **record, "installed": datetime.now(UTC).isoformat(timespec="seconds"),
             "bids_postop_version": __version__}, indent=2) + "\n")
        return _move_into_place(root, home / model_name, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock, so that two processes do not write the same download.

    The lock file is kept, never deleted: with flock, deleting it on release lets a process that opened the old
    file keep "holding" a lock on an unlinked inode while a third creates a new file and locks that — two
    holders at once. An empty ``*.lock`` file left in ``.downloads/`` is harmless.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _offline_message(entry: CatalogueEntry, home: Path, exc: DownloadError) -> str:
    return (f"{exc}\nTo install {entry.name} by hand: download {entry.url} on a machine with internet access, "
            f"copy it here and run `bids_postop-models import {entry.archive_name} --name {entry.name}` "
            f"(or unzip it so that {home / entry.name} holds its pre_processing.ini).")


def _known(entries: dict[str, CatalogueEntry], name: str, source: str) -> str:
    if name not in entries:
        raise ModelError(f"model {name!r} is not in the catalogue ({source}); known: {', '.join(sorted(entries))}")
    return _check_name(name)


def _with_dependencies(entries: dict[str, CatalogueEntry], name: str, source: str) -> list[str]:
    """``name`` and what it depends on, dependencies first (each once; cycles are cut)."""
    order: list[str] = []

    def visit(current: str, chain: tuple[str, ...]) -> None:
        _known(entries, current, source)
        for dep in entries[current].dependencies:
            if dep not in chain and dep not in order:
                visit(dep, (*chain, current))
        if current not in order:
            order.append(current)

    visit(name, ())
    return order


def fetch(name: str, *, catalogue: str | Path | None = None, home: str | Path | None = None, force: bool = False,
          dependencies: bool = True, require_checksum: bool = False, progress: bool | IO[str] = True,
          timeout: float = 60) -> Path:
    """Download, verify and install a catalogue model (and its dependencies); returns its folder.

    An installed model is kept unless ``force`` (which replaces ``name`` only, not its dependencies).
    Entries of the bundled catalogue without an md5 take it from the release's catalogue when that can be
    read. ``require_checksum`` refuses entries whose md5 stays unknown.
    """
    root = models_home(home)
    source = str(catalogue or BUNDLED_CATALOGUE)
    entries = read_catalogue(catalogue)
    names = _with_dependencies(entries, name, source) if dependencies else [_known(entries, name, source)]
    todo = [n for n in names if force and n == name or not is_model_folder(root / n)]
    if catalogue is None and any(entries[n].md5 is None for n in todo):
        try:
            fresh = read_catalogue(CATALOGUE_URL, timeout=min(timeout, 15))
            entries.update({n: fresh[n] for n in todo if n in fresh and fresh[n].md5 is not None})
        except ModelError as exc:
            LOG.info("release catalogue not available (%s); using the bundled one", exc)
    for current in names:
        if current not in todo:
            LOG.info("%s is installed already in %s", current, root / current)
            continue
        entry = entries[current]
        if entry.md5 is None:
            if require_checksum:
                raise ModelError(f"{current}: the catalogue gives no md5 checksum; give a catalogue that has one "
                                 f"(--catalogue {CATALOGUE_URL})")
            LOG.warning("%s: no md5 checksum in the catalogue; the download cannot be verified", current)
        _fetch_one(entry, root, force=force and current == name, progress=progress, timeout=timeout,
                   source=source)
    return root / name


def _fetch_one(entry: CatalogueEntry, root: Path, *, force: bool, progress: bool | IO[str], timeout: float,
               source: str) -> Path:
    archive = root / DOWNLOADS / entry.archive_name
    with _lock(archive.with_name(archive.name + ".lock")):
        if is_model_folder(root / entry.name) and not force:  # installed by another process meanwhile
            return root / entry.name
        try:
            download(entry.url, archive, md5=entry.md5, progress=progress, timeout=timeout)
        except DownloadError as exc:
            raise DownloadError(_offline_message(entry, root, exc)) from exc
        try:
            record = {"source": entry.url, "md5": file_md5(archive), "md5_verified": entry.md5 is not None,
                      "catalogue": source}
            return _install_tree(root, lambda staging: safe_extract(archive, staging), record, force=force,
                                 name=entry.name)
        finally:
            archive.unlink(missing_ok=True)


def name_from_archive(path: Path) -> str:
    """``Raidionics-MRI_Brain-ONNX-v12.zip`` → ``MRI_Brain``; any other archive → its stem."""
    stem = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    match = re.match(r"^Raidionics-(.+?)-ONNX[-_]v\d+$", stem)
    return match.group(1) if match else stem


def import_model(path: str | Path, *, name: str | None = None, home: str | Path | None = None, md5: str | None = None,
                 force: bool = False) -> Path:
    """Install a local model zip or folder into the cache; returns its folder.

    ``name`` defaults to the model folder's name (or, for a zip holding files at its root, the name in the
    archive's file name). ``md5`` is checked when given, else the bundled catalogue's md5 for that name
    (when known and the file is a zip).
    """
    path = Path(path).expanduser().resolve()
    root = models_home(home)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ModelError(f"{path}: not a zip archive (give a model .zip or a model folder)")
        guess = name or name_from_archive(path)
        known = read_catalogue().get(guess) if NAME_PATTERN.match(guess) else None
        expected = (md5 or (known.md5 if known else None) or "").lower() or None
        actual = file_md5(path)
        if expected is not None and actual != expected:
            raise ModelError(f"{path}: checksum mismatch (md5 {actual}, expected {expected}); not installed")
        return _install_tree(root, lambda staging: safe_extract(path, staging),
                             {"source": str(path), "md5": actual, "md5_verified": expected is not None},
                             force=force, name=name, fallback_name=name_from_archive(path))
    if path.is_dir():
        return _install_tree(root, lambda staging: shutil.copytree(path, staging / path.name, symlinks=False),
                             {"source": str(path), "md5": None, "md5_verified": False}, force=force,
                             name=name or find_model_root(path).name)
    raise ModelError(f"{path}: no such file or folder")


def model_info(name: str, *, home: str | Path | None = None, catalogue: str | Path | None = None) -> dict[str, Any]:
    """What is known of a model: catalogue entry, installed folder and record, Raidionics settings and card."""
    info: dict[str, Any] = {"name": name}
    entry = read_catalogue(catalogue).get(name)
    if entry is not None:
        info.update(url=entry.url, md5=entry.md5 or "unknown", dependencies=list(entry.dependencies))
    folder = models_home(home) / _check_name(name)
    if not is_model_folder(folder):
        info["installed"] = False
        if entry is None:
            raise ModelError(f"model {name!r} is neither in the catalogue nor installed in {models_home(home)}")
        return info
    info.update(installed=True, folder=str(folder), install=read_install_record(folder))
    if (folder / "pre_processing.ini").is_file():
        from bids_postop.segmentation import raidionics_model

        config = raidionics_model.read_preprocessing_ini(folder)
        info["raidionics"] = {
            "mode": config.mode, "output_spacing": config.output_spacing, "new_axial_size": config.new_axial_size,
            "background_cropping": config.background_cropping, "normalization": config.normalization_method,
            "channels_order": config.channels_order, "number_inputs": config.number_inputs,
            "classes": list(config.classes), "optimal_thresholds": list(config.optimal_thresholds),
            "folds": len(raidionics_model.model_files(folder))}
        with contextlib.suppress(ModelError):
            card = raidionics_model.card_for_raidionics_folder(folder)
            info["card"] = card.provenance()
    return info
