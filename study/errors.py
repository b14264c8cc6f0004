"""The one error type users see: a clear line naming the problem and the fix, exit status 2."""


class UsageError(Exception):
    """Bad input (spec, data, storage, config): printed as one line, exit status 2."""

    exit_code = 2
