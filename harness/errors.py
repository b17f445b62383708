"""User-facing errors: the CLI prints their message (no traceback unless --debug) and exits non-zero."""


class HarnessError(Exception):
    """A problem the user can fix: the message names what is wrong and how to fix it."""

    def __init__(self, *args: object) -> None:
        # A DataLoader worker's exception is re-created in the main process as type(e)("Caught ... Original
        # Traceback ...\n<module>.<Class>: message"); keep only the message the user should read.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "Original Traceback" in args[0]:
            marker = f"{type(self).__module__}.{type(self).__qualname__}: "
            text = args[0]
            if marker in text:
                args = (text[text.rindex(marker) + len(marker):].strip(),)
        super().__init__(*args)


class DataError(HarnessError):
    """Missing data root, wrong layout, bad label map."""


class WeightsError(HarnessError):
    """Weights not found locally, unreadable or of the wrong architecture."""


class ConfigError(HarnessError):
    """Bad protocol file, unknown option, invalid parameter."""


class StorageError(HarnessError):
    """A results folder, cache or output file cannot be written (read-only, disk full, lock failure)."""
