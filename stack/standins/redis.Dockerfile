# Stand-in for redis:7.4 (which cannot be pulled here): Debian bookworm's redis-server (7.0). Started
# without a config file, as docker-compose.yml does, it listens on every interface (the password,
# --requirepass, is what guards it, as with the official image).
ARG DEBIAN_IMAGE=leanrec-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
# Writable by redis: its RDB snapshots go here (the first real start had /data root-owned, every snapshot
# failed, and Redis then refused writes: Celery could not queue a task).
WORKDIR /data
USER redis
CMD ["redis-server"]
