"""The one base of user-fixable errors, at the bottom layer so every package can raise it.

A ``TeamsRLError`` is a condition the user can fix (a config value, a missing model, a
busy run directory, a cluster too small); its message names the field, file or resource
and the fix. ``teams-rl`` turns any of them into a one-line message and exit status 1;
anything else is a bug and keeps its traceback. Subclasses exist where a caller must tell
them apart (a test, a retry, a stage that resumes).
"""

from __future__ import annotations


class TeamsRLError(Exception):
    """A user-fixable condition; the message says what and how to fix it."""


class ConfigError(TeamsRLError, ValueError):
    """A config file or override is invalid; the message names the field and the fix."""


class MissingExtra(TeamsRLError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""
