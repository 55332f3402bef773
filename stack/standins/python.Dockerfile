# Stand-in for python:3.11-slim (which cannot be pulled here): Debian bookworm's Python 3.11 in a venv
# on PATH, so `python` and `pip install` behave as in the official image. The build context holds the
# host's locally added CA certificates (a TLS-intercepting proxy the host trusts), so pip reaches PyPI.
ARG DEBIAN_IMAGE=leanrec-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python
ENV PATH=/usr/local/python/bin:$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
CMD ["python3"]
