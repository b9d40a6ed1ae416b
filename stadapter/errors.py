"""Errors a user can act on. The CLI prints them as one line and exits with code 1."""


class StadapterError(Exception):
    """Base class for every error caused by input, configuration or environment (not by a bug)."""


class ConfigError(StadapterError, ValueError):
    """An invalid configuration value, preset name or JSON config."""


class BackboneError(StadapterError):
    """An unknown backbone spec, unusable weights, or a fingerprint mismatch."""


class InputError(StadapterError, ValueError):
    """A clip or batch of the wrong shape, dtype or frame count."""


class AdapterSetError(StadapterError):
    """Adapter tensors whose names, shapes or dtypes do not fit the model they are bound to."""


class BundleError(StadapterError):
    """A bundle directory that is missing files, was tampered with, or does not fit the backbone."""


class RegistryError(StadapterError):
    """An unknown task, version or alias, a refused registry change, or a database at the wrong schema."""


class RegistryUnavailable(RegistryError):
    """The registry database cannot be reached or failed while answering (an outage, not a missing task)."""


class DecodeError(StadapterError):
    """A video file that is missing, empty, truncated or cannot be decoded."""


class HubError(StadapterError):
    """A Hugging Face Hub call that failed: token refused, repository or revision missing, Hub unreachable."""
