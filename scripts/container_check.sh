#!/usr/bin/env bash
# Build the Docker image with buildah (no Docker daemon needed) and prove it works:
#   1. the base image python:3.11.7-slim-bookworm, made from Debian packages with debootstrap when no registry
#      image is available (this machine's pip configuration copied in, so pip inside reaches the same indexes);
#   2. `buildah bud` of ./Dockerfile, with the revision and date as OCI labels: by default the Dockerfile's own
#      build (PyPI's torch, the CUDA build for x86_64, and onnxruntime-gpu: the image runs on CPUs too); --cpu: the
#      CPU-only build (torch from PyTorch's CPU index, which must be reachable), checked to hold no CUDA torch;
#      then the torch build, CUDA version and onnxruntime providers inside the image are printed;
#   3. `bids_postop --version`, then the demo as a non-root UID (1000) with a bind-mounted output folder;
#   4. one participant of the demo through the image's ENTRYPOINT, exactly as
#      `docker run IMAGE /data /out participant …` would run it;
#   5. the same participant on the host (./.venv), and a comparison of the container's derivatives with the
#      host's: same masks (Dice >= 0.99) and residual volumes within 0.01 ml.
# Prints build time, image size and the comparison; exits non-zero on any failure.
#
# Usage: scripts/container_check.sh [--cpu] [--keep]     (as root; needs apt-get for buildah and debootstrap)
# Environment: BIDS_POSTOP_CONTAINER_DIR (work folder, default /var/tmp/bids_postop_container).
# Disk: vfs storage copies every layer: ~30 GB free for the default build (~15 GB for --cpu). Without
# --keep, the built image and containers are removed at the end (the base image is kept for the next run).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VARIANT=default
KEEP=0
CPU_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
for arg in "$@"; do
    case $arg in
        --cpu) VARIANT=cpu ;;
        --gpu) VARIANT=default ;;  # the default build is the GPU-capable one (kept for older instructions)
        --keep) KEEP=1 ;;
        *) echo "usage: $0 [--cpu] [--keep]" >&2; exit 64 ;;
    esac
done
say() { echo "container_check: $*" >&2; }
STATE=${BIDS_POSTOP_CONTAINER_DIR:-/var/tmp/bids_postop_container}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_postop/__init__.py)
TAG=bids_postop:${VERSION}-${VARIANT}
BASE=docker.io/library/python:3.11.7-slim-bookworm
export STORAGE_DRIVER=vfs
mkdir -p "$STATE"

for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || {
        say "installing $tool"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null; }
done

# pip configuration of this machine (config file, constraints, CA bundle) and the local wheel folders it names:
# copied into the base image / mounted into the build, so pip inside reaches the same packages
# (files: copied into the base image; folders, e.g. a local index /opt/pypi/simple: their parent is mounted)
mapfile -t PIP_FILES < <(python3 - <<'PY'
import os, re, subprocess
out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
paths = {"/etc/xdg/pip/pip.conf", "/etc/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")}
for value in re.findall(r"='([^']*)'", out):
    for item in value.split():
        item = item.removeprefix("file://")
        if item.startswith("/"):
            paths.add(item)
for path in sorted(paths):
    if os.path.isfile(path):
        print(path)
    elif os.path.isdir(path):
        print(os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path.rstrip("/"))
PY
)

# --- 1. base image ----------------------------------------------------------------------------------------------
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    ROOTFS=$STATE/rootfs
    MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    say "making $BASE from Debian packages (debootstrap bookworm from $MIRROR)"
    rm -rf "$ROOTFS"
    t0=$(date +%s)
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$ROOTFS" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 || { tail -n 20 "$STATE/debootstrap.log"; exit 1; }
    for f in "${PIP_FILES[@]}"; do
        [[ -f $f ]] && { mkdir -p "$ROOTFS$(dirname "$f")"; cp -a "$f" "$ROOTFS$f"; }
    done
    c=$(buildah from scratch)
    cp -a "$ROOTFS/." "$(buildah mount "$c")/"
    buildah umount "$c" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$c"
    buildah commit -q "$c" "$BASE" >/dev/null
    buildah rm "$c" >/dev/null
    rm -rf "$ROOTFS"
    say "base image made in $(( $(date +%s) - t0 )) s"
fi

# --- 2. build --------------------------------------------------------------------------------------------------
BUILD_ARGS=(--build-arg "VCS_REF=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
            --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
[[ $VARIANT == cpu ]] && BUILD_ARGS+=(--build-arg "TORCH_SPEC=$CPU_TORCH_SPEC")
VOLUMES=()
for f in "${PIP_FILES[@]}"; do [[ -d $f ]] && VOLUMES+=(-v "$f:$f:ro"); done
say "building $TAG (buildah bud, $VARIANT variant)"
t0=$(date +%s)
buildah bud --isolation chroot --network host "${VOLUMES[@]}" "${BUILD_ARGS[@]}" -t "$TAG" . \
    >"$STATE/build.log" 2>&1 || { tail -n 40 "$STATE/build.log"; exit 1; }
BUILD_S=$(( $(date +%s) - t0 ))
SIZE=$(buildah images --format '{{.Size}}' "localhost/$TAG" | head -n 1)
say "built in ${BUILD_S} s; image size ${SIZE}"

# --- 3. --version, the demo as UID 1000 -------------------------------------------------------------------------
OUT=$STATE/out
rm -rf "$OUT"
mkdir -p "$OUT/container" "$OUT/entry" "$OUT/entry_work"
chown -R 1000:1000 "$OUT"
c=$(buildah from "localhost/$TAG")
cleanup() {
    buildah rm "$c" >/dev/null 2>&1 || true
    [[ $KEEP == 1 ]] || buildah rmi "localhost/$TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT
buildah run --isolation chroot "$c" -- bids_postop --version
TORCH_INFO=$(buildah run --isolation chroot "$c" -- python -c "import onnxruntime as o, torch, torchvision
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, '
      f'onnxruntime providers {o.get_available_providers()}')")
say "image holds $TORCH_INFO"
if [[ $VARIANT == cpu && $TORCH_INFO != *"(CUDA None)"* ]]; then
    say "the --cpu image holds a CUDA torch build"; exit 1
fi
t0=$(date +%s)
buildah run --isolation chroot --user 1000:1000 -v "$OUT/container:/out" "$c" -- \
    bids_postop-demo /out/demo --nprocs 2 --device cpu | tee "$STATE/demo.log"
DEMO_S=$(( $(date +%s) - t0 ))
say "demo in the container (UID 1000): ${DEMO_S} s"

# --- 4. one participant through the ENTRYPOINT -----------------------------------------------------------------
mapfile -t ENTRY < <(buildah inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' \
    "localhost/$TAG" | sed '/^$/d')
[[ ${#ENTRY[@]} -gt 0 ]] || { say "the image has no ENTRYPOINT"; exit 1; }
DATA=$OUT/container/demo/bids
buildah run --isolation chroot --user 1000:1000 -v "$DATA:/data:ro" -v "$OUT/entry:/out" -v "$OUT/entry_work:/work" \
    "$c" -- "${ENTRY[@]}" /data /out participant --participant-label 01 --model demo \
    -d preop=/data/derivatives/preop_masks -w /work --nprocs 2 --device cpu
say "ENTRYPOINT (${ENTRY[*]}) run of sub-01: done"

# --- 5. the host on the same data, and the comparison ----------------------------------------------------------
"$REPO/.venv/bin/bids_postop" "$DATA" "$OUT/host" participant --participant-label 01 --model demo \
    -d "preop=$DATA/derivatives/preop_masks" -w "$OUT/host_work" --nprocs 2 --device cpu
"$REPO/.venv/bin/python" - "$OUT/host" "$OUT/entry" "$DATA/derivatives/bids_postop" <<'EOF'
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

host, *others = (Path(p) for p in sys.argv[1:])
failed = False
for measures in sorted(host.glob("sub-*/ses-*/*_measures.json")):
    ref = json.loads(measures.read_text())
    ref_mask = np.asanyarray(nib.load(host / ref["outputs"]["residual_mask"]).dataobj) > 0
    for other in others:
        data = json.loads((other / measures.relative_to(host)).read_text())
        mask = np.asanyarray(nib.load(other / data["outputs"]["residual_mask"]).dataobj) > 0
        total = int(ref_mask.sum() + mask.sum())
        dice = 1.0 if total == 0 else 2 * int((ref_mask & mask).sum()) / total
        dv = abs(data["measures"]["residual_volume_ml"] - ref["measures"]["residual_volume_ml"])
        ok = dice >= 0.99 and dv <= 0.01
        failed |= not ok
        print(f"{measures.name} {other}: Dice {dice:.4f}, |dV| {dv:.4f} ml -> {'same' if ok else 'DIFFERENT'}")
sys.exit(1 if failed else 0)
EOF
say "PASS: $TAG built in ${BUILD_S} s (${SIZE}; $TORCH_INFO); demo as UID 1000 in ${DEMO_S} s; ENTRYPOINT run and host agree"
