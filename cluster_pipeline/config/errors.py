"""The one error a user's configuration raises, and the helper every section check uses."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the key and what would work."""

    exit_status = 2  # bad input, on every rank (dist.exit_status_of)


def raise_first_failed(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed check: one error, the first in field order."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
