"""Loaded by every Python process the tests start (tests/conftest.py puts this folder first on
PYTHONPATH) and by the test process itself: a connection to anything but loopback raises
before a packet leaves, so that no test can reach AWS, a model hub or any other host."""

from __future__ import annotations

import ipaddress
import socket

_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


class OutsideConnectionError(ConnectionRefusedError):
    """A test tried to reach a host outside 127.0.0.0/8 and ::1."""


def is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like stay on this machine
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: resolving it would already go out
        return False


def _check(sock: socket.socket, address) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address):
        raise OutsideConnectionError(
            f"tests talk only to 127.0.0.1: a connection to {address!r} was refused by the "
            "test network guard (tests/netguard)"
        )


def _connect(self, address):
    _check(self, address)
    return _original_connect(self, address)


def _connect_ex(self, address):
    _check(self, address)
    return _original_connect_ex(self, address)


socket.socket.connect = _connect
socket.socket.connect_ex = _connect_ex
