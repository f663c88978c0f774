"""The two failures the command line reports in one line: bad input (exit 2) and a failed run (exit 1)."""


class InputError(ValueError):
    """Bad user input (a scenario key, a file, a command-line value).

    The message is one line and names what is wrong, e.g.
    ``scenarios/x.yaml: training.rounds: must be an integer >= 1, got -3``.
    """


class RunFailed(RuntimeError):
    """A run started but could not finish (the CLI exits 1)."""
