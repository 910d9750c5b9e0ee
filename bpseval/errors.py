"""The one exception type bpseval raises for bad input; the CLI turns it into exit code 2."""


class BpsevalError(Exception):
    """Bad input or usage: the message names the file, the dataset, what is wrong and how to fix it."""
