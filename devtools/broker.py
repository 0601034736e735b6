"""A real Apache Kafka broker (KRaft, one broker+controller) run from the Maven Central jars on 127.0.0.1.

Jars are resolved by Maven into ~/.m2 from devtools/kafka/pom.xml; the broker's data, config, pid and log
live in the run folder (`.run/kafka` by default), which is git-ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from core.paths import run_dir

KAFKA_DIR = Path(__file__).parent / "kafka"


@dataclasses.dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = dataclasses.field(default_factory=lambda: int(os.environ.get("LSVCR_KAFKA_PORT", 19092)))
    controller_port: int = dataclasses.field(default_factory=lambda: int(os.environ.get("LSVCR_KAFKA_CONTROLLER_PORT", 19093)))
    heap: str = "512m"
    start_timeout_s: float = 90.0

    def __post_init__(self):
        if self.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("LSVCR_ALLOW_PUBLIC_BIND"):
            raise ValueError(f"refusing to bind Kafka to {self.host}: loopback only (set LSVCR_ALLOW_PUBLIC_BIND=1)")

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def home(self) -> Path:
        return run_dir() / "kafka"


def bootstrap_servers() -> str:
    """The broker jobs talk to: LSVCR_KAFKA_BOOTSTRAP, else the local broker of this project."""
    return os.environ.get("LSVCR_KAFKA_BOOTSTRAP") or BrokerConfig().bootstrap


def _classpath(cfg: BrokerConfig) -> str:
    """Resolve the broker jars with Maven (cached in ~/.m2) and return the class path."""
    pom = KAFKA_DIR / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    out = cfg.home / f"classpath-{digest}.txt"
    if not out.exists():
        cfg.home.mkdir(parents=True, exist_ok=True)
        print(f"[kafka] resolving broker jars from Maven Central ({pom}) ...", flush=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            ["mvn", "-q", "-B", "-f", str(pom), "dependency:build-classpath", f"-Dmdep.outputFile={tmp}"],
            check=True,
        )
        tmp.rename(out)
    return out.read_text().strip()


def _write_properties(cfg: BrokerConfig) -> Path:
    data = cfg.home / "data"
    props = cfg.home / "server.properties"
    props.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{cfg.host}:{cfg.controller_port}",
                f"listeners=PLAINTEXT://{cfg.host}:{cfg.port},CONTROLLER://{cfg.host}:{cfg.controller_port}",
                f"advertised.listeners=PLAINTEXT://{cfg.host}:{cfg.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={data}",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "message.max.bytes=1048576",
                "",
            ]
        )
    )
    return props


def _java(cfg: BrokerConfig, classpath: str, *args: str) -> list[str]:
    return [
        "java",
        f"-Xmx{cfg.heap}",
        f"-Xms{cfg.heap}",
        f"-Dkafka.logs.dir={cfg.home / 'logs'}",
        f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
        "-cp",
        classpath,
        *args,
    ]


def _pid(cfg: BrokerConfig) -> int | None:
    pid_file = cfg.home / "broker.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    return pid


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def is_ready(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when the broker answers a metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, ValueError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def start(cfg: BrokerConfig | None = None) -> str:
    """Start the broker unless it is running; wait until it is ready. Returns the bootstrap address."""
    cfg = cfg or BrokerConfig()
    if _pid(cfg) and is_ready(cfg.bootstrap):
        print(f"[kafka] already running at {cfg.bootstrap} (pid {_pid(cfg)})", flush=True)
        return cfg.bootstrap
    if _port_open(cfg.host, cfg.port):
        raise RuntimeError(f"port {cfg.port} is taken by another process; set LSVCR_KAFKA_PORT to a free port")
    classpath = _classpath(cfg)
    (cfg.home / "logs").mkdir(parents=True, exist_ok=True)
    props = _write_properties(cfg)
    if not (cfg.home / "data" / "meta.properties").exists():
        cluster_id = str(uuid.uuid4())
        # KRaft wants a base64 uuid; StorageTool makes one, but a fixed derivation avoids a second JVM start.
        import base64

        cluster_id = base64.urlsafe_b64encode(uuid.UUID(cluster_id).bytes).decode().rstrip("=")
        print(f"[kafka] formatting KRaft storage in {cfg.home / 'data'}", flush=True)
        subprocess.run(
            _java(cfg, classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    out = open(cfg.home / "logs" / "stdout.log", "ab")
    proc = subprocess.Popen(
        _java(cfg, classpath, "kafka.Kafka", str(props)),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # survives the command that started it; `stop` ends it
    )
    (cfg.home / "broker.pid").write_text(str(proc.pid))
    print(f"[kafka] started pid {proc.pid}, waiting for {cfg.bootstrap} ...", flush=True)
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}; see {cfg.home / 'logs'}")
        if _port_open(cfg.host, cfg.port) and is_ready(cfg.bootstrap, timeout_s=2):
            print(f"[kafka] ready at {cfg.bootstrap}", flush=True)
            return cfg.bootstrap
        time.sleep(0.5)
    stop(cfg)
    raise TimeoutError(f"broker not ready after {cfg.start_timeout_s}s; see {cfg.home / 'logs'}")


def stop(cfg: BrokerConfig | None = None, timeout_s: float = 30.0) -> bool:
    """Stop the broker cleanly (SIGTERM, then SIGKILL after timeout_s). Returns False if none was running."""
    cfg = cfg or BrokerConfig()
    pid = _pid(cfg)
    if pid is None:
        print("[kafka] not running", flush=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
    (cfg.home / "broker.pid").unlink(missing_ok=True)
    print(f"[kafka] stopped pid {pid}", flush=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(cfg: BrokerConfig | None = None) -> dict:
    cfg = cfg or BrokerConfig()
    pid = _pid(cfg)
    return {"bootstrap": cfg.bootstrap, "pid": pid, "ready": bool(pid) and is_ready(cfg.bootstrap), "home": str(cfg.home)}
