"""Launch, find, control and stop a local Triton Inference Server (the binary in the nvidia-pytriton wheel).

The launcher prepares what the wheel's server needs on a plain host: the python-backend stub for this
interpreter's Python version next to ``libtriton_python.so``, ``libpython`` and the wheel's bundled
libraries on ``LD_LIBRARY_PATH``, and this interpreter's ``bin`` first on ``PATH`` (the stub then
imports numpy/onnxruntime from this environment). The server binds 127.0.0.1 with explicit model
control, runs in its own session (so stopping it also reaches its stub processes), and records
itself in ``<repo>/.recops-server.json`` so another process can find and stop it.

A start succeeds only when the process it started is ready and itself holds every port it reports (its listening
sockets, read from ``/proc``), so a port taken by another server is an error, never that server's URL. A server
dies with the process that started it (the kernel's parent-death signal; its python-backend stubs notice their
server is gone and exit) unless ``ServerConfig.detach`` is set, as ``recops serve start`` does: that one is a
daemon, stopped with ``recops serve stop``.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recops.errors import RecopsError
from recops.files import remove_stale, write_json_atomic
from recops.processes import die_with_parent
from recops.serving.errors import ServingError
from recops.settings import settings

STATE_FILE = ".recops-server.json"
LOG_FILE = ".recops-server.log"


PROTOCOLS = ("http", "grpc", "metrics")


@dataclass
class ServerConfig:
    """How to run one server; a port of 0 means 'pick a free one'. ``detach`` False: the server is killed when the
    thread that started it ends (Linux parent-death signal; start it from the main thread of a long-lived process);
    True: it runs on as a daemon until stopped."""

    repo: Path = field(default_factory=lambda: settings().model_repository)
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_file: Path | None = None  # default <repo>/.recops-server.log
    startup_timeout_s: float = 60.0
    exit_timeout_s: int = 5
    load_models: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    detach: bool = False


@dataclass(frozen=True)
class ServerState:
    """What ``<repo>/.recops-server.json`` records about a running server."""

    pid: int
    http_url: str
    grpc_url: str
    metrics_url: str
    repo: str
    log_file: str


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the Triton server shipped in the nvidia-pytriton wheel."""

    binary: Path
    backends: Path
    stubs: Path
    lib_dirs: tuple[Path, ...]

    @classmethod
    def find(cls) -> TritonInstall:
        spec = importlib.util.find_spec("pytriton")  # located, not imported: its API needs extra packages
        root = Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None
        if root is None or not (root / "bin" / "tritonserver").is_file():
            raise RecopsError(
                "Triton server not installed: run `pip install --no-deps nvidia-pytriton==0.7.0` (or `make install`)"
            )
        libs = root.parents[1] / "nvidia_pytriton.libs"
        return cls(
            root / "bin" / "tritonserver",
            root / "backends",
            root / "python_backend_stubs",
            (Path(sysconfig.get_config_var("LIBDIR")), libs),
        )

    def prepare(self) -> None:
        """Put the stub for this Python next to libtriton_python.so (idempotent, atomic)."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise RecopsError(
                f"no Triton python-backend stub for Python {version} in {self.stubs}; "
                "use a Python version the nvidia-pytriton wheel supports (3.8-3.13)"
            )
        target = self.backends / "python" / stub.name
        remove_stale(target.parent)  # the copies of launchers killed mid-copy
        if target.is_file() and filecmp.cmp(stub, target, shallow=False):
            return
        tmp = target.with_name(f".{stub.name}.tmp-{os.getpid()}-copy")  # a name remove_stale knows
        try:
            shutil.copyfile(stub, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RecopsError(
                f"cannot install the python-backend stub into {target.parent} ({exc}); "
                "make that directory writable or copy the stub there once by hand"
            ) from exc

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(p) for p in self.lib_dirs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_address(url: str) -> str:
    """'host:port' from 'http://host:port', 'grpc://host:port' or 'host:port' (tritonclient's form)."""
    return url.split("://", 1)[-1].rstrip("/")


def listening_ports(pid: int | None = None) -> set[int]:
    """TCP ports in LISTEN state on this host's network namespace; with ``pid``, only the sockets that process holds."""
    inodes = None
    if pid is not None:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and (inodes is None or fields[9] in inodes):  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _process_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


TRITON_PROGRAMS = ("tritonserver", "triton_python_backend_stub")


def triton_processes(pgid: int | None = None) -> list[int]:
    """Live tritonserver / python-backend stub pids, optionally only those in process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            program = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and Path(program).name in TRITON_PROGRAMS and pgid in (None, int(fields[2])):
            found.append(int(entry.name))
    return found


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_tritonserver(pid: int, repo: str) -> bool:
    """Guard against pid reuse: ``pid`` is a tritonserver serving ``repo``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(cmdline) and cmdline[0].endswith(b"tritonserver") and f"--model-repository={repo}".encode() in cmdline


def _wait(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


class TritonServer:
    """A Triton server: started here (``start``), found from a repo's state file, or attached by URL."""

    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.pid: int | None = None
        self.http_url = ""
        self.grpc_url = ""
        self.metrics_url = ""
        self._proc: subprocess.Popen | None = None

    # ---- finding servers -------------------------------------------------------------------
    @classmethod
    def attach(cls, url: str) -> TritonServer:
        """A handle on a server running elsewhere (HTTP URL); it can be controlled, not stopped."""
        server = cls()
        server.http_url = f"http://{http_address(url)}"
        if not server.is_ready():
            raise ServingError(
                f"no ready Triton server at {server.http_url}: start one with `recops serve start` or fix --url"
            )
        return server

    @classmethod
    def from_state(cls, repo: Path | str | None = None) -> TritonServer:
        """The server recorded in ``<repo>/.recops-server.json`` by the process that started it."""
        repo = Path(repo) if repo is not None else settings().model_repository
        state = read_state(repo)
        if state is None:
            raise RecopsError(f"no server recorded for {repo}: start one with `recops serve start --repo {repo}`")
        server = cls(ServerConfig(repo=Path(state.repo), log_file=Path(state.log_file)))
        server.pid, server.http_url = state.pid, state.http_url
        server.grpc_url, server.metrics_url = state.grpc_url, state.metrics_url
        return server

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def repo(self) -> Path:
        return Path(self.config.repo).resolve()

    @property
    def log_file(self) -> Path:
        return Path(self.config.log_file) if self.config.log_file else self.repo / LOG_FILE

    def command(self, install: TritonInstall, ports: tuple[int, int, int]) -> list[str]:
        host = self.config.host
        cmd = [
            str(install.binary),
            f"--model-repository={self.repo}",
            "--model-control-mode=explicit",
            f"--backend-directory={install.backends}",
            "--backend-config=python,shm-default-byte-size=4194304",
            f"--http-address={host}",
            f"--http-port={ports[0]}",
            f"--grpc-address={host}",
            f"--grpc-port={ports[1]}",
            f"--metrics-address={host}",
            f"--metrics-port={ports[2]}",
            f"--exit-timeout-secs={self.config.exit_timeout_s}",
            # One failed version load must not mark the whole server unready (production keeps serving).
            "--strict-readiness=false",
        ]
        cmd += [f"--load-model={name}" for name in self.config.load_models]
        return cmd + list(self.config.extra_args)

    def start(self) -> TritonServer:
        """Start the server and wait until /v2/health/ready answers; raise with the log tail if it doesn't."""
        if self.pid is not None:
            raise RecopsError(f"server already started (pid {self.pid})")
        self.repo.mkdir(parents=True, exist_ok=True)
        running = read_state(self.repo)
        if running is not None:
            raise RecopsError(
                f"a server for {self.repo} already runs (pid {running.pid}, {running.http_url}); "
                f"stop it with `recops serve stop --repo {self.repo}`"
            )
        install = TritonInstall.find()
        install.prepare()
        cfg, host = self.config, self.config.host
        ports = tuple(p or free_port(host) for p in (cfg.http_port, cfg.grpc_port, cfg.metrics_port))
        self._check_free(ports)
        self.http_url, self.grpc_url = f"http://{host}:{ports[0]}", f"grpc://{host}:{ports[1]}"
        self.metrics_url = f"http://{host}:{ports[2]}/metrics"
        with open(self.log_file, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(install, ports),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=install.env(),
                start_new_session=True,
                preexec_fn=None if cfg.detach else functools.partial(die_with_parent, os.getpid()),
            )
        self.pid = self._proc.pid
        self._wait_ready(ports)
        write_json_atomic(self.repo / STATE_FILE, asdict(self.state()))
        return self

    @staticmethod
    def _check_free(ports: tuple[int, ...]) -> None:
        """RecopsError naming the first of ``ports`` (http, grpc, metrics) some process listens on."""
        taken = listening_ports()
        for protocol, port in zip(PROTOCOLS, ports):
            if port in taken:
                raise RecopsError(
                    f"port {port} ({protocol}) is already in use by another process; pass a free --{protocol}-port "
                    "or 0 (the default: a free one)"
                )

    def _wait_ready(self, ports: tuple[int, ...]) -> None:
        """Until the started process answers ready and holds every port itself; stop it and raise otherwise."""

        def exited() -> bool:
            return self._proc.poll() is not None

        def serving() -> bool:
            return set(ports) <= listening_ports(self.pid) and self.is_ready()

        if _wait(lambda: exited() or serving(), self.config.startup_timeout_s, 0.1) and not exited():
            return
        reason = (
            f"exited with code {self._proc.returncode}"
            if exited()
            else f"not ready on its own ports {list(ports)} after {self.config.startup_timeout_s:.0f} s"
        )
        self.stop()
        try:
            self._check_free(ports)
        except RecopsError as taken:
            reason = f"{reason}: {taken}"
        raise RecopsError(f"Triton server for {self.repo} {reason}; log {self.log_file} ends with:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server, wait for it, then SIGKILL whatever is left of its process group."""
        if self.pid is None:
            raise RecopsError(f"{self.http_url} was attached, not started by recops: stop it where it runs")
        pid = self.pid
        if self._proc is not None or _is_tritonserver(pid, str(self.repo)):
            self._terminate(pid)
        for member in triton_processes(pid):
            _kill(member, signal.SIGKILL)
        _wait(lambda: not triton_processes(pid), 5.0)
        state = read_state(self.repo, check_alive=False)
        if state is not None and state.pid == pid:
            (self.repo / STATE_FILE).unlink(missing_ok=True)
        self.pid, self._proc = None, None

    def _terminate(self, pid: int) -> None:
        grace = self.config.exit_timeout_s + 10
        if _process_alive(pid):
            _kill(pid, signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill(pid, signal.SIGKILL)
                self._proc.wait()
        elif not _wait(lambda: not _process_alive(pid), grace):
            _kill(pid, signal.SIGKILL)
        # stubs notice their parent is gone on their own; give them a moment before the SIGKILL sweep
        _wait(lambda: not triton_processes(pid), 2.0)

    def __enter__(self) -> TritonServer:
        return self.start() if self.pid is None else self

    def __exit__(self, *exc) -> None:
        if self.pid is not None:
            self.stop()

    # ---- inspection and model control -------------------------------------------------------
    def state(self) -> ServerState:
        return ServerState(
            self.pid or 0, self.http_url, self.grpc_url, self.metrics_url, str(self.repo), str(self.log_file)
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _client(self):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(http_address(self.http_url))

    def _control(self, what: str, call):
        from tritonclient.utils import InferenceServerException

        try:
            return call(self._client())
        except (InferenceServerException, OSError) as exc:
            raise ServingError(f"{what} on {self.http_url} failed: {exc}") from exc

    def load(self, name: str, config_json: str | None = None) -> None:
        """Load (or reload, picking up new versions) model ``name``; optional config override as JSON."""
        self._control(f"load {name!r}", lambda c: c.load_model(name, config=config_json))

    def unload(self, name: str) -> None:
        self._control(f"unload {name!r}", lambda c: c.unload_model(name))

    def model_ready(self, name: str, version: str | int = "") -> bool:
        return self._control(f"readiness of {name!r}", lambda c: c.is_model_ready(name, str(version)))

    def models(self) -> list[dict]:
        """The repository index: name, version and state of every model Triton knows of."""
        return self._control("repository index", lambda c: c.get_model_repository_index())

    def status(self) -> dict:
        ready = self.is_ready()
        return {**asdict(self.state()), "ready": ready, "models": self.models() if ready else []}


def read_state(repo: Path, check_alive: bool = True) -> ServerState | None:
    """The state file's server, or None if there is none (or, with ``check_alive``, it no longer runs)."""
    path = Path(repo).resolve() / STATE_FILE
    try:
        state = ServerState(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise RecopsError(f"{path} is corrupt ({exc}); delete it after checking no server runs") from exc
    if check_alive and not _is_tritonserver(state.pid, state.repo):
        return None
    return state
