# Stand-in for MinIO (not in Debian, image not pullable here): moto's S3 server from PyPI. It keeps
# objects in memory (lost when the container restarts), accepts any access key and enforces no policy:
# the per-prefix users of stack/minio-init.sh do not exist on it (stack/s3-standin-init.py makes the bucket).
ARG PYTHON_IMAGE=leanrec-standin/python:3.11
FROM ${PYTHON_IMAGE}
ARG MOTO_VERSION
RUN pip install --no-cache-dir "moto[server]==${MOTO_VERSION}"
RUN useradd --create-home --uid 10002 s3
USER s3
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
