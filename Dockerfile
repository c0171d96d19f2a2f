# syntax=docker/dockerfile:1
#
# Production image for Sjaak.
#
#   docker build -t sjaak .
#   docker run -e SJAAK_DATABASE_URL=postgresql://... -p 8000:8000 sjaak          # serve
#   docker run -e SJAAK_DATABASE_URL=postgresql://... sjaak migrate                # or worker
#
# The container never starts the embedded PostgreSQL: without SJAAK_DATABASE_URL the
# entrypoint (infra/docker-entrypoint.sh) exits with an error.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: resolve nothing, install exactly what requirements.lock pins -------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1

RUN python -m venv /opt/venv

COPY requirements.lock /tmp/requirements.lock
# The lock is generated with hashes (and includes the dev extra; installed as locked).
# --only-binary: every pinned package ships wheels, so the slim image needs no compiler.
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: \
        -r /tmp/requirements.lock

# --- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SJAAK_ENVIRONMENT=production \
    SJAAK_HOST=0.0.0.0 \
    SJAAK_SEED_DEMO=false \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app

RUN groupadd --system --gid 10001 sjaak \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sjaak

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Code (with the .sql migrations under api/db/migrations) stays root-owned: read-only to the app.
COPY api/ /app/api/
COPY --chmod=0755 infra/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN python -m compileall -q /app/api

USER 10001:10001

EXPOSE 8000

# /ready answers 200 only when the database is reachable and fully migrated; an HTTP error
# (503) or no answer makes urlopen raise, so the check exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["python", "-m", "api", "serve", "--workers", "2"]
