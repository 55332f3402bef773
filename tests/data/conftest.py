"""The data engines (params `data_engine`) the engine-parametrized tests of tests/data run on.

Spark runs in one SparkSession for the whole test session (`spark`): a JVM start costs seconds,
so it is built once, small (local[2], 2 shuffle partitions, no UI), and every stage reuses it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from pipeline.core.config import SparkConfig

_NO_SPARK = ("data_engine spark needs a Java 17+ runtime (no java on PATH, JAVA_HOME unset)"
             if shutil.which("java") is None and not os.environ.get("JAVA_HOME") else
             "data_engine spark needs pyspark (pip install '.[spark]')" if importlib.util.find_spec("pyspark") is None else None)
# Slow: a JVM and Spark's per-query planning add about three minutes to tests/data; CI runs them.
ON_SPARK = [pytest.mark.spark, pytest.mark.slow, pytest.mark.skipif(_NO_SPARK is not None, reason=_NO_SPARK or "")]
ENGINES = ["pandas", "duckdb", pytest.param("spark", marks=ON_SPARK)]
SQL_ENGINES = ["duckdb", pytest.param("spark", marks=ON_SPARK)]
TEST_SPARK = SparkConfig(master="local[2]", driver_memory="1g", conf={"spark.sql.shuffle.partitions": "2"})


@pytest.fixture(scope="session")
def spark():
    from pipeline.data import spark_session

    session = spark_session.session(TEST_SPARK)
    yield session
    session.stop()


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    """Each engine-parametrized test runs on every engine: same outputs, same summary counts."""
    if request.param == "spark":
        request.getfixturevalue("spark")
    return request.param


@pytest.fixture(params=SQL_ENGINES)
def sql_engine(request) -> str:
    """duckdb and spark, each compared with pandas by the test."""
    if request.param == "spark":
        request.getfixturevalue("spark")
    return request.param
