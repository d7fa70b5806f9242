"""The user errors every part of genrec raises: a job prints their message on one
line and exits with status 2 (genrec.runtime), instead of a traceback."""


class GenrecError(Exception):
    """Bad input or a bad setting that the user can fix; the message names it."""
