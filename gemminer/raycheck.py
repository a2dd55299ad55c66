"""`compare --ray ADDRESS`, checked before Ray is started: a wrong scheme or a head that does not
answer is one line after a bounded wait, not Ray's own retry loop or traceback."""

from __future__ import annotations

import socket

from gemminer.errors import GemminerError

CONNECT_TIMEOUT = 5.0  # seconds a head may take to accept a connection
DEFAULT_PORT = 6379  # a Ray head's GCS port
CLIENT_PORT = 10001  # Ray Client's (ray://)


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse an address Ray cannot use, or a head that does not accept a TCP connection within `timeout`.
    "" and "local" start a local instance and "auto" finds the one on this machine: nothing to check."""
    if address in ("", "local", "auto"):
        return
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        raise GemminerError(f"--ray {address}: unknown scheme {scheme}://; give HOST:PORT of a Ray head, "
                            "ray://HOST:PORT for Ray Client, or no address for a local Ray instance")
    host, colon, port_text = rest.rpartition(":")
    if not colon:
        host, port_text = rest, str(CLIENT_PORT if scheme else DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise GemminerError(f"--ray {address}: not an address; give HOST:PORT (port 1 to 65535), e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err) or type(err).__name__)
        raise GemminerError(f"cannot reach a Ray head at {host}:{port_text} ({reason}, waited up to {timeout:g} s); "
                            "start it with `ray start --head`, or leave out the address for a local Ray "
                            "instance") from None
