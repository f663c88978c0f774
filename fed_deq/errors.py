"""Errors the command line turns into a one-line message and exit code 2."""


class InputError(ValueError):
    """Bad user input (a scenario key, a file, a command-line value).

    The message is one line and names what is wrong, e.g.
    ``scenarios/x.yaml: training.rounds: must be an integer >= 1, got -3``.
    """
