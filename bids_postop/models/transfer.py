"""Getting model archives safely: HTTP download (progress, resume with a Range request, md5 check) and zip
extraction that refuses entries landing outside the target. No catalogue knowledge here
(:mod:`bids_postop.models.registry` decides what to fetch and where it goes)."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from bids_postop import __version__
from bids_postop.errors import ModelError

LOG = logging.getLogger("bids_postop")


class DownloadError(ModelError):
    """A download failed (network, HTTP status, interruption); the message says how to get the file by hand."""


def http_request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": f"bids_postop/{__version__}", **(headers or {})})


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """Bytes, percentage, rate and ETA on a stream (one updating line on a terminal, else a line per 10 %)."""

    def __init__(self, label: str, total: int | None, done: int = 0, stream: IO[str] | None = None):
        self.label, self.total, self.done, self.start_done = label, total, done, done
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.monotonic()
        self.next_step = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = (self.done - self.start_done) / elapsed
        text = f"{self.label}: {human_size(self.done)}"
        if self.total:
            text += f" / {human_size(self.total)} ({100 * self.done / self.total:.0f} %)"
        text += f", {human_size(rate)}/s"
        if self.total and rate > 0:
            eta = int((self.total - self.done) / rate)
            text += f", ETA {eta // 60}:{eta % 60:02d}"
        return text

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self.last >= 0.2:
            self.stream.write("\r" + self.line() + "   ")
            self.stream.flush()
            self.last = now
        elif not self.tty:
            step = int(10 * self.done / self.total) if self.total else int((now - self.start) // 30)
            if step > self.next_step:
                self.next_step = step
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line() + " — done\n")
        self.stream.flush()


def download(url: str, dest: Path, *, md5: str | None = None, progress: bool | IO[str] = True,
             timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part`` with an HTTP Range.

    When ``md5`` is given the file is checked before it is renamed to ``dest``; on a mismatch the partial
    file is deleted and :class:`ModelError` raised. A network failure or interruption raises
    :class:`DownloadError` and keeps the ``.part`` for the next attempt.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):  # a second attempt only after a stale .part was discarded
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = urllib.request.urlopen(http_request(url, headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to send: the .part is complete, or stale
                if md5 is not None and file_md5(part) == md5:
                    break
                part.unlink()
                continue
            raise DownloadError(f"cannot download {url}: {failure_reason(exc)}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"cannot download {url}: {failure_reason(exc)}") from exc
        with response:
            resumed = offset > 0 and response.status == 206
            if offset and not resumed:
                LOG.info("%s: the server ignored the resume request; downloading from the start", url)
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
            total = int(match.group(1)) if resumed and match else total
            bar = None
            if progress:
                stream = sys.stderr if progress is True else progress
                bar = Progress(f"{dest.name}{' (resumed)' if resumed else ''}", total, offset, stream=stream)
            received = offset
            try:
                with part.open("ab" if resumed else "wb") as handle:
                    while block := response.read(1 << 16):
                        handle.write(block)
                        received += len(block)
                        if bar:
                            bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"download of {url} interrupted after {human_size(received)} "
                                    f"({failure_reason(exc)}); run the same command again to resume") from exc
            if total is not None and received < total:
                raise DownloadError(f"download of {url} interrupted after {human_size(received)} of "
                                    f"{human_size(total)}; run the same command again to resume")
            if bar:
                bar.close()
        break
    if md5 is not None:
        actual = file_md5(part)
        if actual != md5:
            part.unlink()
            raise ModelError(f"{url}: checksum mismatch (md5 {actual}, the catalogue says {md5}); the download "
                             f"was deleted. Try again; if it persists, the catalogue or the file has changed")
    os.replace(part, dest)
    return dest


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip into ``target``, refusing (before writing anything) entries that would land outside it:
    absolute paths, drive letters, ``..`` components, and symlinks pointing outside."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            links: dict[str, str] = {}
            for info in members:
                name = info.filename.replace("\\", "/")
                if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in PurePosixPath(name).parts:
                    raise ModelError(f"{archive}: refusing to extract {info.filename!r} (absolute path or '..')")
                dest = (root / name).resolve()
                if not dest.is_relative_to(root):
                    raise ModelError(f"{archive}: refusing to extract {info.filename!r} (outside the target)")
                if _is_symlink(info):
                    link = zf.read(info).decode("utf-8")
                    if os.path.isabs(link) or not (dest.parent / link).resolve().is_relative_to(root):
                        raise ModelError(f"{archive}: refusing symlink {info.filename!r} → {link!r} (outside the "
                                         f"target)")
                    links[name] = link
            needed = sum(i.file_size for i in members)
            free = shutil.disk_usage(root).free
            if needed > free:
                raise ModelError(f"{archive}: needs {human_size(needed)} to extract, {root} has "
                                 f"{human_size(free)} free")
            for info in members:
                name = info.filename.replace("\\", "/")
                if name in links:
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(links[name], root / name)
                else:
                    zf.extract(info, root)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ModelError(f"{archive}: not a readable zip archive ({exc})") from exc
