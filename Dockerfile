# syntax=docker/dockerfile:1
# bids_postop BIDS app. GPU build (default): CUDA-enabled torch wheels. CPU-only build:
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" -t bids_postop:cpu .
# The install steps are the ones CI runs (scripts/install.sh), so a CI pass exercises them.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bids_postop ./bids_postop
COPY scripts ./scripts
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install ${TORCH_SPEC} \
    && /opt/venv/bin/python -m pip install /src \
    && /opt/venv/bin/python -m pip check

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bids_postop" \
      org.opencontainers.image.description="Residual glioblastoma segmentation in early post-operative MRI (BIDS app)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# HOME and caches writable by any UID (docker run -u, Singularity): HD-BET and nnU-Net write under HOME.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp/home \
    MPLCONFIGDIR=/tmp/home/.config/matplotlib \
    nnUNet_raw=/tmp/nnunet/raw nnUNet_preprocessed=/tmp/nnunet/preprocessed nnUNet_results=/tmp/nnunet/results \
    PYTHONUNBUFFERED=1
RUN mkdir -p /tmp/home && chmod 1777 /tmp/home && bids_postop --version
WORKDIR /tmp
ENTRYPOINT ["bids_postop"]
