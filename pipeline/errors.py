"""Bad user input: CLIs print it as one line, never a traceback. Defined in model/errors.py, the
bottom layer, so that model/, pipeline/, train/ and tools/ all raise the same type."""
from model.errors import UserError

__all__ = ["UserError"]
