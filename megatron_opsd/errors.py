"""The error type the command line reports as the user's to fix."""
from __future__ import annotations


class UserError(Exception):
    """Input the user fixes: a config, a data row, a checkpoint, a model directory, a job setting.

    ``opsd`` prints it as one line and exits 2, never a traceback. Each subclass also derives from
    the builtin it refines (ValueError, RuntimeError), so callers that catch those keep working.
    """
