"""The two kinds of failure a job can have: the user's (fix your input) and ours (a bug or the platform)."""


class UserError(Exception):
    """Bad input: a hyperparameter, a channel, a data file. The message says what to fix."""

    exit_code = 2


class ConfigError(UserError):
    """A hyperparameter is unknown, of the wrong type, or out of range."""


class DataError(UserError):
    """A channel or data file is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint in the checkpoint location would load more than tensors and plain data (code, when unpickled)."""


class TrainingInterrupted(Exception):
    """SIGTERM arrived (stop or spot interruption); a checkpoint was saved for the rerun to resume from."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process ended by the signal
