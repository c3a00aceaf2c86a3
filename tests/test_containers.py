"""Static checks of the container recipes and the Boutiques descriptor (no Docker engine here)."""

import json
import re
import shlex
import subprocess
import sys

from conftest import REPO, require_tool

from bids_postop import __version__
from bids_postop.cli.parser import build_parser

sys.path.insert(0, str(REPO / "scripts"))
from make_descriptor import descriptor  # noqa: E402


def test_hadolint_is_clean():
    exe = require_tool("hadolint")
    proc = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_and_singularity_agree_with_the_package():
    docker = (REPO / "Dockerfile").read_text()
    assert f"ARG VERSION={__version__}" in docker
    assert 'ENTRYPOINT ["bids_postop"]' in docker
    install = (REPO / "scripts" / "install.sh").read_text()
    torch_docker = re.search(r'ARG TORCH_SPEC="([^"]+)"', docker).group(1)
    torch_install = re.search(r'TORCH_SPEC=\$\{TORCH_SPEC:-"([^"]+)"\}', install).group(1)
    assert torch_docker == torch_install, "the image must install the torch build CI tests with"
    # as install.sh: the torch pair installed first is a constraint of the package's install (else pip swaps a
    # CPU torch for PyPI's CUDA build), and a mismatched torchvision fails the build, not the first run
    assert re.search(r"pip list --format=freeze \| grep -E '\^\(torch\|torchvision\)==' >(\S+).*"
                     r"pip install -c \1 /src", docker, re.S)
    assert "import torch, torchvision.ops" in docker
    from spython.main.parse import parsers as spython  # test extra
    recipe = spython.SingularityParser(str(REPO / "Singularity.def")).recipe["spython-base"]
    assert recipe.fromHeader == f"bids_postop:{__version__}"
    assert recipe.cmd.startswith("exec bids_postop")
    docker_home = re.search(r"HOME=(\S+)", docker).group(1)
    assert f"HOME={docker_home}" in recipe.environ
    # the compiled nnU-Net engine: a C++ compiler in the image, and a compile cache that any UID can write
    assert re.search(r"apt-get install .*\bg\+\+=", docker)
    assert "TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor" in docker
    assert "TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor" in recipe.environ
    # offline, per-job caches, the container named in dataset_description.json; built from the local image
    for line in ("NIPYPE_NO_ET=1", "BIDS_POSTOP_CACHES_IN_WORKDIR=1"):
        assert line in docker and line in recipe.environ, line
    assert "BIDS_POSTOP_CONTAINER_TYPE=docker" in docker and "BIDS_POSTOP_CONTAINER_TYPE=singularity" in recipe.environ
    assert re.search(r"^Bootstrap: docker-daemon$", (REPO / "Singularity.def").read_text(), re.M)
    assert 'org.opencontainers.image.revision="${VCS_REF}"' in docker


def test_descriptor_is_up_to_date_with_the_parser():
    committed = json.loads((REPO / "descriptor.json").read_text())
    assert committed == descriptor(), "regenerate: python scripts/make_descriptor.py > descriptor.json"
    flags = {i.get("command-line-flag") for i in committed["inputs"]} - {None}
    options = {max(a.option_strings, key=len) for a in build_parser()._actions
               if a.option_strings and a.dest not in ("help", "version")}
    assert flags == options - {"--verbose"}  # -v/-vv is a value choice, not a flag
    verbosity = next(i for i in committed["inputs"] if i["id"] == "verbosity")
    assert verbosity["value-choices"] == ["-v", "-vv"]
    codes = {c["code"] for c in committed["error-codes"]}
    assert codes == {1, 64, 66, 73}
    defaults = {i["id"]: i.get("default-value") for i in committed["inputs"]}
    assert defaults["postop_session"] == "postop" and defaults["config"] == "auto" and defaults["model"] is None


def test_bosh_validates_and_simulated_command_parses(tmp_path):
    bosh = require_tool("bosh")
    proc = subprocess.run([bosh, "validate", "--bids", str(REPO / "descriptor.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    invocation = tmp_path / "inv.json"
    invocation.write_text(json.dumps({
        "bids_dir": "/data", "output_dir_name": "/out", "analysis_level": "participant",
        "participant_label": ["01", "02"], "postop_session": "early", "derivatives": ["preop=/masks"],
        "no_tta": True, "nprocs": 2, "config": "B", "mem_gb": "8", "verbosity": "-vv", "model": "demo"}))
    proc = subprocess.run([bosh, "exec", "simulate", str(REPO / "descriptor.json"), "-i", str(invocation)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("mkdir -p /out; bids_postop ")
    args = build_parser().parse_args(shlex.split(command.split(";", 1)[1])[1:])
    assert args.participant_label == ["01", "02"] and args.postop_session == "early"
    assert args.use_mirroring is False and args.nprocs == 2 and args.config == "B" and args.mem_gb == 8.0
    assert args.verbosity == 2 and args.model == "demo"


def test_container_check_and_install_scripts_are_valid_bash():
    """scripts/container_check.sh builds and runs the image (by hand: ~20 min, docs/hpc.md); here it is parsed,
    and install.sh keeps the torch pair it installed (a constraint for everything after it)."""
    for script in ("container_check.sh", "install.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    install = (REPO / "scripts" / "install.sh").read_text()
    assert '-c "$constraints"' in install and "grep -E '^(torch|torchvision)=='" in install
