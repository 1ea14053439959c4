"""Error types. `BadInputError` and its subclasses mean "the user must change something" (CLI exit 2)."""


class CkptflowError(Exception):
    """Base class for ckptflow's own failures (CLI exit 1)."""


class BadInputError(CkptflowError):
    """Input the user must fix; the message says what to change (CLI exit 2)."""


class ConfigError(BadInputError):
    """Invalid settings or config file."""


class DataError(BadInputError):
    """Missing or malformed data; the message names the file and the row."""


class ModelNotFoundError(BadInputError):
    """The base model is neither built in, a local directory, nor in the local HF cache."""


class FingerprintMismatchError(BadInputError):
    """A run was reopened with different config or data; the message shows what differs."""


class LedgerError(BadInputError):
    """The ledger cannot be used: bad URL, missing driver, not a database, or a schema this version cannot use."""


class HomeError(BadInputError):
    """CKPTFLOW_HOME cannot be used: a file, or not writable where ckptflow must write."""


class RunNotFoundError(BadInputError):
    """No run of that name in the ledger."""


class RunLockedError(BadInputError):
    """Another live process holds the run's lease."""


class LeaseLostError(RunLockedError):
    """This process's lease on a run was taken over: its writes to the run are refused (fencing)."""


class LedgerUnavailableError(CkptflowError):
    """The ledger's database server stayed unreachable through every retry of one short transaction."""


class InsufficientDiskError(CkptflowError):
    """A save would leave less free disk than min_free_bytes, or the disk filled during a save."""


class CorruptCheckpointError(CkptflowError):
    """A checkpoint failed verification against its manifest."""


class NoCheckpointError(CkptflowError):
    """No committed, verified checkpoint is available (e.g. to export)."""
