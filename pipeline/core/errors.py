"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class PipelineError(Exception):
    """Base class: the message says what is wrong and what to do about it."""

    exit_code = 2


class ConfigError(PipelineError):
    """params.yaml or an override is invalid."""


class IngestError(PipelineError):
    """The source cannot be read as interactions (empty, wrong format, missing columns...)."""


class ValidationFailed(PipelineError):
    """A batch-level expectation failed; the stage stops before writing its outputs."""

    exit_code = 3


class DriftDetected(PipelineError):
    """A new batch of interactions drifted from the reference data beyond a `drift` threshold."""

    exit_code = 3


class FeaturesError(PipelineError):
    """The interactions cannot be turned into features (nothing left after filtering, bad vocabulary...)."""


class TrainError(PipelineError):
    """Training cannot start or continue (no features, bad checkpoint, invalid shape)."""


class CompressError(PipelineError):
    """A variant cannot be built (no teacher, unknown variant, invalid compression setting)."""


class EvaluateError(PipelineError):
    """Nothing to evaluate (no trained model, no features)."""


class RegistryError(PipelineError):
    """Nothing to register or promote, no candidate within budget, no champion to roll back to..."""


class ServingError(PipelineError):
    """Batch recommendations cannot run (no histories to recommend for)."""
