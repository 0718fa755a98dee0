"""The one exception type for user mistakes; the CLI turns it into a one-line error and exit code 2."""


class MesaError(Exception):
    """A problem with the user's input (spec, run directory, checkpoint), not a bug."""


def warn_stderr(message: str) -> None:
    """The default warning channel of the library's long jobs (a recovered fault): one line on stderr."""
    import sys

    print(message, file=sys.stderr, flush=True)
