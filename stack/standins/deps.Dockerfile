# The project's third-party dependencies (pyproject's dependencies + the `stack` extra, at the
# constraints.txt pins) installed once into the Python image, from a wheelhouse that the host
# downloaded (.stack-cache/wheels: pip there finds the local CPU torch wheel, so no CUDA torch).
# dags/Dockerfile and mlflow/Dockerfile build FROM this image: their `pip install` then finds every
# pin satisfied and both images share these layers. The wheelhouse stays in the first stage only.
ARG PYTHON_IMAGE=leanrec-standin/python:3.11
FROM ${PYTHON_IMAGE} AS install
COPY wheels /wheels
COPY requirements.txt constraints.txt /src/
RUN pip install --no-cache-dir --no-index --find-links /wheels -c /src/constraints.txt -r /src/requirements.txt

FROM ${PYTHON_IMAGE}
COPY --from=install /usr/local/python /usr/local/python
