"""Every error that means "the input is wrong" (or the run was stopped on purpose), in one place.

Recipes print a ``UserError`` as one line and exit with status 2 (or ``exit_code``)
instead of a traceback; anything else is a bug and keeps its traceback. Each class also keeps
the built-in base it always had, so ``except ValueError`` around a builder still works.
"""

import importlib


class UserError(Exception):
    """Bad input or a deliberate stop: reported as one line, exit status ``exit_code``."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config that cannot run: unknown key, wrong type, missing value."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model folder is missing, incomplete, damaged or of an unsupported kind."""


class CorpusError(UserError, ValueError):
    """A corpus that cannot be read, or has nothing to train on."""


class TaskDataError(UserError, ValueError):
    """A downstream-task dataset that cannot be used: a missing column or split, an unknown label."""


class ExportError(UserError, ValueError):
    """A student that cannot be exported as asked, or an export folder that is in the way."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


class UnsafePathError(UserError, ValueError):
    """A write outside the run's output_dir."""


class OutputDirBusy(UserError, RuntimeError):
    """Another process is running in this output_dir."""


class LockingUnsupported(UserError, OSError):
    """output_dir is on a filesystem without file locks (flock), so it cannot be locked."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class RunInterrupted(UserError, RuntimeError):
    """A signal stopped the run after a step; a checkpoint was written. Exits with 128+signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def require(module: str, extra: str = "export"):
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f'{module} is not installed ({e}). Install it with: pip install -e ".[{extra}]" '
            '(the README\'s install, pip install -e ".[dev]", includes it)'
        ) from None
