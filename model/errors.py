"""The project's one exception type for bad user input, at the bottom layer so every package can
raise it: CLIs print it as one line (`error: ...`, exit 2), never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, mismatched cache). Printed as one line."""


class CheckpointError(UserError, ValueError):
    """A draft checkpoint file that cannot be read (truncated, corrupt, not what it claims)."""
