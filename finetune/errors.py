"""Errors the CLI maps to exit codes: bad input (2), interrupted (130), diverged (1)."""


class FinetuneError(Exception):
    """Invalid recipe or input. The message names the problem and the fix; no traceback is shown."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint: exit 130, resumable."""


class Diverged(Exception):
    """The loss became NaN or infinite: exit 1, naming the last good checkpoint."""
