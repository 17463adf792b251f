"""Errors a user can act on. The CLI prints these as one clear message instead of a traceback."""


class InterpError(Exception):
    """Base class (a mixin beside the matching builtin: KeyError, ImportError, ValueError)."""


class UnknownSiteError(InterpError, KeyError):
    """A site name the model does not have; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])


class MissingPackageError(InterpError, ImportError):
    """A package that a built-in model or corpus needs is not installed; the message says how to install it."""


class ArchitectureError(InterpError, ValueError):
    """The model's structure could not be mapped to sites."""


class ModelNotFoundError(InterpError, OSError):
    """A model spec that names no embedded model, no local folder and nothing the hub provides."""


class InputError(InterpError, ValueError):
    """Bad input to a job (empty corpus, mismatched shapes, out-of-range settings...)."""


class StoreError(InterpError, OSError):
    """An activation store that is missing, damaged or incomplete; the message says which shard."""


class LockedError(InputError):
    """Another process is writing the same store or run folder; the message names its pid."""


class TrainingError(InterpError, RuntimeError):
    """Training cannot go on (the loss diverged); the message says what to change."""
