"""User-facing errors: the CLI prints their message (no traceback unless --debug) and exits non-zero."""


class HarnessError(Exception):
    """A problem the user can fix: the message names what is wrong and how to fix it."""


class DataError(HarnessError):
    """Missing data root, wrong layout, bad label map."""


class WeightsError(HarnessError):
    """Weights not found locally, unreadable or of the wrong architecture."""


class ConfigError(HarnessError):
    """Bad protocol file, unknown option, invalid parameter."""
