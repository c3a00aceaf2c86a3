# syntax=docker/dockerfile:1
# bids_postop BIDS app. GPU build (default): PyPI's torch, which for x86_64 is the CUDA build (it runs on CPUs
# too), and onnxruntime-gpu. CPU-only build (CPU torch from PyTorch's own index: PyPI has none for x86_64, hence
# the CPU onnxruntime the package depends on; ~5 GB smaller):
#   docker build --build-arg TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu" -t bids_postop:cpu .
# TORCH_SPEC is always a torch + torchvision pair; the pair installed first is kept (a constraint for the
# package's own install): left to pip, nnU-Net's dependency chain replaces a CPU torch with PyPI's CUDA build
# (measured: TORCH_SPEC="torch==2.13.0" silently gave torch 2.14.1+CUDA and an 8.5 GB image).
# Published models baked into the image (catalogue names, space-separated; fetched at build time with
# md5 verification into BIDS_POSTOP_HOME, readable by any UID); default: none, fetch at run time:
#   docker build --build-arg BIDS_POSTOP_MODELS="MRI_GBM_Postop_FV_2p MRI_Brain" -t bids_postop:models .
# The install steps are the ones CI runs (scripts/install.sh), so a CI pass exercises them.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
# installed instead of onnxruntime when TORCH_SPEC gives a CUDA torch build (the GPU variant)
ARG ONNXRUNTIME_GPU_SPEC="onnxruntime-gpu==1.31.1"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bids_postop ./bids_postop
COPY scripts ./scripts
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install ${TORCH_SPEC} \
    && /opt/venv/bin/python -m pip list --format=freeze | grep -E '^(torch|torchvision)==' >/tmp/torch-pair.txt \
    && /opt/venv/bin/python -m pip install -c /tmp/torch-pair.txt /src \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/python -c "import torch, torchvision.ops; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && if /opt/venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then \
         /opt/venv/bin/python -m pip uninstall -y onnxruntime \
         && /opt/venv/bin/python -m pip install "${ONNXRUNTIME_GPU_SPEC}" \
         && /opt/venv/bin/python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"; \
       fi

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
# set by scripts/container_check.sh (or: --build-arg VCS_REF=$(git rev-parse HEAD) --build-arg BUILD_DATE=...)
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG BIDS_POSTOP_MODELS=""
LABEL org.opencontainers.image.title="bids_postop" \
      org.opencontainers.image.description="Residual glioblastoma segmentation in early post-operative MRI (BIDS app)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# g++: --nnunet-engine compiled (torch.compile) builds its CPU kernels at run time; without it that engine falls
# back to torch with a warning. Same version as the CI machine (Debian bookworm).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# HOME and caches writable by any UID (docker run -u, Singularity): HD-BET and nnU-Net write under HOME; torch's
# compile cache is named by user name by default, which an arbitrary UID without a passwd entry has not.
# BIDS_POSTOP_CACHES_IN_WORKDIR: the participant level moves the torch/matplotlib caches into the work folder,
# one set per job (Singularity binds the host's /tmp: jobs of several users would share /tmp/torchinductor).
# NIPYPE_NO_ET: no online version check (bids_postop turns it off too).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp/home \
    MPLCONFIGDIR=/tmp/home/.config/matplotlib \
    nnUNet_raw=/tmp/nnunet/raw nnUNet_preprocessed=/tmp/nnunet/preprocessed nnUNet_results=/tmp/nnunet/results \
    BIDS_POSTOP_HOME=/opt/bids_postop/models \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    NIPYPE_NO_ET=1 \
    BIDS_POSTOP_CACHES_IN_WORKDIR=1 \
    BIDS_POSTOP_CONTAINER_TYPE=docker \
    BIDS_POSTOP_CONTAINER_TAG="bids_postop:${VERSION}" \
    PYTHONUNBUFFERED=1
# Baked models are read-only at run time; to fetch more, point BIDS_POSTOP_HOME at a writable bind mount.
RUN mkdir -p /tmp/home "${BIDS_POSTOP_HOME}" && chmod 1777 /tmp/home \
    && if [ -n "${BIDS_POSTOP_MODELS}" ]; then bids_postop-models fetch ${BIDS_POSTOP_MODELS}; fi \
    && chmod -R a+rX "${BIDS_POSTOP_HOME}" \
    && bids_postop-models list \
    && bids_postop --version \
    && bids-validator-deno --version
WORKDIR /tmp
ENTRYPOINT ["bids_postop"]
