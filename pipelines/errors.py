"""Expected failures: their message is the whole story (a command prints it on one line, no traceback)."""


class PipelineError(RuntimeError):
    """A failure the user can act on from its message alone: a download that did not verify, an upload
    refused, a missing credential."""
