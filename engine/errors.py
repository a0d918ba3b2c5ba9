"""Errors that are the user's to fix: the engine prints them as one clear message, never a traceback."""


class UserError(RuntimeError):
    """Bad input (a flag, a path, a checkpoint): the message says what is wrong and how to fix it."""
