# syntax=docker/dockerfile:1
# pgupkeep container image: a wheel built in one stage, installed offline into a slim runtime stage
# that runs as an unprivileged user and writes nothing to its root filesystem.

ARG PYTHON_VERSION=3.12

# ---------------------------------------------------------------- build: wheels for the project and its dependencies
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# Every dependency becomes a wheel here, so the runtime stage installs with --no-index.
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pgupkeep" \
      org.opencontainers.image.description="A long-running PostgreSQL upkeep daemon: partitions, materialized views, long-running queries, bloat and health, exported to Prometheus." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/pgupkeep/pgupkeep" \
      org.opencontainers.image.documentation="https://github.com/pgupkeep/pgupkeep/tree/main/docs"

# No .pyc writes (the root filesystem is read-only in Kubernetes) and unbuffered JSON log lines.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PGUPKEEP_CONFIG=/etc/pgupkeep/policy.yaml

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels pgupkeep \
 && groupadd --system --gid 10001 pgupkeep \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin pgupkeep \
 && mkdir -p /etc/pgupkeep

# A starting policy; mount your own over /etc/pgupkeep (a ConfigMap in Kubernetes).
COPY --chown=root:root config/policy.yaml /etc/pgupkeep/policy.yaml

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 9188

# No curl in a slim image: urllib raises on a 503 (stalled scheduler) or a refused connection.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9188/healthz', timeout=4)"]

# pgupkeep is PID 1 with no shell in between: it handles SIGTERM itself (finish running jobs within
# shutdown_grace, release leases, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgupkeep"]
CMD ["run", "--config", "/etc/pgupkeep/policy.yaml"]
