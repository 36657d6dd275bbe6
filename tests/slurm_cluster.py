"""A real single-node Slurm (slurmctld + slurmd, Debian's 22.05, auth/none) for the launcher tests.

Recipe and pitfalls: ../shared/docs/SLURM.md. The cluster lives in a temp folder (config, state,
spool, logs), listens on free ports, is sized to this machine (CPUs never above the real count,
or the node goes INVAL) and needs root (slurmd starts job steps as their user). It starts in a
couple of seconds; tests that use it are skipped, with the reason, where the packages or root are
missing (`.ci/run` installs `slurmctld slurmd slurm-client` with apt).

Use the session fixture `slurm` (import it into a test module): it yields a :class:`SlurmCluster`
whose `env` (SLURM_CONF, plus a `sacct` stand-in on PATH) is what every Slurm client command and
every process that calls one (submitit) must get.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "scancel", "squeue")
INSTALL_HINT = ("apt-get install slurmctld slurmd slurm-client (as root; .ci/run does this), "
                "see ../shared/docs/SLURM.md")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# submitit follows jobs with `sacct`, which needs slurmdbd (a database) that this test cluster
# does not run. This stand-in answers `sacct -o JobID,State,NodeList --parsable2 -j IDS` (the only
# call submitit makes) from `scontrol show job`, which keeps finished jobs for MinJobAge seconds.
SACCT_STANDIN = r'''#!PYTHON
"""sacct stand-in for a Slurm without slurmdbd: answers submitit's state query from scontrol."""
import re, subprocess, sys

args = sys.argv[1:]
ids = args[args.index("-j") + 1].split(",") if "-j" in args else []
print("JobID|State|NodeList")
for wanted in ids:
    base = wanted.split("_")[0]
    out = subprocess.run(["scontrol", "-o", "show", "job", base], capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        job = fields.get("JobId", "")
        if fields.get("ArrayJobId") and fields.get("ArrayTaskId") not in (None, "", "(null)"):
            job = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
        if job and (job == wanted or wanted == base):
            print(f"{job}|{fields.get('JobState', 'UNKNOWN')}|{fields.get('NodeList', '')}")
'''


def missing_requirements() -> str | None:
    """Why a real Slurm cannot start here, or None."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the test Slurm needs root (slurmd launches job steps as their user); run as root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _real_memory_mb() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", text).group(1))
    except (OSError, AttributeError):
        return 1024
    return max(256, min(4096, total_kb // 1024 // 2))


@dataclass
class SlurmCluster:
    root: Path
    node: str
    cpus: int
    env: dict
    processes: list = field(default_factory=list)

    def command(self, *args: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}\n"
                                 f"{self.logs()}")
        return result

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        """Submit (`sbatch --parsable ARGS`) from `cwd` with the cluster env + `env`; the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` fields of a job (finished jobs stay visible for MinJobAge seconds)."""
        out = self.command("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, states, timeout: float = 120) -> str:
        """Poll until the job's state is in `states`; return it (AssertionError with logs on timeout)."""
        states = set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} still {state} after {timeout} s (waited for {sorted(states)})\n"
                             f"{self.job(job_id)}\n{self.logs()}")

    def wait_finished(self, job_id: str, timeout: float = 180) -> str:
        return self.wait_for(job_id, FINISHED_STATES, timeout)

    def cancel_all(self) -> None:
        self.command("scancel", "--full", "--partition=debug", check=False)

    def logs(self, lines: int = 15) -> str:
        parts = []
        for name in ("ctld.log", "d.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def start_cluster(root: Path, startup_timeout: float = 30) -> SlurmCluster:
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = min(cpus, os.cpu_count() or cpus)
    for folder in ("state", "spool", "bin"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=bwtest",
        f"SlurmctldHost={node}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/none",
        "CredType=cred/none",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/ctld.pid",
        f"SlurmdPidFile={root}/d.pid",
        f"SlurmctldLogFile={root}/ctld.log",
        f"SlurmdLogFile={root}/d.log",
        "ProctrackType=proctrack/linuxproc",   # unset = cgroup: every launch fails here
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "KillWait=5",
        "MinJobAge=600",
        "SchedulerParameters=sched_interval=1",
        "MailProg=/bin/true",
        f"NodeName={node} CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    sacct = root / "bin" / "sacct"
    sacct.write_text(SACCT_STANDIN.replace("#!PYTHON", f"#!{sys.executable}", 1))
    sacct.chmod(0o755)
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in list(env):
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
            del env[name]  # a developer's own allocation must not leak into the test jobs
    cluster = SlurmCluster(root=root, node=node, cpus=cpus, env=env)
    for daemon in DAEMONS:
        log = open(root / f"{daemon}.stdout", "w")
        extra = ["-c"] if daemon == "slurmctld" else []
        cluster.processes.append(subprocess.Popen([_daemon(daemon), "-D", *extra, "-f", str(conf)], env=env,
                                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    deadline = time.monotonic() + startup_timeout
    state = ""
    while time.monotonic() < deadline:
        for process in cluster.processes:
            if process.poll() is not None:
                stop_cluster(cluster)
                raise RuntimeError(f"{process.args[0]} exited ({process.returncode}) while starting\n"
                                   f"{cluster.logs(40)}")
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        state = result.stdout.strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    stop_cluster(cluster)
    raise RuntimeError(f"the test Slurm did not become idle in {startup_timeout} s (node state {state!r})\n"
                       f"{cluster.logs(40)}")


def stop_cluster(cluster: SlurmCluster) -> None:
    try:
        cluster.cancel_all()
    except Exception:  # the controller may already be gone
        pass
    for process in cluster.processes:
        if process.poll() is None:
            process.terminate()
    for process in cluster.processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node Slurm for the whole session (skipped, with the reason, if impossible)."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
