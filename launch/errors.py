"""Every error the training entries report to the user, in one module that imports nothing of launch/.

The entries catch these by kind (``config.run_entry``): bad input before any process group starts (exit 2), a
checkpoint that cannot be resumed (exit 2), a save that could not finish (exit 1). Keeping them here is what lets
config, corpus, manifest and runstate use each other's errors without importing each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad run or DeepSpeed config value; the message says what is allowed."""


class DataError(ValueError):
    """Bad data input: missing file, empty corpus, hash mismatch, missing optional package."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed: the message names the checkpoint, the file and what is wrong."""


class CheckpointSaveError(RuntimeError):
    """A save that could not finish (disk full, I/O error). The previous checkpoint is intact and ``latest`` still
    names it; ``announce``: this rank prints the message (every rank raises the collective space check's, rank 0
    prints it)."""

    def __init__(self, message: str, announce: bool = True):
        super().__init__(message)
        self.announce = announce
