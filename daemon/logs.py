"""Logging to stdout in a form journald understands, with secrets scrubbed.

Under systemd (``JOURNAL_STREAM`` set, or ``log_format = "journal"``) each line starts with
a syslog priority prefix such as ``<4>`` so ``journalctl -p warning`` works and journald
adds its own timestamps; in a terminal lines carry a timestamp instead.  Whatever the
format, every configured secret is replaced by ``***`` in the final text, including
exception tracebacks, as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping

from daemon.settings import LogFormat

REDACTED = "***"
JOURNAL_STREAM_ENV = "JOURNAL_STREAM"
# syslog priorities (RFC 5424) for the prefixes journald parses.
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_JOURNAL_FORMAT = "%(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    """Formats a record, then removes every secret from the resulting text."""

    def __init__(self, fmt: str, *, journal: bool, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self._journal = journal
        self._secrets = tuple(secret for secret in secrets if secret)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        if self._journal:
            priority = _SYSLOG_PRIORITY.get(record.levelno, _SYSLOG_PRIORITY[logging.INFO])
            # journald reads one prefix per line, so continuation lines get it too.
            text = "\n".join(f"<{priority}>{line}" for line in text.splitlines())
        return text


def use_journal_format(log_format: LogFormat, environ: Mapping[str, str]) -> bool:
    """Whether to write priority-prefixed lines for journald."""
    if log_format == "auto":
        return bool(environ.get(JOURNAL_STREAM_ENV))
    return log_format == "journal"


def configure_logging(
    level: str, *, journal: bool, secrets: Iterable[str] = (), stream: object = None
) -> None:
    """Route all of darkroom's logging to stdout (or ``stream``) at ``level``."""
    handler = logging.StreamHandler(stream or sys.stdout)  # type: ignore[arg-type]
    handler.setFormatter(
        RedactingFormatter(
            _JOURNAL_FORMAT if journal else _PLAIN_FORMAT, journal=journal, secrets=secrets
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request and APScheduler every job run at INFO: keep that chatter
    # out of the daemon's log unless DEBUG is asked for.
    chatty_level = max(logging.getLevelName(level), logging.WARNING)
    for chatty in ("httpx", "apscheduler"):
        logging.getLogger(chatty).setLevel(chatty_level)
