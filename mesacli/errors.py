"""The one exception type for user mistakes; the CLI turns it into a one-line error and exit code 2."""


class MesaError(Exception):
    """A problem with the user's input (spec, run directory, checkpoint), not a bug."""
