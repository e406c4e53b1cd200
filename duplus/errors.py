"""Error types of the duplus library.

Every error a user can trigger with bad input is a ``DuplusError`` whose message names the
file, case or config key at fault and what was expected.
"""


class DuplusError(Exception):
    """Base class of all errors raised on purpose by duplus."""


class ConfigError(DuplusError, ValueError):
    """A config key is missing, misspelled or has a wrong value."""


class DataError(DuplusError, ValueError):
    """An input image, label or table cannot be used (unreadable, wrong shape, NaN, ...)."""


class IntegrityError(DataError):
    """A dataset failed its integrity check; the message lists every problem by case."""


class ChecksumError(DuplusError):
    """A downloaded or extracted file does not match its published checksum."""


class UnsafeArchiveError(DuplusError):
    """An archive member would escape the target folder or is not a plain file/folder."""


class DownloadError(DuplusError):
    """A download failed after its retries, or a manual dataset's files are missing."""


class PromptError(DuplusError, KeyError):
    """A prompt is missing from the cache or a text encoder cannot be loaded."""

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0]) if self.args else ""


class ModelError(DuplusError):
    """Weights do not fit the model, or a file is not a trusted weights file."""


class CheckpointError(ModelError):
    """A checkpoint or adapter is missing, truncated, untrusted or belongs to another base."""


class EHRError(DataError):
    """A clinical (EHR) table is malformed: missing columns, duplicate ids, bad times/events."""


class TrainingInterrupted(DuplusError):
    """Training stopped on request (SIGTERM) after writing a checkpoint; rerunning resumes from it."""


class TrainingDiverged(DuplusError):
    """A gradient norm was NaN or infinite: the weights updated after it are not usable."""
