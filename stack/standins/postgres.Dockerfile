# Stand-in for postgres:16 (which cannot be pulled here): Debian bookworm's PostgreSQL (15), with an
# entrypoint that does what the official image's does for this stack: a first start initialises
# PGDATA with the superuser POSTGRES_USER / POSTGRES_PASSWORD (scram-sha-256, TCP from anywhere on the
# compose network), every start runs the server as the postgres user.
ARG DEBIAN_IMAGE=leanrec-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENTRYPOINT ["bash", "/usr/local/bin/postgres-entrypoint"]
CMD ["postgres"]
