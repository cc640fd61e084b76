# syncsvc: one image for every role. By default `syncsvc serve` (API + workers + scheduler in
# one process) on a SQLite file in the /data volume; docker-compose.yml runs `api` and
# `worker` apart on PostgreSQL + Redis with the same image.
#
# BASE is the official slim Python image by default. Any Debian bookworm base works too (CI
# builds on one made by debootstrap, as no registry is reachable there): when the base has no
# Python with venv, bookworm's python3 (3.11) is installed with apt.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/syncsvc \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin syncsvc \
    && install -d -o syncsvc -g syncsvc /data
ENV PATH=/opt/syncsvc/bin:$PATH

# Only what the wheel needs (see .dockerignore); the source is removed once installed.
# A build behind a TLS-inspecting proxy may lend pip its CA bundle as the secret `pip_ca`
# (`--secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt`); it is not kept in the image.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncsvc ./syncsvc
COPY webhooks ./webhooks
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && pip install . \
    && cd / && rm -rf /src

WORKDIR /data
USER syncsvc
ENV SYNCSVC_DATABASE_URL=sqlite:////data/syncsvc.db \
    SYNCSVC_PORT=8080
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SYNCSVC_PORT', '8080') + '/healthz', timeout=4)" || exit 1

# syncsvc stops gracefully on SIGTERM (Docker's default stop signal).
CMD ["syncsvc", "serve", "--host", "0.0.0.0"]
