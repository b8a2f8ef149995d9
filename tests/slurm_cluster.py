"""A real SLURM cluster on this machine for the tests, as the session fixture ``slurm_cluster``.

tests/slurm/start_local_slurm.sh brings up munged, MariaDB + slurmdbd (accounting: submitit
reads job states with sacct), slurmctld and two slurmd nodes, n1 and n2, on loopback; it needs
root on Debian 12 and apt-installs the missing packages. Besides the default partition
"debug" it has two over the same nodes for a real preemption: a job in "high" preempts one in
"low" (PreemptMode=REQUEUE, GraceTime=GRACE_S). A cluster that runs an older slurm.conf is
restarted by the script; if it still lacks these, the fixture fails and says what is missing.
The fixture starts only what is not already running, and at the end of the session it cancels
the jobs submitted during the session and stops, by PID, exactly the daemons it started: a
cluster that was up before stays up.

It never skips: without root, or when the cluster does not come up, every test that uses it
fails with the reason, the script's output and the tail of the daemons' logs. Deselect those
tests with ``-m "not slurm"``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster_pipeline.testing.limits import limit

SCRIPTS = Path(__file__).resolve().parent / "slurm"
START_SCRIPT = SCRIPTS / "start_local_slurm.sh"
STOP_SCRIPT = SCRIPTS / "stop_local_slurm.sh"
LOG_DIR = Path("/var/log/slurm")
PARTITION = "debug"
# Preemption (slurm.conf of the start script): a job in PREEMPTING takes the nodes of a job in
# PREEMPTIBLE, which gets SIGTERM, GRACE_S seconds, then SIGKILL and a requeue.
PREEMPTIBLE, PREEMPTING, GRACE_S = "low", "high", 20
PREEMPT_TYPE = "preempt/partition_prio"
NODES = ("n1", "n2")
START_TIMEOUT_S = 300  # a cold start on a bare machine includes apt-get install
STOP_TIMEOUT_S = 180
# Sessions of this fixture on one machine (pytest runs at once) hold LOCK_SH on USERS_LOCK for
# their lifetime and start and stop the cluster one at a time under START_LOCK. A session
# cancels its jobs and stops its daemons only if it can then take LOCK_EX on USERS_LOCK (no
# other session left); if it cannot, it records its daemons in HANDOVER for the last one.
_LOCKS = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
START_LOCK = _LOCKS / "cluster-pipeline-slurm.start.lock"
USERS_LOCK = _LOCKS / "cluster-pipeline-slurm.users.lock"
HANDOVER = _LOCKS / "cluster-pipeline-slurm.handover.json"

# daemon -> (pidfile, prefix of /proc/<pid>/comm), in the order the stop script stops them
DAEMONS: dict[str, tuple[Path, str]] = {
    **{f"slurmd-{n}": (Path(f"/run/slurmd-{n}.pid"), "slurmd") for n in NODES},
    "slurmctld": (Path("/run/slurmctld.pid"), "slurmctld"),
    "slurmdbd": (Path("/run/slurmdbd.pid"), "slurmdbd"),
    "mariadbd": (Path("/run/mysqld/mysqld.pid"), "mariadbd"),
    "munged": (Path("/run/munge/munged.pid"), "munged"),
}
# sacct states after which a job will not run again
TERMINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL"}
    | {"OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}
)


def daemon_pid(name: str) -> int | None:
    """PID of the live daemon `name` (a key of DAEMONS) by its pidfile, else None.

    None also when the PID now belongs to another program, or to a zombie.
    """
    pidfile, comm = DAEMONS[name]
    try:
        pid = int("".join(ch for ch in pidfile.read_text() if ch.isdigit()))
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces, state follows the ")"
        stat = Path(f"/proc/{pid}/stat").read_text()
        name_ok = Path(f"/proc/{pid}/comm").read_text().strip().startswith(comm)
    except (OSError, ValueError):
        return None
    zombie = stat.rpartition(")")[2].split()[:1] == ["Z"]
    return pid if name_ok and not zombie else None


def alive_daemons() -> dict[str, int]:
    """The daemons of the local cluster that are alive now: name -> PID."""
    return {name: pid for name in DAEMONS if (pid := daemon_pid(name)) is not None}


def slurm_env() -> dict[str, str]:
    """This process's environment less SLURM_*: run inside a job, srun would join that job."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _script_env() -> dict[str, str]:
    """A plain environment for the start script, which the daemons it starts inherit."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "SLURM_LOCAL_NODES": str(len(NODES)),
        "SLURM_LOCAL_ACCOUNTING": "1",
        "SLURM_LOCAL_PARTITION": PARTITION,
        "SLURM_LOCAL_PREEMPTIBLE": PREEMPTIBLE,
        "SLURM_LOCAL_PREEMPTING": PREEMPTING,
        "SLURM_LOCAL_GRACE_S": str(GRACE_S),
        "SLURM_LOCAL_WAIT": "120",
    }
    env.update({k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")})  # for apt
    return env


def last_lines(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def tail(path: Path, lines: int) -> str:
    try:
        return last_lines(path.read_text(errors="replace"), lines)
    except OSError as e:
        return f"({e})"


def log_tails(names: Sequence[str] | None = None, lines: int = 30) -> str:
    """The last `lines` lines of each log in LOG_DIR (of `names`, e.g. "slurmctld", if given)."""
    paths = (
        sorted(LOG_DIR.glob("*.log"))
        if names is None
        else [LOG_DIR / f"{name}.log" for name in names]
    )
    if not paths:
        return f"(no logs in {LOG_DIR})"
    return "\n".join(f"----- {p} (last {lines} lines)\n{tail(p, lines)}" for p in paths)


def _run_script(
    args: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int | None, str]:
    """Run a script in its own session with its output in a file (the daemons it starts may keep
    a pipe open forever). Returns (exit status or None on timeout, output). On timeout, or on
    KeyboardInterrupt, the script's process group is killed; daemons it started are not."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            ["bash", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        rc: int | None = None
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.returncode is None:  # timed out, or KeyboardInterrupt on its way up
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        return rc, out.read()


@dataclass
class SlurmCluster:
    """The running local cluster, as the fixture yields it."""

    workdir: Path  # default cwd of run(): sbatch's slurm-<id>.out files land here
    preexisting: dict[str, int]  # daemons alive before the fixture: name -> PID; left running
    started: list[str]  # daemons the fixture started; stopped at the end of the session
    restarted: list[str]  # preexisting daemons the script restarted (slurm.conf had changed)
    start_seconds: float  # wall time of start_local_slurm.sh
    start_output: str
    partition: str = PARTITION
    nodes: list[str] = field(default_factory=lambda: list(NODES))
    log_dir: Path = LOG_DIR
    jobs_before: frozenset[str] = frozenset()  # base job ids queued before the session

    # ------------------------------------------------------------------ commands
    def env(self) -> dict[str, str]:
        """Environment for Slurm commands a test runs itself (no inherited SLURM_* variables)."""
        return slurm_env()

    def run(
        self,
        *cmd: str,
        timeout: float = 60,
        check: bool = True,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (srun, sbatch, sacct...) with text output captured. With `check`, a
        non-zero status or a timeout fails the test with the output and the recent logs.
        `timeout` is an idle machine's limit, stretched by the load."""
        timeout = limit(timeout)
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env(),
                cwd=cwd or self.workdir,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"{' '.join(cmd)} still running after {timeout} s\n"
                f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}\n{self.diagnostics()}"
            )
        if check and res.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited {res.returncode}\nstdout: {res.stdout}\n"
                f"stderr: {res.stderr}\n{self.diagnostics()}"
            )
        return res

    # ------------------------------------------------------------------ jobs
    def sacct_state(self, job_id: int | str) -> str | None:
        """The job's state in the accounting database ("COMPLETED", "FAILED", "RUNNING"...; the
        "by <uid>" of "CANCELLED by 0" dropped), or None while slurmdbd has no record of it."""
        res = self.run("sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State", check=False)
        states = res.stdout.split("\n")[0].split() if res.returncode == 0 else []
        return states[0] if states else None

    def wait_job(self, job_id: int | str, timeout: float = 60) -> str:
        """Wait until sacct reports a terminal state for the job, and return that state.
        `timeout` is an idle machine's limit, stretched by the load (`limits.limit`)."""
        timeout = limit(timeout)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.sacct_state(job_id)
            if state in TERMINAL_STATES:
                return state
            time.sleep(0.5)
        pytest.fail(f"job {job_id}: sacct state {state} after {timeout} s\n{self.diagnostics()}")

    def queued_jobs(self) -> dict[str, str]:
        """Jobs in squeue now: base job id (array jobs count once) -> state."""
        res = self.run("squeue", "-h", "-o", "%F %T", check=False)
        return dict(line.split(maxsplit=1) for line in res.stdout.splitlines() if line.strip())

    def session_jobs(self) -> list[str]:
        """Queued jobs that were submitted during the session (not queued at its start)."""
        return sorted(set(self.queued_jobs()) - self.jobs_before, key=lambda j: (len(j), j))

    def cancel_session_jobs(self, timeout: float = 30) -> list[str]:
        """scancel the session's queued jobs and wait for them to leave the queue."""
        jobs = self.session_jobs()
        if not jobs:
            return []
        self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + timeout
        while (left := set(jobs) & set(self.queued_jobs())) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            warnings.warn(f"still queued {timeout} s after scancel: {sorted(left)}", stacklevel=2)
        return jobs

    # ------------------------------------------------------------------ nodes
    def node_states(self) -> dict[str, str]:
        """Node -> long state as sinfo prints it ("idle", "allocated", "down*"...)."""
        res = self.run("sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %T", check=False)
        return dict(line.split(maxsplit=1) for line in res.stdout.splitlines() if line.strip())

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (jobs done, "completing" over); fail the test if not."""
        timeout = limit(timeout)
        deadline = time.monotonic() + timeout
        while (states := self.node_states()) != dict.fromkeys(self.nodes, "idle"):
            if time.monotonic() > deadline:
                pytest.fail(f"nodes not idle after {timeout} s: {states}\n{self.diagnostics()}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ failure messages
    def recent_logs(self, lines: int = 30, daemons: Sequence[str] | None = None) -> str:
        """Tails of the slurmctld and slurmd logs (or of `daemons`' logs) for a failure message."""
        return log_tails(daemons or ["slurmctld", *(f"slurmd-{n}" for n in self.nodes)], lines)

    def diagnostics(self, lines: int = 30) -> str:
        """sinfo, squeue and the recent logs, for a failure message."""
        parts = []
        for cmd in (["sinfo", "-N", "-l"], ["squeue", "-l"]):
            try:
                res = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=10, env=slurm_env(), check=False
                )
                parts.append(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
            except (OSError, subprocess.TimeoutExpired) as e:
                parts.append(f"$ {' '.join(cmd)}\n({e})")
        return "\n".join([*parts, self.recent_logs(lines)])


def _stop(daemons: Sequence[str]) -> str:
    """Stop these daemons by PID with the stop script; returns what went wrong, or ""."""
    if not daemons:
        return ""
    rc, out = _run_script([str(STOP_SCRIPT), *daemons], limit(STOP_TIMEOUT_S))
    still = sorted(set(daemons) & set(alive_daemons()))
    if rc == 0 and not still:
        return ""
    return f"{STOP_SCRIPT.name} {' '.join(daemons)}: exit {rc}, still alive {still}\n{out}"


def _start(workdir: Path) -> SlurmCluster:
    """Start what is not running; on failure stop what was started and fail."""
    if os.geteuid() != 0:
        pytest.fail(
            f"the SLURM tests need root: {START_SCRIPT} installs packages and starts daemons "
            f"(euid {os.geteuid()}); deselect them with -m 'not slurm'",
            pytrace=False,
        )
    before = alive_daemons()
    t0 = time.monotonic()
    try:
        start_limit = limit(START_TIMEOUT_S)
        rc, out = _run_script([str(START_SCRIPT)], start_limit, env=_script_env())
    except BaseException:
        _stop([d for d in alive_daemons() if d not in before])
        raise
    seconds = time.monotonic() - t0
    now = alive_daemons()
    missing = [d for d in DAEMONS if d not in now]
    if rc != 0 or missing:
        reason = (f"timed out after {start_limit:.0f} s" if rc is None else f"exited {rc}") + (
            f", daemons not running: {missing}" if missing else ""
        )
        stop_error = _stop([d for d in now if d not in before])
        pytest.fail(
            f"local SLURM cluster did not start: {START_SCRIPT} {reason}\n"
            f"----- script output (last 60 lines)\n{last_lines(out, 60)}\n"
            f"{log_tails(lines=20)}" + (f"\n----- cleanup: {stop_error}" if stop_error else ""),
            pytrace=False,
        )
    stale = stale_config()
    if stale:
        stop_error = _stop([d for d in now if d not in before])
        pytest.fail(
            f"the local SLURM cluster runs an older slurm.conf: {stale}. {START_SCRIPT.name} "
            f"restarts slurmctld and slurmd when /etc/slurm/slurm.conf differs from the one it "
            f"writes; here they did not pick it up. Stop the cluster ({STOP_SCRIPT}) and rerun."
            + (f"\n----- cleanup: {stop_error}" if stop_error else ""),
            pytrace=False,
        )
    cluster = SlurmCluster(
        workdir=workdir,
        preexisting=before,
        started=[d for d in DAEMONS if d not in before],
        restarted=[d for d in DAEMONS if d in before and now[d] != before[d]],
        start_seconds=seconds,
        start_output=out,
    )
    cluster.jobs_before = frozenset(cluster.queued_jobs())
    return cluster


def stale_config() -> str:
    """What the running slurmctld lacks of the slurm.conf that the tests need, or ""."""

    def scontrol(*args: str) -> str:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30,
                              env=slurm_env(), check=False).stdout  # fmt: skip

    try:
        config, parts = scontrol("show", "config"), scontrol("show", "partition", "-o")
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol does not answer ({e})"
    missing = []
    if f"PreemptType             = {PREEMPT_TYPE}" not in config:
        missing.append(f"PreemptType={PREEMPT_TYPE}")
    names = {w.split("=", 1)[1] for w in parts.split() if w.startswith("PartitionName=")}
    missing += [f"partition {p}" for p in (PARTITION, PREEMPTIBLE, PREEMPTING) if p not in names]
    return ", ".join(f"no {m}" for m in missing)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI timeout, kill) raises KeyboardInterrupt, so pytest still tears down."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _flock(path: Path, how: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _handed_over() -> dict[str, int]:
    """Daemons that sessions which ended before this one started and left to it: name -> PID."""
    try:
        recorded = json.loads(HANDOVER.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _finish(cluster: SlurmCluster, users: int) -> str:
    """End of the session: scancel the jobs submitted during it and stop the daemons it started
    (and those handed over to it), unless another session holds `users` too: then hand its
    daemons over. Call under START_LOCK. Returns what went wrong stopping, or ""."""
    alive = alive_daemons()
    mine = {d: alive[d] for d in cluster.started if d in alive}
    handed = {d: pid for d, pid in _handed_over().items() if alive.get(d) == pid}  # same process
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        HANDOVER.write_text(json.dumps(handed | mine))
        # jobs of the other session cannot be told from this one's (same user, same time)
        jobs, daemons = cluster.session_jobs(), sorted(mine)
        if jobs or daemons:
            warnings.warn(
                f"another pytest session uses the SLURM cluster: left it jobs {jobs} and "
                f"daemons {daemons} (the last session to end stops them)",
                stacklevel=1,
            )
        return ""
    HANDOVER.unlink(missing_ok=True)
    try:
        cluster.cancel_session_jobs()
    finally:
        error = _stop([d for d in DAEMONS if d in handed or d in mine])
    return error


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A local SLURM cluster (partition "debug", nodes n1 and n2, accounting on) for the session.

    Teardown (also after Ctrl-C or SIGTERM): scancel the jobs submitted during the session,
    then stop, by PID, the daemons this fixture started; daemons that were already running
    are left alone. While another pytest session uses the cluster through this fixture,
    teardown leaves the jobs alone and hands its daemons over to the last session to end.
    """
    with _sigterm_as_interrupt(), _flock(USERS_LOCK, fcntl.LOCK_SH) as users:
        with _flock(START_LOCK, fcntl.LOCK_EX):
            cluster = _start(tmp_path_factory.mktemp("slurm"))
        try:
            yield cluster
        finally:
            with _flock(START_LOCK, fcntl.LOCK_EX):
                stop_error = _finish(cluster, users)
        if stop_error:
            pytest.fail(f"stopping the local SLURM cluster:\n{stop_error}", pytrace=False)
