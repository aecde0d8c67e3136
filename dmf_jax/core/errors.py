"""Errors in what a user gave (configs, flags, data files, workdirs), as opposed to bugs.

The binaries print a `UserError`'s message on one or a few lines and exit with status 2,
without a traceback (`--debug` shows it). Each subclass also derives from the built-in error
it refines, so `except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input: the message names the culprit and what to do."""


class ConfigError(UserError, ValueError):
  """An invalid experiment config; the message lists every problem found."""


class DataError(UserError, ValueError):
  """A malformed or inconsistent data file; the message names the file (and line)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file the user named, or a run or dataset needs, does not exist."""


class WorkdirError(UserError, ValueError):
  """A workdir that holds no run, or not the checkpoint asked for."""
