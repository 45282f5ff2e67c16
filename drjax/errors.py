"""Errors that mean the user's input is wrong (a config, a file, a workdir), not drjax.

drjax's scripts (`drjax.runtime.run`) print them as one line on stderr and exit with status 1.
"""


class UserError(Exception):
  """Base of the errors a script reports as one line, without a traceback."""


class ConfigError(UserError, ValueError):
  """A config field has a value drjax cannot run with."""
