"""The base of every error a user can fix: the CLI catches `UserError` alone and prints its one line."""


class UserError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, run directory, target), said in one line that
    names the culprit. Subclasses keep a builtin base too (ValueError, RuntimeError) for callers of the API."""
