"""A private Ray cluster on this machine for tests and benchmarks: a head and worker nodes, loopback only.

`in_loopback_namespace(cmd)` runs a command in a new network namespace whose only interface is `lo`, and a new
PID namespace (`unshare -n -p -f --mount-proc`, root or user namespaces needed): every Ray process started
inside binds to 127.0.0.1 of a network nobody else sees, sends nothing off the machine, and dies with the
command (the kernel ends a PID namespace with its first process). Where `unshare` is not allowed, the command
runs as it is; `LoopbackCluster` still binds every node to 127.0.0.1 (--node-ip-address, the dashboard on
127.0.0.1) on free ports, and tears down by process id: each node's process group, then any process whose
command line names the cluster's own temp folder. Never `ray stop` (it would stop other people's clusters).

Every process of the cluster gets RAY_USAGE_STATS_ENABLED=0 and token authentication with a fresh token
in $RAY_AUTH_TOKEN (nothing is written to ~/.ray), and fast health checks so a killed node is noticed in
about a second.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def unshare_works() -> bool:
    """True when this process may create network and PID namespaces (root in a container usually may)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        r = subprocess.run(
            ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", "ip link set lo up && echo ok"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() == "ok"


def in_loopback_namespace(cmd: list[str]) -> tuple[list[str], bool]:
    """(the command wrapped in a loopback-only network + PID namespace where allowed, whether it is)."""
    if not unshare_works():
        return cmd, False
    inner = " ".join(_sh_quote(c) for c in cmd)
    return ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", f"ip link set lo up && exec {inner}"], True


def _sh_quote(s: str) -> str:
    import shlex

    return shlex.quote(str(s))


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a node started with start_new_session: its pid is the sid)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid() and _session_of(int(d.name)) == sid:
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(token: str | None = None) -> dict[str, str]:
    """The environment of every process of the cluster (and of the drivers that connect to it)."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token or secrets.token_hex(32),
            "RAY_health_check_period_ms": "300",
            "RAY_health_check_timeout_ms": "300",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "0",
            "RAY_DEDUP_LOGS": "0",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.pop("RAY_ADDRESS", None)
    return env


class LoopbackCluster:
    """A head (no GPU, the dashboard for the Jobs API) and `n_workers` worker nodes with `gpus` logical GPUs and
    `cpus` CPUs each, all on 127.0.0.1. Use as a context manager; `kill_node(i)` kills worker node i (SIGKILL
    to its process group: raylet, object store and its workers), as a machine failure would."""

    def __init__(self, n_workers: int = 2, cpus: int = 1, gpus: int = 1, head_cpus: int = 1):
        self.n_workers, self.cpus, self.gpus, self.head_cpus = n_workers, cpus, gpus, head_cpus
        self.tmp = Path(tempfile.mkdtemp(prefix="iarmem-ray-"))
        self.env = cluster_env(os.environ.get("RAY_AUTH_TOKEN"))
        # this process is a driver of the cluster too: Ray reads its settings from the environment
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("RAY_")})
        self.port, self.dash_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.procs: list[subprocess.Popen] = []
        self._connected = False

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            ["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: the node's processes are killed together
        )
        self.procs.append(p)
        return p

    def start(self, timeout: float = 120.0) -> LoopbackCluster:
        self._start(
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={self.head_cpus}",
                "--num-gpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.tmp / 'ray'}",
                "--object-store-memory=100000000",
            ],
            "head",
        )
        self._wait_nodes(1, timeout)
        for i in range(self.n_workers):
            self._start(
                [
                    f"--address={self.address}",
                    f"--num-cpus={self.cpus}",
                    f"--num-gpus={self.gpus}",
                    "--object-store-memory=100000000",
                    f'--resources={{"iarmem_node{i}": 1}}',
                ],
                f"worker{i}",
            )
            self._wait_nodes(2 + i, timeout)  # one at a time: nodes that start together can time out
        return self

    def _wait_nodes(self, k: int, timeout: float) -> None:
        """Wait for k live nodes; connects this process to the cluster (ray.init) once the head listens."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({p.returncode}); logs in {self.tmp}: {self.logs()}")
            if not self._connected:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                except OSError:
                    time.sleep(0.5)
                    continue
                import ray

                ray.init(address=self.address, log_to_driver=True, configure_logging=False)
                self._connected = True
            import ray

            if sum(1 for n in ray.nodes() if n["Alive"]) >= k:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {k} nodes in {timeout:.0f} s; {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.tmp.glob("*.log")))

    def kill_node(self, i: int) -> None:
        """SIGKILL worker node i: every process of its session (its raylet and the workers it started)."""
        _kill_session(self.procs[1 + i].pid)
        self.procs[1 + i].wait(timeout=30)

    def stop(self) -> None:
        """Tear down by process id: every node's session (`ray start` and all it started; Ray gives its workers
        their own process groups, not sessions), then stragglers naming our temp folder."""
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            _kill_session(p.pid)
            p.wait(timeout=30)
        mark = str(self.tmp).encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if mark in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def run_in_namespace(script: Path, out: Path, args: list[str] | None = None, timeout: float = 600) -> dict:
    """Run `script OUT [args]` (a scenario runner) in a loopback-only namespace; returns the JSON it wrote to
    OUT, with "namespace": whether it ran in one. Raises with the script's output tail if it failed."""
    cmd, ns = in_loopback_namespace([sys.executable, "-u", str(script), str(out), *(args or [])])
    r = subprocess.run(cmd, env=cluster_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"{script.name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    report = json.loads(out.read_text())
    report["namespace"] = ns
    return report
