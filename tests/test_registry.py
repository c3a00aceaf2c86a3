"""Model registry: catalogue, download with resume and md5, safe extraction, cache, CLI — against a local
HTTP server (127.0.0.1, a thread) that serves a tiny Raidionics model zip and honours Range requests."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import socket
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from bids_postop.cli.models import main as models_main
from bids_postop.errors import ModelError
from bids_postop.models import registry, transfer
from bids_postop.segmentation.raidionics_model import card_for_raidionics_folder

INI = """[Default]
imaging_modality = MRI
[PreProcessing]
output_spacing = 1.0, 1.0, 1.0
new_axial_size = 16, 16, 16
number_inputs = {n}
[Training]
nb_classes = 2
optimal_thresholds = 0.4
"""


def model_zip(top: str | None, *, n: int = 1, extra: dict[str, bytes] | None = None, payload: int = 200_000) -> bytes:
    """A Raidionics-layout model zip; ``top`` is its top-level folder (None: files at the archive root)."""
    prefix = f"{top}/" if top else ""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(prefix + "pre_processing.ini", INI.format(n=n))
        zf.writestr(prefix + "model.onnx", bytes(range(256)) * (payload // 256))  # never loaded here
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Server:
    """Files by URL path; honours ``Range: bytes=N-``; can cut the first response short; logs requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()
        self.slow: set[str] = set()  # paths served in 20 pieces, 50 ms apart (overlapping downloads)
        self.honour_range = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if match and outer.honour_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.cut_once:
                    outer.cut_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.path in outer.slow:
                    import time

                    step = max(1, len(body) // 20)
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i:i + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


def publish(server: Server, rows: list[tuple[str, str, bytes, str | None, str]]) -> str:
    """Serve zips and a catalogue listing them; rows = (name, asset, zip bytes, md5 or None, dependencies)."""
    lines = ["Model,link,sum,dependencies"]
    for name, asset, data, checksum, deps in rows:
        server.files[f"/download/{asset}"] = data
        lines.append(f"{name},{server.url}/download/{asset},{checksum or ''},{deps}")
    server.files["/catalogue.csv"] = ("\n".join(lines) + "\n").encode()
    return f"{server.url}/catalogue.csv"


def files_under(folder: Path) -> list[Path]:
    """Every file left under ``folder`` except the download lock files, which are kept on purpose."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


# ------------------------------------------------------------------------------------------------


def test_fetch_verifies_extracts_and_installs_dependencies(server, tmp_path, capsys):
    post, brain = model_zip("MRI_GBM_Postop_FV_2p", n=2), model_zip("MRI_Brain")
    catalogue = publish(server, [
        ("MRI_GBM_Postop_FV_2p", "Raidionics-MRI_GBM_Postop_FV_2p-ONNX_v12.zip", post, md5(post), "MRI_Brain"),
        ("MRI_Brain", "Raidionics-MRI_Brain-ONNX-v12.zip", brain, md5(brain), "")])
    home = tmp_path / "cache"
    folder = registry.fetch("MRI_GBM_Postop_FV_2p", catalogue=catalogue, home=home)
    assert folder == home / "MRI_GBM_Postop_FV_2p" and (folder / "model.onnx").is_file()
    assert registry.resolve_installed("MRI_Brain", home=home) == home / "MRI_Brain"
    record = json.loads((folder / registry.INSTALL_RECORD).read_text())
    assert record["md5"] == md5(post) and record["md5_verified"] is True
    assert sorted(p.name for p in home.iterdir()) == [".downloads", "MRI_Brain", "MRI_GBM_Postop_FV_2p"]
    # no .part, zip or staging: only the lock files stay (deleting them would let two processes hold a lock)
    assert all(p.name.endswith(".lock") for p in (home / ".downloads").iterdir())
    assert card_for_raidionics_folder(folder).configuration == "B"
    progress = capsys.readouterr().err  # bytes, percentage, rate and ETA on stderr
    assert "kB" in progress and "100 %" in progress and "/s" in progress and "ETA" in progress
    n_requests = len(server.requests)
    assert registry.fetch("MRI_GBM_Postop_FV_2p", catalogue=catalogue, home=home) == folder
    assert len(server.requests) == n_requests + 1  # only the catalogue: installed models are not downloaded again


def test_wrong_md5_is_refused_and_leaves_nothing(server, tmp_path):
    data = model_zip("MRI_Brain")
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, md5(b"something else"), "")])
    home = tmp_path / "cache"
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False)
    assert files_under(home) == []
    with pytest.raises(ModelError, match="not installed"):
        registry.resolve_installed("MRI_Brain", home=home)


def test_path_traversal_archive_is_refused(server, tmp_path):
    data = model_zip("MRI_Brain", extra={"../evil": b"x"})
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, md5(data), "")])
    home = tmp_path / "cache"
    with pytest.raises(ModelError, match="refusing"):
        registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False)
    assert not (tmp_path / "evil").exists() and not (home / "evil").exists()
    assert files_under(home) == []


def _symlink_zip(target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("model/pre_processing.ini", INI.format(n=1))
        info = zipfile.ZipInfo("model/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return buffer.getvalue()


@pytest.mark.parametrize("entries, ok", [
    ({"../evil": b"x"}, False),
    ({"a/../../evil": b"x"}, False),
    ({"/abs/evil": b"x"}, False),
    ({"C:/evil": b"x"}, False),
    ({"a/b.txt": b"x"}, True),
])
def test_safe_extract_entries(tmp_path, entries, ok):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    target = tmp_path / "out"
    if ok:
        transfer.safe_extract(archive, target)
        assert (target / "a" / "b.txt").read_bytes() == b"x"
    else:
        with pytest.raises(ModelError, match="refusing"):
            transfer.safe_extract(archive, target)
        assert files_under(target) == [] and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("link, ok", [("../../outside", False), ("/etc/passwd", False), ("pre_processing.ini", True)])
def test_safe_extract_symlinks(tmp_path, link, ok):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_symlink_zip(link))
    target = tmp_path / "out"
    if ok:
        transfer.safe_extract(archive, target)
        assert (target / "model" / "link").is_symlink()
    else:
        with pytest.raises(ModelError, match="symlink"):
            transfer.safe_extract(archive, target)
        assert files_under(target) == []


def test_resume_from_a_partial_download(server, tmp_path):
    data = model_zip("MRI_Brain")
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, md5(data), "")])
    home = tmp_path / "cache"
    part = home / registry.DOWNLOADS / "brain.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:70_000])
    folder = registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False)
    assert ("/download/brain.zip", "bytes=70000-") in server.requests
    assert json.loads((folder / registry.INSTALL_RECORD).read_text())["md5_verified"]
    # the finished archive is gone; only the lock file stays (deleting it would let two processes hold the lock)
    assert [p.name for p in (home / registry.DOWNLOADS).iterdir()] == ["brain.zip.lock"]


def test_interrupted_download_is_resumed_on_the_next_run(server, tmp_path):
    data = model_zip("MRI_Brain")
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, md5(data), "")])
    server.cut_once.add("/download/brain.zip")
    home = tmp_path / "cache"
    with pytest.raises(registry.DownloadError, match="interrupted"):
        registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False)
    part = home / registry.DOWNLOADS / "brain.zip.part"
    assert 0 < part.stat().st_size < len(data)
    registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False)
    assert server.requests[-1] == ("/download/brain.zip", f"bytes={len(data) // 3}-")
    assert (home / "MRI_Brain" / "pre_processing.ini").is_file()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = model_zip("MRI_Brain")
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, md5(data), "")])
    server.honour_range = False
    home = tmp_path / "cache"
    (home / registry.DOWNLOADS).mkdir(parents=True)
    (home / registry.DOWNLOADS / "brain.zip.part").write_bytes(b"garbage" * 1000)
    assert registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False).is_dir()


def test_offline_error_names_the_url_and_the_folder(tmp_path):
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/download/Raidionics-MRI_Brain-ONNX-v12.zip"
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text(f"Model,link,sum,dependencies\nMRI_Brain,{url},,\n")
    home = tmp_path / "cache"
    with pytest.raises(registry.DownloadError) as info:
        registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False, timeout=5)
    message = str(info.value)
    assert url in message and str(home / "MRI_Brain") in message and "bids_postop-models import" in message
    assert "refused" in message.lower()
    assert models_main(["--home", str(home), "fetch", "MRI_Brain", "--catalogue", str(catalogue),
                        "--timeout", "5"]) == ModelError.exit_code


def test_unknown_md5_installs_unverified_or_is_refused_on_request(server, tmp_path):
    data = model_zip("MRI_Brain")
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, None, "")])
    home = tmp_path / "cache"
    with pytest.raises(ModelError, match="no md5"):
        registry.fetch("MRI_Brain", catalogue=catalogue, home=home, require_checksum=True)
    record = json.loads((registry.fetch("MRI_Brain", catalogue=catalogue, home=home, progress=False)
                         / registry.INSTALL_RECORD).read_text())
    assert record["md5_verified"] is False and record["md5"] == md5(data)


def test_import_zip_and_folder(tmp_path):
    home = tmp_path / "cache"
    flat = tmp_path / "Raidionics-MRI_Brain-ONNX-v12.zip"  # files at the archive root: name from the file name
    flat.write_bytes(model_zip(None))
    assert registry.import_model(flat, home=home) == home / "MRI_Brain"
    with pytest.raises(ModelError, match="exists already"):
        registry.import_model(flat, home=home)
    assert registry.import_model(flat, home=home, force=True) == home / "MRI_Brain"
    nested = tmp_path / "download.zip"
    nested.write_bytes(model_zip("MRI_GBM_Postop_FV_5p", n=5))
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.import_model(nested, home=home, md5="0" * 32)
    assert registry.import_model(nested, home=home).name == "MRI_GBM_Postop_FV_5p"
    folder = tmp_path / "mine" / "MRI_GBM_Postop_FV_1p"
    folder.mkdir(parents=True)
    (folder / "pre_processing.ini").write_text(INI.format(n=1))
    (folder / "model.onnx").write_bytes(b"")
    installed = registry.import_model(folder, home=home)
    assert installed == home / "MRI_GBM_Postop_FV_1p" and (folder / "model.onnx").is_file()
    assert set(registry.installed_models(home)) == {"MRI_Brain", "MRI_GBM_Postop_FV_5p", "MRI_GBM_Postop_FV_1p"}
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelError, match="holds no model"):
        registry.import_model(not_a_model, home=home)
    assert not any(p.name.startswith(".staging") for p in home.iterdir())


def test_bundled_catalogue_lists_the_published_models():
    entries = registry.read_catalogue()
    assert set(entries) == {f"MRI_GBM_Postop_FV_{n}p" for n in range(1, 6)} | {"MRI_Brain"}
    assert entries["MRI_GBM_Postop_FV_5p"].url == (
        "https://github.com/raidionics/Raidionics-models/releases/download/1.2.0/"
        "Raidionics-MRI_GBM_Postop_FV_5p-ONNX_v12.zip")
    assert entries["MRI_Brain"].archive_name == "Raidionics-MRI_Brain-ONNX-v12.zip"
    assert all(e.md5 is None for e in entries.values())  # unverified here: unknown, never invented


def test_catalogue_parsing():
    text = ("\ufeffModel,link,sum,dependencies,extra\nA,http://x/a.zip,0123456789ABCDEF0123456789abcdef,B;C,1\n"
            "B,http://x/b.zip,,,\n")
    entries = registry.parse_catalogue(text, source="test")
    assert entries["A"].md5 == "0123456789abcdef0123456789abcdef" and entries["A"].dependencies == ("B", "C")
    assert entries["B"].md5 is None and entries["B"].dependencies == ()
    with pytest.raises(ModelError, match="not a model catalogue"):
        registry.parse_catalogue("name,url\nA,http://x\n", source="test")


def test_home_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.HOME_ENV, str(tmp_path / "env-home"))
    assert registry.models_home() == tmp_path / "env-home"
    assert registry.models_home(tmp_path / "x") == tmp_path / "x"
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ModelError, match="not a valid model name"):
            registry.resolve_installed(bad)


def test_cli(server, tmp_path, capsys):
    data = model_zip("MRI_GBM_Postop_FV_1p")
    catalogue = publish(server, [("MRI_GBM_Postop_FV_1p", "p1.zip", data, md5(data), "")])
    home = str(tmp_path / "cache")
    assert models_main(["--home", home, "list", "--catalogue", catalogue]) == 0
    assert re.search(r"MRI_GBM_Postop_FV_1p\s+no\s+known", capsys.readouterr().out)
    assert models_main(["--home", home, "fetch", "MRI_GBM_Postop_FV_1p", "--catalogue", catalogue, "--quiet"]) == 0
    assert models_main(["--home", home, "info", "MRI_GBM_Postop_FV_1p", "--catalogue", catalogue, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["installed"] and info["card"]["configuration"] == "A" and info["raidionics"]["mode"] == "full"
    assert models_main(["--home", home, "fetch", "nope", "--catalogue", catalogue]) == ModelError.exit_code
    assert "not in the catalogue" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        models_main(["--home", home])


# ------------------------------------------------------------------------------------------------
# concurrency: the download lock


_FETCH_SCRIPT = """
import sys
from bids_postop.models import registry
registry.fetch("MRI_Brain", catalogue=sys.argv[1], home=sys.argv[2], progress=False)
"""


def test_processes_fetching_the_same_model_at_once_download_it_once(server, tmp_path):
    import subprocess
    import sys

    data = model_zip("MRI_Brain", payload=400_000)
    catalogue = publish(server, [("MRI_Brain", "brain.zip", data, md5(data), "")])
    server.slow.add("/download/brain.zip")  # ~1 s per download: the processes overlap
    home = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH_SCRIPT, catalogue, str(home)], stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    downloads = [r for r in server.requests if r[0] == "/download/brain.zip"]
    assert len(downloads) == 1, downloads
    assert registry.installed_models(home) == {"MRI_Brain": home / "MRI_Brain"}
    assert not [p for p in home.iterdir() if p.name.startswith((".staging-", ".old-"))]


_LOCK_SCRIPT = """
import os, sys, time
from pathlib import Path
from bids_postop.models.registry import _lock

lock, inside, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    with _lock(lock):
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
        except FileExistsError:
            print("OVERLAP", flush=True)
            continue
        time.sleep(0.001)
        os.close(fd)
        os.unlink(inside)
"""


def test_the_download_lock_admits_one_holder_at_a_time(tmp_path):
    """Processes taking the lock in a tight loop are never inside together (deleting the lock file on release,
    as the lock once did, lets two hold it: an opened old file and a newly created one)."""
    import subprocess
    import sys

    lock, inside = tmp_path / "downloads" / "x.zip.lock", tmp_path / "inside"
    procs = [subprocess.Popen([sys.executable, "-c", _LOCK_SCRIPT, str(lock), str(inside), "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in outputs]
    assert sum(out.count("OVERLAP") for out, _ in outputs) == 0
    assert lock.exists()
