# syntax=docker/dockerfile:1
# One image for the API, the workers and the dashboard (docker-compose.yml picks the command).
#
#   docker build -t hpo-service .                                  # CPU PyTorch (default)
#   docker build -t hpo-service:cuda --build-arg TORCH_VARIANT=cu128 .   # a CUDA build of torch
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>): cpu,
# or the CUDA tag PyTorch publishes for torch 2.13.0 (cu126, cu128, ...). CUDA wheels bring
# their own CUDA runtime, so the base image stays the same; the host needs the NVIDIA driver and
# container toolkit, and the worker service needs a GPU reservation (see README, "Scaling out").
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HPO_DATA_ROOT=/data

WORKDIR /app

# torch first and alone, from the chosen index: resolving it from PyPI would pick CUDA wheels.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

# A CUDA build: torch's wheels bring Triton, which compiles a small launcher with the C compiler
# the first time a kernel runs. GPU populations update their weights with a Triton kernel
# (worker/population/fused_update.py); without a compiler they fall back to slower batched ops.
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The pinned dependencies next (a layer that survives source edits), then the project itself.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY search_spaces ./search_spaces
COPY service ./service
COPY worker ./worker
COPY hpo ./hpo
COPY examples ./examples
RUN pip install --no-deps . && hpo --help > /dev/null

# An unprivileged user owns /data; a named volume mounted there starts with this ownership.
RUN useradd --create-home --uid 10001 hpo && mkdir -p /data && chown hpo:hpo /data
USER hpo
VOLUME ["/data"]
EXPOSE 8000 8080

# The API refuses 0.0.0.0 without HPO_API_TOKENS (service/api/security.py); compose sets them.
CMD ["hpo", "serve", "--host", "0.0.0.0", "--port", "8000"]
