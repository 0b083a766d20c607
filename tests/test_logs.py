"""Logging: journald priority prefixes and secret redaction, tracebacks included."""

from __future__ import annotations

import io
import logging

from daemon.logs import configure_logging, use_journal_format

KEY = "key-that-must-not-leak-42"


def log_and_capture(journal: bool) -> str:
    stream = io.StringIO()
    configure_logging("INFO", journal=journal, secrets=[KEY], stream=stream)
    log = logging.getLogger("darkroom.test")
    log.debug("hidden at INFO")
    log.warning("header x-api-key: %s", KEY)
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        log.exception("request failed")
    return stream.getvalue()


def test_journal_lines_carry_priorities_and_no_secret() -> None:
    text = log_and_capture(journal=True)
    assert KEY not in text
    assert "hidden at INFO" not in text
    lines = text.splitlines()
    assert lines[0] == "<4>darkroom.test: header x-api-key: ***"
    assert lines[1].startswith("<3>darkroom.test: request failed")
    assert all(line.startswith("<3>") for line in lines[1:])  # traceback lines too
    assert "bad key ***" in text


def test_plain_lines_have_timestamps_and_no_secret() -> None:
    text = log_and_capture(journal=False)
    assert KEY not in text
    assert " WARNING darkroom.test: header x-api-key: ***" in text


def test_auto_format_follows_journal_stream() -> None:
    assert use_journal_format("auto", {"JOURNAL_STREAM": "8:1234"})
    assert not use_journal_format("auto", {})
    assert use_journal_format("journal", {})
    assert not use_journal_format("plain", {"JOURNAL_STREAM": "8:1234"})
