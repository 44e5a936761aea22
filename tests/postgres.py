"""A throwaway PostgreSQL server for tests: ``initdb`` into a folder, serve on 127.0.0.1, stop on exit."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

USER = "orch"
DATABASE = "orch"
SETTINGS = {"listen_addresses": "127.0.0.1", "fsync": "off", "full_page_writes": "off"}


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: the highest ``/usr/lib/postgresql/<version>/bin``, else PATH's.

    Raises FileNotFoundError when PostgreSQL's server binaries are nowhere to be found.
    """

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in folder.parent.name.split(".") if part.isdigit())

    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH; "
        "install them (Debian/Ubuntu: apt-get install postgresql) or set ORCH_TEST_POSTGRES_URL"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _server_folder(workdir: Path) -> Iterator[tuple[Path, list[str]]]:
    """The folder for the cluster, and the command prefix that runs PostgreSQL's tools.

    PostgreSQL refuses to run as root, so root runs them as ``postgres`` in a folder of its own made directly
    in the temp folder (removed on exit): pytest keeps its temp folders' parents private to root (0o700), and
    resets them at every session start, so ``workdir`` itself may be out of ``postgres``'s reach.
    """
    if os.geteuid() != 0:
        yield workdir, []
        return
    account = pwd.getpwnam("postgres")
    folder = Path(tempfile.mkdtemp(prefix="orch-pg-"))
    try:
        os.chown(folder, account.pw_uid, account.pw_gid)
        yield folder, ["runuser", "-u", "postgres", "--"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class PostgresServer:
    """A running throwaway cluster: its URL, and :meth:`stop` and :meth:`start` to take it
    down and bring it back on the same port with the same data (a database outage)."""

    url: str
    _pg_ctl: Callable[..., None]

    def stop(self) -> None:
        """Stops the server at once (``pg_ctl stop -m immediate``: connections drop as in a crash)."""
        self._pg_ctl("stop", "-m", "immediate", "-w")

    def start(self) -> None:
        """Starts it again and waits until it accepts connections."""
        self._pg_ctl("start", "-w")


@contextmanager
def running_postgres(workdir: Path) -> Iterator[PostgresServer]:
    """Starts a fresh PostgreSQL cluster and yields it; stops it on exit, also on error.

    Its URL is ``postgresql+psycopg://orch@127.0.0.1:<port>/orch``: database ``orch``, superuser ``orch``,
    trust authentication, listening on 127.0.0.1 only. The cluster (``pgdata``, unix socket, ``postgres.log``)
    lives in ``workdir``; as root, in a private temp folder run by ``postgres``, with the log copied to
    ``workdir``.

    Raises FileNotFoundError when the PostgreSQL binaries are missing, RuntimeError when a step fails.
    """
    bin_dir, port = find_bin_dir(), free_port()
    with _server_folder(workdir) as (folder, runner):
        pgdata, log = folder / "pgdata", folder / "postgres.log"

        def run(tool: str, *args: str, check: bool = True) -> None:
            command = [*runner, str(bin_dir / tool), *args]
            done = subprocess.run(command, cwd=folder, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if check and done.returncode != 0:
                server_log = log.read_text(errors="replace") if log.exists() else ""
                output = f"{done.stdout}{done.stderr}{server_log}"
                raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{output}")

        def pg_ctl(action: str, *args: str) -> None:
            run("pg_ctl", action, *args, "-D", str(pgdata), "-l", str(log))

        run("initdb", "-D", str(pgdata), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        settings = {**SETTINGS, "port": str(port), "unix_socket_directories": str(folder)}
        with (pgdata / "postgresql.conf").open("a") as conf:
            for name, value in settings.items():
                quoted = value.replace("'", "''")
                conf.write(f"{name} = '{quoted}'\n")
        try:
            pg_ctl("start", "-w")
            run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
            yield PostgresServer(f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}", pg_ctl)
        finally:
            run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(pgdata), check=False)
            if folder != workdir and log.exists():
                shutil.copyfile(log, workdir / log.name)
