"""The one exception type for a user's mistake: the CLIs print its message on one line and exit non-zero."""


class UserError(Exception):
    """Bad input that the user can fix; its message names the problem and what to do."""
