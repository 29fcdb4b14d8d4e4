"""Typed errors raised at module boundaries; each says what the user should do."""

from __future__ import annotations


class HmnodeError(Exception):
    """Base of every error hmnode reports to a user; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(HmnodeError):
    """Bad input from the user (config, flags, files): nothing was changed."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file, environment variable or flag holds an unknown key or a bad value."""


class IdentityError(UsageError):
    """The node key is missing, unreadable, malformed or too widely readable."""


class DataDirInUse(UsageError):
    """Another agent holds the data dir's lock."""


class StoreError(HmnodeError):
    """The LMDB store cannot be opened or written."""


class SchemaTooNew(StoreError):
    """The store was written by a newer hmnode whose schema this one does not know."""

    exit_code = 2


class StoreCorrupt(StoreError):
    """A stored record does not decode as its table's record type."""


class AgentNotRunning(HmnodeError):
    """A command needs a running agent and found none."""

    exit_code = 3


class ControlError(HmnodeError):
    """The control API answered with an error or broke the protocol."""
