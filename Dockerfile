# syncsvc: one image for every role. By default `syncsvc serve` (API + workers + scheduler in
# one process) on a SQLite file in the /data volume; docker-compose.yml runs `api` and
# `worker` apart on PostgreSQL + Redis with the same image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin syncsvc \
    && install -d -o syncsvc -g syncsvc /data

# Only what the wheel needs (see .dockerignore); the source is removed once installed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncsvc ./syncsvc
COPY webhooks ./webhooks
RUN pip install . && rm -rf /src

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
