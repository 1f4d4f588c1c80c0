"""The three ways a command ends badly, each with its exit code (README: exit codes)."""


class LorakitError(Exception):
    exit_code = 1


class UserError(LorakitError):
    """Bad input the user can fix: a flag, a setting, a data file, a missing path. Exit code 2."""

    exit_code = 2


class RunError(LorakitError):
    """A run that failed on valid input: non-finite loss, out of memory, I/O. Exit code 1."""

    exit_code = 1


class Interrupted(LorakitError):
    """Ctrl-C or SIGTERM after state was saved. Exit code 130."""

    exit_code = 130
