"""A dependency-free ``sd_notify``: tell systemd we are ready, alive, or stopping.

``darkroom.service`` is ``Type=notify`` with ``WatchdogSec=``: systemd considers the service
started only once it receives ``READY=1``, restarts it when ``WATCHDOG=1`` stops arriving,
and shows the latest ``STATUS=`` line in ``systemctl status``.  The protocol is one
datagram of newline-separated ``KEY=value`` assignments sent to the ``AF_UNIX`` socket named
by ``$NOTIFY_SOCKET`` (see sd_notify(3)); implementing it here avoids depending on
libsystemd or a binding for a dozen lines of socket code.

Outside systemd (a terminal, the tests, a container) ``$NOTIFY_SOCKET`` is unset and every
call is a no-op returning False.  A failed send is logged and also returns False: telling
systemd how we are must never be the reason darkroom stops working.

The environment is always passed in explicitly; only the caller that builds the one
:class:`Notifier` of the process decides to hand it ``os.environ``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("darkroom.notify")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# "@name" is a socket in the abstract namespace, written "\0name" on the wire.
ABSTRACT_PREFIX = "@"
ABSTRACT_BYTE = "\0"
PATH_PREFIX = "/"

READY = "READY=1"
WATCHDOG = "WATCHDOG=1"
STOPPING = "STOPPING=1"
STATUS_KEY = "STATUS="
FIELD_SEPARATOR = "\n"

# systemd reads notifications into a buffer of PIPE_BUF bytes and drops longer ones.
MAX_DATAGRAM_BYTES = 4096
TEXT_ENCODING = "utf-8"

USEC_PER_SECOND = 1_000_000
# Ping twice per WatchdogSec=, as sd_watchdog_enabled(3) recommends: one late ping is not
# yet a missed deadline.
WATCHDOG_PING_FRACTION = 0.5


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value; None when unusable.

    An absolute path is used as it is; ``@name`` becomes the abstract address ``\\0name``.
    Anything else (empty, relative, systemd's newer ``vsock:`` form) is not supported.
    """
    if value.startswith(PATH_PREFIX):
        return value
    if value.startswith(ABSTRACT_PREFIX) and len(value) > len(ABSTRACT_PREFIX):
        return ABSTRACT_BYTE + value[len(ABSTRACT_PREFIX) :]
    return None


def notify(message: str, environ: Mapping[str, str]) -> bool:
    """Send ``message`` (``KEY=value`` lines) to systemd; True when it was sent.

    False when not running under systemd (``$NOTIFY_SOCKET`` unset or unusable), when the
    message is empty or longer than systemd accepts, or when sending failed (logged).
    """
    value = environ.get(NOTIFY_SOCKET_ENV, "")
    if not value:
        return False
    address = socket_address(value)
    if address is None:
        log.warning("%s=%r is not a socket path or @abstract name; not notifying",
                    NOTIFY_SOCKET_ENV, value)  # fmt: skip
        return False
    payload = message.encode(TEXT_ENCODING)
    if not payload or len(payload) > MAX_DATAGRAM_BYTES:
        log.warning("notification of %d bytes not sent (1 to %d allowed)",
                    len(payload), MAX_DATAGRAM_BYTES)  # fmt: skip
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sent = sock.sendto(payload, address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", value, exc)
        return False
    return sent == len(payload)


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings, or None when systemd watches no process of ours.

    systemd sets ``$WATCHDOG_USEC`` to ``WatchdogSec=`` in microseconds, and
    ``$WATCHDOG_PID`` to the process it expects the pings from; when that is another
    process (we were started by it and inherited its environment) the watchdog is not
    ours to feed.  The interval is half the timeout, so one delayed ping is harmless.
    """
    try:
        usec = int(environ.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_value = environ.get(WATCHDOG_PID_ENV, "")
    if pid_value:
        try:
            if int(pid_value) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / USEC_PER_SECOND * WATCHDOG_PING_FRACTION


def status_field(text: str) -> str:
    """A ``STATUS=`` assignment for ``text``: on one line and short enough to be accepted.

    Line breaks would start a new assignment, so they become spaces; text too long for a
    datagram is cut (on a character boundary) with an ellipsis.
    """
    flat = " ".join(text.splitlines())
    room = MAX_DATAGRAM_BYTES - len(READY) - len(FIELD_SEPARATOR) - len(STATUS_KEY)
    encoded = flat.encode(TEXT_ENCODING)
    if len(encoded) > room:
        ellipsis = "…"
        keep = room - len(ellipsis.encode(TEXT_ENCODING))
        flat = encoded[:keep].decode(TEXT_ENCODING, errors="ignore") + ellipsis
    return STATUS_KEY + flat


def ready_message(status: str | None = None) -> str:
    """``READY=1``, followed by a ``STATUS=`` line when ``status`` is given."""
    if status is None:
        return READY
    return READY + FIELD_SEPARATOR + status_field(status)


class Notifier:
    """The process's line to systemd, built once from the environment it was started with.

    Every method returns whether the notification was sent, so callers may ignore it.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        # Keep only what notify() and watchdog_interval() read, as they were at start.
        names = (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)
        self._environ: dict[str, str] = {n: environ[n] for n in names if n in environ}
        self._interval = watchdog_interval(self._environ)

    @property
    def enabled(self) -> bool:
        """Whether systemd gave us a notification socket."""
        return bool(self._environ.get(NOTIFY_SOCKET_ENV))

    def send(self, message: str) -> bool:
        """Send raw ``KEY=value`` lines."""
        return notify(message, self._environ)

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: systemd marks the unit active (``Type=notify``)."""
        return self.send(ready_message(status))

    def watchdog_ping(self) -> bool:
        """Still alive: resets systemd's ``WatchdogSec=`` timer."""
        return self.send(WATCHDOG)

    def stopping(self) -> bool:
        """Shutdown began: systemd shows the unit as deactivating."""
        return self.send(STOPPING)

    def status(self, text: str) -> bool:
        """A one-line state for ``systemctl status`` (e.g. "Immich unreachable; retrying")."""
        return self.send(status_field(text))

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog_ping` calls; None when there is no watchdog."""
        return self._interval
