"""The one exception type for mistakes a user can fix (bad path, bad value, incompatible file).

The CLI turns it into a one-line message and exit status 2. It subclasses ValueError so that Python
callers can catch it the way they catch any bad-argument error.
"""


class UserError(ValueError):
    """A problem with the user's input, config or files; the message says how to fix it."""
