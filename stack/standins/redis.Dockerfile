# Stand-in for redis:7.4 (which cannot be pulled here): Debian bookworm's redis-server (7.0). Started
# without a config file, as docker-compose.yml does, it listens on every interface (the password,
# --requirepass, is what guards it, as with the official image).
ARG DEBIAN_IMAGE=leanrec-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /data
USER redis
CMD ["redis-server"]
