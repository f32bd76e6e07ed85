# One image for the API (`lego serve`) and the workers (`lego worker`), with CPU or
# CUDA torch:
#   docker build -t model-lego .                                 CPU torch (default)
#   docker build --build-arg TORCH=gpu -t model-lego:gpu .       CUDA torch (GPU workers)
#   docker compose up            (see docker-compose.yml and docs/service.md)
#   docker compose --profile gpu up     (also a GPU worker)
# TORCH names the stage torch-cpu or torch-gpu below.
ARG TORCH=cpu

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    LEGO_VAR_DIR=/data \
    LEGO_STORAGE_DIR=/data/artifacts

WORKDIR /app

# CPU-only wheels of torch: a much smaller image for the API and CPU workers.
FROM base AS torch-cpu
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

# PyPI's Linux wheels of torch carry CUDA (the nvidia-* wheels they depend on), so no
# CUDA base image is needed: the host needs the NVIDIA driver and container toolkit.
FROM base AS torch-gpu
RUN pip install torch==2.14.1 torchvision==0.29.1

FROM torch-${TORCH} AS runtime

# The project's pinned dependencies, as their own layer (torch is already there).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY alembic.ini ./
COPY migrations ./migrations
COPY lego_core ./lego_core
COPY worker ./worker
COPY app ./app

RUN useradd --create-home --uid 10001 lego \
    && mkdir -p /data/artifacts \
    && chown -R lego:lego /data
USER lego
VOLUME ["/data"]
EXPOSE 8000

# `python -m app.cli` is the `lego` console script (app.cli:main). Both
# `serve` and `worker` apply the catalog migrations before they start.
ENTRYPOINT ["python", "-m", "app.cli"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
