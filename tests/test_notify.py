"""sd_notify against a real AF_UNIX datagram socket, the way systemd listens for it."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.notify import (
    MAX_DATAGRAM_BYTES,
    NOTIFY_SOCKET_ENV,
    WATCHDOG_PID_ENV,
    WATCHDOG_USEC_ENV,
    Notifier,
    notify,
    ready_message,
    socket_address,
    status_field,
    watchdog_interval,
)

RECEIVE_TIMEOUT_S = 2.0
# struct ucred: pid, uid, gid (three C ints), attached by the kernel with SO_PASSCRED.
UCRED = struct.Struct("3i")
TWO_MINUTES_USEC = 120_000_000


class Listener:
    """A bound SOCK_DGRAM socket standing in for systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(RECEIVE_TIMEOUT_S)

    def receive(self) -> bytes:
        """The next datagram, exactly as sent."""
        return self.receive_with_pid()[0]

    def receive_with_pid(self) -> tuple[bytes, int]:
        """The next datagram and the sender's pid (what systemd checks for NotifyAccess=)."""
        data, ancillary, _flags, _addr = self.sock.recvmsg(
            MAX_DATAGRAM_BYTES + 1, socket.CMSG_SPACE(UCRED.size)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = UCRED.unpack(payload[: UCRED.size])
                return data, pid
        raise AssertionError("no SCM_CREDENTIALS on the datagram")

    def empty(self) -> bool:
        """Whether nothing (more) was sent."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(MAX_DATAGRAM_BYTES + 1)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(RECEIVE_TIMEOUT_S)
        return False


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[Listener, dict[str, str]]]:
    """A listener bound to a file in tmp_path, and the environment systemd would set."""
    path = tmp_path / "notify"
    listener = Listener(str(path))
    yield listener, {NOTIFY_SOCKET_ENV: str(path)}
    listener.sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[Listener, dict[str, str]]]:
    """A listener in the abstract namespace, as NOTIFY_SOCKET=@name names it."""
    name = f"darkroom-test-{uuid.uuid4().hex}"
    listener = Listener("\0" + name)
    yield listener, {NOTIFY_SOCKET_ENV: "@" + name}
    listener.sock.close()


def test_notify_sends_the_exact_datagram_to_a_path_socket(
    path_socket: tuple[Listener, dict[str, str]],
) -> None:
    listener, environ = path_socket
    assert notify("READY=1\nSTATUS=hello", environ) is True
    assert listener.receive() == b"READY=1\nSTATUS=hello"
    assert listener.empty()


def test_notify_reaches_an_abstract_socket(
    abstract_socket: tuple[Listener, dict[str, str]],
) -> None:
    listener, environ = abstract_socket
    assert notify("WATCHDOG=1", environ) is True
    assert listener.receive() == b"WATCHDOG=1"


def test_the_datagram_comes_from_our_own_pid(
    path_socket: tuple[Listener, dict[str, str]],
) -> None:
    """NotifyAccess=main: systemd accepts only messages whose sender is the main pid."""
    listener, environ = path_socket
    assert Notifier(environ).watchdog_ping()
    data, pid = listener.receive_with_pid()
    assert (data, pid) == (b"WATCHDOG=1", os.getpid())


def test_notifier_messages_are_exactly_what_systemd_expects(
    path_socket: tuple[Listener, dict[str, str]],
) -> None:
    listener, environ = path_socket
    notifier = Notifier(environ)
    assert notifier.enabled
    assert notifier.ready("watching http://photos.lan:2283/")
    assert notifier.ready()
    assert notifier.status("Immich unreachable;\nretrying in 10s")
    assert notifier.watchdog_ping()
    assert notifier.stopping()
    assert notifier.send("RELOADING=1")
    received = [listener.receive() for _ in range(6)]
    assert received == [
        b"READY=1\nSTATUS=watching http://photos.lan:2283/",
        b"READY=1",
        b"STATUS=Immich unreachable; retrying in 10s",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"RELOADING=1",
    ]
    assert listener.empty()


def test_status_is_utf8_and_never_longer_than_systemd_accepts(
    path_socket: tuple[Listener, dict[str, str]],
) -> None:
    listener, environ = path_socket
    notifier = Notifier(environ)
    assert notifier.status("darkroom · check rotation")
    assert listener.receive() == "STATUS=darkroom · check rotation".encode()
    assert notifier.ready("é" * MAX_DATAGRAM_BYTES)
    data = listener.receive()
    assert len(data) <= MAX_DATAGRAM_BYTES
    assert data.decode().startswith("READY=1\nSTATUS=éé")
    assert data.decode().endswith("…")


def test_an_oversized_message_is_refused_not_truncated(
    path_socket: tuple[Listener, dict[str, str]],
) -> None:
    listener, environ = path_socket
    assert notify("STATUS=" + "x" * MAX_DATAGRAM_BYTES, environ) is False
    assert notify("", environ) is False
    assert listener.empty()


@pytest.mark.parametrize("environ", [{}, {NOTIFY_SOCKET_ENV: ""}])
def test_without_systemd_everything_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert notify("READY=1", environ) is False
    assert notifier.ready("x") is False
    assert notifier.watchdog_ping() is False
    assert notifier.stopping() is False
    assert notifier.status("x") is False
    assert notifier.watchdog_interval() is None


@pytest.mark.parametrize("value", ["notify.sock", "@", "vsock:2:1234"])
def test_an_unusable_socket_address_is_not_used(value: str) -> None:
    assert socket_address(value) is None
    assert notify("READY=1", {NOTIFY_SOCKET_ENV: value}) is False


def test_a_socket_nobody_listens_on_returns_false_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"
    assert notify("WATCHDOG=1", {NOTIFY_SOCKET_ENV: str(missing)}) is False
    assert "could not notify systemd" in caplog.text


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify/1") == (
        "\0/org/freedesktop/systemd1/notify/1"
    )


def test_notifier_keeps_the_environment_it_was_built_with(
    path_socket: tuple[Listener, dict[str, str]],
) -> None:
    listener, environ = path_socket
    notifier = Notifier(environ)
    environ.clear()
    assert notifier.stopping()
    assert listener.receive() == b"STOPPING=1"


def test_message_builders() -> None:
    assert ready_message() == "READY=1"
    assert ready_message("up") == "READY=1\nSTATUS=up"
    assert status_field("a\r\nb\nc") == "STATUS=a b c"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({WATCHDOG_USEC_ENV: str(TWO_MINUTES_USEC)}, 60.0),
        ({WATCHDOG_USEC_ENV: str(TWO_MINUTES_USEC), WATCHDOG_PID_ENV: str(os.getpid())}, 60.0),
        ({WATCHDOG_USEC_ENV: "1000000", WATCHDOG_PID_ENV: ""}, 0.5),
        ({WATCHDOG_USEC_ENV: str(TWO_MINUTES_USEC), WATCHDOG_PID_ENV: str(os.getpid() + 1)}, None),
        ({WATCHDOG_USEC_ENV: str(TWO_MINUTES_USEC), WATCHDOG_PID_ENV: "main"}, None),
        ({WATCHDOG_PID_ENV: str(os.getpid())}, None),
        ({}, None),
        ({WATCHDOG_USEC_ENV: "0"}, None),
        ({WATCHDOG_USEC_ENV: "-5"}, None),
        ({WATCHDOG_USEC_ENV: "2min"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_when_it_is_ours(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ) == expected
    assert Notifier(environ).watchdog_interval() == expected
