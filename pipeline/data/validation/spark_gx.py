"""GX on the Spark DataFrame (data_engine: spark): the suite of `rules.checks` over every row, in Spark.

GX 1.x's Spark data source validates the input as one Spark DataFrame, whole: column existence,
the row count, the not-null, range and uniqueness rules, each the same expectation object the
pandas path runs (no rule is restated). The DataFrame GX sees is to Spark what `frame.gx_frame`
is to pandas: the contract's columns, floats as DOUBLE with NaN as null (GX on pandas counts a
NaN as null, GX on Spark would not), and `KEY_HASH_REPEATED` true where all three keys are present
(no pre-filter: GX's Spark uniqueness check is a window count, it needs none).

Not on Spark: the type expectations. They name pandas dtypes (`rules.ID_TYPES`, ...), which GX's
Spark data source does not recognise (it fails them with "No recognized spark types in
expected_types_list"); they run on GX's pandas source over the first rows (`outofcore.SAMPLE_ROWS`),
which decides them for the file: a Parquet column has one type. The report says which check ran
where (`gx_data` of each entry, `gx_spark` and `gx_sample`).

GX on Spark reports counts (result_format BASIC), not every failing row: routing stays the SQL
derived from the same expectations (`sql_rules`), and `outofcore` stops the stage unless each
row rule's GX count equals the SQL count. The Data Docs are built from these results.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.core import schema

from . import rules, sql_rules

# Counts and a few examples per expectation: COMPLETE would collect every failing row to the driver.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 5}
TYPE_EXPECTATIONS = {"ExpectColumnValuesToBeInTypeList", "ExpectColumnValuesToBeOfType"}
SUITE_TYPES = f"{rules.SUITE_TABLE}_types_on_sample"  # the type checks' GX suite (pandas, first rows)


def on_spark(check: rules.Check) -> bool:
    """Whether GX runs `check` on the Spark DataFrame (all but the pandas-dtype type checks)."""
    return type(check.expectation).__name__ not in TYPE_EXPECTATIONS


def frame_sql(types: dict[str, pa.DataType], source: str) -> str:
    """The query of the DataFrame GX validates on Spark, from the engine's view `source`."""
    columns = []
    for column in (c for c in schema.RAW_COLUMNS if c in types):
        q = sql_rules.quote(column)
        if pa.types.is_floating(types[column]):
            columns.append(f"CASE WHEN isnan({q}) THEN NULL ELSE {q}::DOUBLE END AS {q}")
        else:
            columns.append(q)
    if set(schema.KEY_COLUMNS) <= set(types):
        keys = " AND ".join(f"{sql_rules.quote(c)} IS NOT NULL" for c in schema.KEY_COLUMNS)
    else:
        keys = "false"  # the batch fails on the missing column
    columns.append(f"({keys}) AS {sql_rules.quote(rules.KEY_HASH_REPEATED)}")
    return f"SELECT {', '.join(columns)} FROM {source}"


def run_gx(sample: pd.DataFrame, frame: Any, suite: list[rules.Check], docs_dir: Any) -> tuple[Any, list[Any]]:
    """The type checks on the pandas `sample`, every other check on the Spark DataFrame `frame`, one context."""
    ranges = [c for c in (schema.TIMESTAMP, schema.RATING) if c in frame.columns]
    batches = [rules.Batch(SUITE_TYPES, [c for c in suite if not on_spark(c)], sample)]
    batches += [
        rules.Batch(name, [c for c in suite if on_spark(c) and c.suite == name], data, spark=True, result_format=RESULT_FORMAT)
        for name, data in ((rules.SUITE_TABLE, frame), (rules.SUITE_RANGES, frame.select(*ranges)))
    ]
    return rules.run_batches(batches, suite, docs_dir)
