"""The one error type that means "the user's input is wrong": the CLI prints it on one line, exit 2."""


class FinetuneError(Exception):
    """Invalid recipe or input. The message names the problem and the fix; no traceback is shown."""
