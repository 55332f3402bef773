"""The Spark engine (params `data_engine: spark`, settings `spark`): one SparkSession per process.

The session is built once from `spark.master`, `spark.driver_memory` and `spark.conf`, and reused
by every later stage in the process (starting the JVM costs seconds). The stages' SQL (`sql_engine`) reads double-quoted
names as identifiers and instants in UTC, so those two settings are forced whatever `spark.conf`
says. Spark does the row work (rules, de-duplication, k-core, vocabulary order, the final sort);
the driver then writes the same single Parquet files as the other engines (`sql_engine.SparkEngine`), so it
holds the sorted rows it writes (features) or one reason code per row (validate).

Object stores: ingest reads an s3:// (gs://, ...) source through pyarrow for every engine
(`sources.location`); the stages here read and write the work dir's local paths. Spark's own s3a://
reader would need the hadoop-aws jars on the classpath (spark.jars.packages, from Maven) and the
spark.hadoop.fs.s3a.* keys in `spark.conf`.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from pipeline.core.config import SparkConfig
from pipeline.core.errors import ConfigError

logger = logging.getLogger(__name__)

# Defaults a `spark.conf` entry may change: a small local job gains nothing from 200 shuffle partitions.
DEFAULTS = {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "8", "spark.sql.execution.arrow.pyspark.enabled": "true"}
# What the stages' SQL relies on.
REQUIRED = {"spark.sql.session.timeZone": "UTC", "spark.sql.ansi.enabled": "true", "spark.sql.ansi.doubleQuotedIdentifiers": "true"}


def session(cfg: SparkConfig) -> Any:
    """The process's SparkSession (built from `cfg` the first time; later calls reuse it)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise ConfigError("data_engine: spark needs a Java 17+ runtime (no java on PATH, JAVA_HOME unset), "
                          "e.g. apt-get install openjdk-17-jre-headless")
    try:
        from pyspark.sql import SparkSession
    except ImportError as err:
        raise ConfigError("data_engine: spark needs pyspark: pip install -c constraints.txt '.[spark]'") from err
    running = SparkSession.getActiveSession()
    if running is not None:  # one session per process: its settings are those it was built with
        for key, value in REQUIRED.items():
            running.conf.set(key, value)
        return running
    logger.info("spark: starting a session on %s", cfg.master)
    builder = SparkSession.builder.master(cfg.master).appName("leanrec").config("spark.driver.memory", cfg.driver_memory)
    for key, value in {**DEFAULTS, **cfg.conf, **REQUIRED}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
