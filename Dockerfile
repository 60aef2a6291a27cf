# Inference image for unetseg-predict:
#   docker run --rm -v "$PWD/in:/data/in" -v "$PWD/out:/data/out" unetseg /data/in /data/out --model nuclei
#
# GPU (default): a PyTorch CUDA runtime base whose torch is kept, run with `--gpus all`.
#   docker build -t unetseg .
# CPU only: a plain Python base and a CPU torch.
#   docker build -t unetseg:cpu --build-arg BASE=python:3.11-slim \
#     --build-arg TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cpu" .
# TORCH is handed to `pip install` as it is, so it may also name a local wheelhouse mounted at build time
# (docker/ci_build.sh: `--no-index --find-links /wheelhouse torch==... torchvision==...`).

ARG BASE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

FROM ${BASE} AS build
ARG BASE
# pip requirements and options for torch and torchvision; empty keeps the base image's own.
ARG TORCH=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# --system-site-packages: the venv sees the base image's torch, so it is not installed twice.
RUN python3 -m venv --system-site-packages /opt/venv
# TORCH is a list of pip arguments (word splitting wanted) that carries its own versions or index.
# hadolint ignore=SC2086,DL3013
RUN if [ -n "$TORCH" ]; then pip install --no-cache-dir $TORCH; fi \
    && { pip list --format=freeze | grep -i -E '^(torch|torchvision)==' > /opt/torch-constraints.txt \
         || { echo "no torch in ${BASE}: pass --build-arg TORCH=..." >&2; exit 1; }; }
# .dockerignore lets only pyproject.toml, README.md, LICENSE and unetseg/ (weights included) through.
COPY . /src
# The constraints pin torch and torchvision to what is installed, so pip never swaps them for PyPI's builds.
# The package is the source tree itself, with ONNX Runtime (--backend onnxruntime, .onnx models); its
# dependencies' versions come from pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --constraint /opt/torch-constraints.txt "/src[onnx]" \
    && python -c "import torch, torchvision, unetseg; print('torch', torch.__version__, 'unetseg ok')"

FROM ${BASE}
ARG UID=1000
# Any user id may run it (docker run --user): caches go to /tmp; albumentations asks no server for updates.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    UNETSEG_CACHE=/tmp/unetseg \
    NO_ALBUMENTATIONS_UPDATE=1
RUN useradd --create-home --uid "${UID}" --user-group unetseg
# Only the venv comes across: no wheelhouse, pip cache or source tree in the final image.
COPY --from=build /opt/venv /opt/venv
# Numeric, so that runtimes can check it is not root (Kubernetes runAsNonRoot).
USER ${UID}
WORKDIR /data
ENTRYPOINT ["unetseg-predict"]
CMD ["--help"]
