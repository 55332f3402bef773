"""Stage `validate`: raw interactions -> validated interactions + quarantine + report.

A Great Expectations (GX Core 1.x) suite (`rules`) runs over `data/raw/interactions.parquet`:

* batch level: each column of `schema.RAW_COLUMNS` exists and has a contract type, and
  the table holds at least `min_rows` rows;
* row level: user_id, item_id, timestamp and rating are not null (a NaN rating counts as
  null), timestamp >= min_timestamp, timestamp <= now + future_tolerance_s, rating lies in
  [rating_min, rating_max], and (user_id, item_id, timestamp) is unique.

A failed batch-level expectation stops the stage with `ValidationFailed`, after the JSON
summary (and the Data Docs) are written; the validated output is not written then. A row
that breaks a row-level rule goes to `data/quarantine/validate.parquet` with the first
rule it breaks as `reason` (order: `REASONS`); for duplicates the first occurrence is kept.
The other rows go to `data/validated/interactions.parquet` unchanged. If the quarantined
share exceeds `max_quarantine_share` the batch fails too; the quarantine file is still
written so a person can look at the rows. Every input row ends up in exactly one file.

Each row rule is stated once, as a GX expectation: GX lists its failing rows by row id
(result_format COMPLETE, `unexpected_index_list` over the frame's named index `ROW_ID`), and
`routing` builds the quarantine from those lists; nothing re-evaluates a rule in pandas.

Modules: `rules` (reasons, the suite, running GX), `frame` (the frame GX sees and the duplicate
pre-filter), `routing` (GX's failing rows -> reasons, the quarantine table), `report` (summary
entries, Data Docs), `run_state` (one run's paths, summary, row accounting), `verdicts` (the suite
run and its batch-level verdicts), `stage` (`run_validate`).

Out of core (`run_validate(..., engine="duckdb" or "spark")`, params `data_engine`): `outofcore` runs
GX on the first rows only (types, Data Docs) and every row rule over all rows in DuckDB or Spark, as
SQL that `sql_rules` derives from the same GX expectations (no second statement of a rule; the
engines' few differences are `sql_engine.Dialect`'s); same outputs.

Speed (2 cores; "timings_s" in reports/validation.json splits each run):

* GX fingerprints each pandas batch with an MD5 of the whole frame (a batch marker nothing
  here reads). It is paid, not patched out: part of "gx_validate".
* GX's between check runs a Python function per value unless the dtype is exactly
  int64/float64 or datetime, so a float32 rating reaches GX as float64 (exact).
* GX's column-map checks filter the *whole* batch frame on `notnull()` several times per
  expectation, which costs seconds when the frame holds string columns. The range
  expectations therefore run in a second suite over a frame of just timestamp and rating.
* `ExpectCompoundColumnsToBeUnique` runs `DataFrame.duplicated` over every row: 6 s at 10M
  rows with int ids, 11 s with string ids. A sort-based pre-filter marks the rows whose
  (user, item, timestamp) hash occurs more than once (`KEY_HASH_REPEATED`; equal keys have
  equal hashes, so the other rows cannot be duplicates), and GX checks uniqueness with a
  `row_condition` on that column: GX still decides which rows are duplicates.
* Failing rows come off the named index in one pass; an id column would cost GX a
  `DataFrame.at` per failing row (see `rules.RESULT_FORMAT`).
"""

from .report import DATA_DOCS_DIR, SUMMARY_FILE
from .rules import REASONS
from .stage import QUARANTINE_FILE, ValidationResult, run_validate

__all__ = ["DATA_DOCS_DIR", "QUARANTINE_FILE", "REASONS", "SUMMARY_FILE", "ValidationResult", "run_validate"]
