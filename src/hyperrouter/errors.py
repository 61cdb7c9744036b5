"""The one exception type for bad user input.

Anything a user can get wrong (a path, a preset name, a config value, a tensor shape) raises
`HyperRouterError` with a one-line message that names the bad value and what would be valid. It
subclasses ValueError so library callers can catch it the usual way; the CLI prints the message and
exits non-zero without a traceback.
"""


class HyperRouterError(ValueError):
    """Bad input from a user: a one-line message naming the value and what is valid."""
