"""One exception type for bad user input: CLIs print it as one line, never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, mismatched cache). Printed as one line."""
