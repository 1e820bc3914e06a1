"""Sandboxed execution of untrusted Python (model-written code) with limits, for HumanEval and RL verifiers.

Library module; `python -m data.tasks.sandbox` prints the isolation this machine supports. Usage:

  result = run_python("assert 1 + 1 == 2", timeout_s=5.0)
  result.status, result.reason          # "passed", ""
  results = run_many(programs, workers=8)

Each call runs `python -I` (isolated mode: no PYTHONPATH, no user site, no cwd on sys.path) in a fresh
temporary directory, which is its cwd, HOME and TMPDIR and is deleted afterwards, with a scrubbed
environment (PATH=/usr/bin:/bin, no proxies, no credentials), stdin from /dev/null, stdout and stderr
captured to anonymous files (so background children holding them can never block the caller) and
returned truncated to 4 KB (head and tail).

Isolation, strongest available (reported in `SandboxResult.isolation`, e.g. "netns,pidns,cgroup,rlimits"):
  * Namespaces, via util-linux `unshare --pid --fork --kill-child [--net]` (as root, or as a user where
    unprivileged user namespaces are allowed, with `--map-root-user`): a new network namespace has only a
    loopback interface that is down, so every connect fails with "Network is unreachable" (127.0.0.1
    included); a new PID namespace makes the program its init, so when it exits or is killed the kernel
    kills and reaps every process it started, including ones that called setsid() to leave the group.
    Without namespaces the network guard falls back to an audit hook (PEP 578) installed before the
    program runs, which refuses socket creation for internet families, connect/bind/sendto to internet
    addresses and DNS look-ups ("network access is disabled in the sandbox") — a Python-level guard that
    ctypes or a subprocess can get around, so the isolation string says "audit-hook" instead of "netns".
  * A pids cgroup (v1 `/sys/fs/cgroup/pids` or v2 with the pids controller), when writable: `pids.max` caps
    the processes and threads of one run at `max_procs`. It is the process cap that holds for root, for
    whom RLIMIT_NPROC is not enforced (the kernel skips the check for CAP_SYS_RESOURCE/CAP_SYS_ADMIN).
  * rlimits: RLIMIT_AS (`memory_mb`; an allocation beyond it raises MemoryError), RLIMIT_CPU (timeout + 1 s
    soft, + 2 s hard), RLIMIT_FSIZE (64 MB), RLIMIT_CORE (0), RLIMIT_NPROC (it counts every process of the
    uid, so a user gets `max_procs` more than it already runs; root is exempt from it whatever the value).
    They are set by util-linux `prlimit` as a command prefix (before `unshare`), or, without it, by the
    first lines of the child's Python prelude, before the program is read.
  * Its own session and process group; on the wall-clock timeout, and after every run, everything in the
    session, group and cgroup is SIGKILLed and waited for, so no process outlives a call. A fork bomb is
    thus bounded by `max_procs` (cgroup/NPROC) and by the timeout whatever the privileges. Without a PID
    namespace the caller becomes a child subreaper (prctl) so it can reap the orphans itself, and a process
    that both calls setsid() and is outside any cgroup can escape the clean-up.

Not isolated: the file system (the program runs as the calling user and can read or write what that user
can) — run as an unprivileged user, or in a container, when the code may be hostile. Under a PID namespace
the program is PID 1 there, so signals it sends to itself with the default action are ignored (the kernel
protects init); faults, timeouts and limits still stop it.

No Python runs in the forked child before exec (no `preexec_fn`; the new session is made by `subprocess`'s C
code): the caller may be multi-threaded (JAX, `run_many`), and Python code between fork and exec there can
deadlock on a lock another thread held at fork time (JAX warns "os.fork() was called ..." for that reason).
The cgroup is therefore joined by the parent while the child waits at a `/bin/sh` gate (a `read` on a pipe)
before it execs the rest of the command line.

Thread-safe: every call has its own directory, files and cgroup; `run_many` runs calls on a thread pool.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence

STATUSES = ("passed", "failed", "timeout", "memory", "error")

# Bytes of each stream kept in a result: the head (where the program starts talking) and the tail (where a
# traceback ends). 1 KB + 3 KB is "a few KB": enough for any traceback's last frames and exception line.
_HEAD_BYTES = 1024
_TAIL_BYTES = 3072
_FSIZE_BYTES = 64 << 20  # Per-file write cap, stdout/stderr included: 64 MB.
_REASON_CHARS = 300
_CLEANUP_S = 10.0  # A SIGKILLed process group is gone in milliseconds; this only bounds a stuck kernel.

# Runs the program file as __main__ after optionally setting the rlimits (when `prlimit` is missing) and
# installing the network guard. `-c` keeps both out of the program's own text (its line numbers and
# tracebacks stay the program's).
_BOOT = """\
import sys
{limits}
{guard}
import runpy
sys.argv = ["prog.py"]
runpy.run_path("prog.py", run_name="__main__")
"""

# The rlimits fallback when util-linux `prlimit` is missing: the first thing the child's Python does.
_RLIMITS_PRELUDE = """\
import resource
for _which, _value in {limits!r}:
  resource.setrlimit(_which, _value)
del resource, _which, _value
"""

# The gate that holds the child, before it execs the real command ("$@"), until the parent has moved it into
# the cgroup and written a line to its stdin (a pipe); EOF instead (the parent died) ends it. The program's
# stdin is /dev/null as without the gate.
_GATE = 'read _ || exit 125; unset PWD; exec "$@" </dev/null'  # sh exports PWD: not ours to pass on.

# PEP 578 audit hook: the fallback network guard when no network namespace can be made.
_AUDIT_GUARD = """\
def _sandbox_guard():
  import socket
  inet = (socket.AF_INET, socket.AF_INET6)
  dns = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo")
  def hook(event, args):
    blocked = (
        event in dns
        or (event == "socket.__new__" and args[1] in inet)
        or (event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")
            and isinstance(args[1], tuple)))
    if blocked:
      raise PermissionError(f"network access is disabled in the sandbox ({event})")
  sys.addaudithook(hook)
_sandbox_guard()
del _sandbox_guard
"""

_CGROUP_PREFIX = "jaxlm-sandbox-"
_counter = itertools.count()
_probe_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one run.

  status: "passed" (exit code 0), "failed" (non-zero exit, an exception, a signal), "timeout" (wall clock or
    CPU limit), "memory" (MemoryError: the address-space limit) or "error" (the sandbox itself could not run
    the program).
  reason: one line: "" when passed, else e.g. "AssertionError: ...", "timed out after 10.0 s", "MemoryError".
  returncode: the exit status (negative: killed by that signal), None if the program never started.
  stdout, stderr: the captured streams, decoded as UTF-8 (errors replaced), truncated to about 4 KB each.
  seconds: wall-clock time from start to exit.
  isolation: the guards in force, e.g. "netns,pidns,cgroup,rlimits" or "audit-hook,rlimits".
  """
  status: str
  reason: str
  returncode: int | None
  stdout: str
  stderr: str
  seconds: float
  isolation: str = ""

  @property
  def passed(self) -> bool:
    return self.status == "passed"


# ------------------------------------------------------------------------------------------------------------
# What this machine allows (probed once per process).


@functools.cache
def _unshare_prefix() -> tuple[str, ...] | None:
  """The `unshare` command line that gives a new PID + network namespace here, or None."""
  exe = shutil.which("unshare")
  if exe is None:
    return None
  # As root the plain form works; as a user only inside a new user namespace (--map-root-user).
  for extra in ((), ("--map-root-user",)):
    prefix = (exe, *extra, "--pid", "--fork", "--kill-child")
    try:
      probe = subprocess.run([*prefix, "--net", sys.executable, "-I", "-S", "-c", ""],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if probe.returncode == 0:
      return prefix
  return None


@functools.cache
def _pids_cgroup_root() -> pathlib.Path | None:
  """A cgroup folder where we may create child groups with a `pids.max`, or None."""
  for base in (pathlib.Path("/sys/fs/cgroup/pids"), pathlib.Path("/sys/fs/cgroup")):
    probe = base / f"{_CGROUP_PREFIX}{os.getpid()}-probe"
    try:
      probe.mkdir()
    except OSError:
      continue
    try:
      ok = (probe / "pids.max").is_file() and os.access(probe / "pids.max", os.W_OK)
    finally:
      _remove_cgroup(probe)
    if ok:
      _remove_stale_cgroups(base)
      return base
  return None


def _remove_stale_cgroups(base: pathlib.Path) -> None:
  """Removes empty groups left by sandbox callers that died (their pid is in the name)."""
  for group in base.glob(f"{_CGROUP_PREFIX}*"):
    owner = group.name[len(_CGROUP_PREFIX):].split("-")[0]
    if owner.isdigit() and not pathlib.Path(f"/proc/{owner}").exists():
      _remove_cgroup(group)


def _remove_cgroup(group: pathlib.Path) -> None:
  try:
    group.rmdir()
  except OSError:
    pass


@functools.cache
def _prlimit_exe() -> str | None:
  """util-linux `prlimit` if it is here and can run a command under lowered limits, else None."""
  exe = shutil.which("prlimit")
  if exe is None:
    return None
  try:
    probe = subprocess.run([exe, "--core=0:0", "--", sys.executable, "-I", "-S", "-c", ""],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return exe if probe.returncode == 0 else None


@functools.cache
def _sh_exe() -> str | None:
  return shutil.which("sh", path="/usr/bin:/bin")


def isolation(allow_network: bool = False) -> str:
  """The guards a run would get on this machine, e.g. "netns,pidns,cgroup,rlimits"."""
  with _probe_lock:
    ns = _unshare_prefix() is not None
    cg = _pids_cgroup_root() is not None and _sh_exe() is not None
  parts = []
  if not allow_network:
    parts.append("netns" if ns else "audit-hook")
  if ns:
    parts.append("pidns")
  if cg:
    parts.append("cgroup")
  parts.append("rlimits")
  return ",".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Processes: listing, killing, waiting.


def _proc_stats() -> list[tuple[int, str, int, int, int]]:
  """(pid, state, ppid, pgrp, session) of every process, read from /proc (vanishing ones skipped)."""
  out = []
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      with open(f"/proc/{entry.name}/stat", "rb") as f:
        stat = f.read().decode("ascii", "replace")
    except OSError:
      continue
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rfind(")") + 2:].split()
    out.append((int(entry.name), fields[0], int(fields[1]), int(fields[2]), int(fields[3])))
  return out


@functools.cache
def _become_subreaper() -> bool:
  """Makes this process adopt its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER, Linux >= 3.4).

  Without a PID namespace, a killed program's children would be re-parented to PID 1, and not every PID 1
  reaps (a container's shell, the development VM's init only lazily): they would linger as zombies.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(36, 1, 0, 0, 0) == 0  # 36 = PR_SET_CHILD_SUBREAPER (linux/prctl.h).
  except (OSError, AttributeError):
    return False


def _cgroup_pids(cgroup: pathlib.Path | None) -> set[int]:
  if cgroup is None:
    return set()
  try:
    return {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
  except OSError:
    return set()


def _members(leader: int, cgroup: pathlib.Path | None) -> set[int]:
  """Live processes (zombies excluded) in the leader's session or process group, or in the cgroup."""
  pids = {pid for pid, state, _, pgrp, sid in _proc_stats()
          if state != "Z" and (sid == leader or pgrp == leader)}
  return pids | _cgroup_pids(cgroup)


def _kill(pids: Iterable[int]) -> None:
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def _wait_exit(pid: int, timeout_s: float) -> bool:
  """Waits until `pid` (our child) has exited, without reaping it; False on timeout.

  Not reaping keeps the pid, and so the process group id, reserved while we kill the rest of the group: a
  recycled pid can never make us kill an unrelated group.
  """
  deadline = time.monotonic() + timeout_s
  pidfd = None
  try:
    pidfd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    pass
  try:
    delay = 0.001
    while True:
      if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
        return True
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return False
      if pidfd is not None:
        poller = select.poll()  # poll, not select: no FD_SETSIZE (1024) ceiling on the descriptor number.
        poller.register(pidfd, select.POLLIN)  # Readable once the process has exited.
        poller.poll(remaining * 1000)
      else:
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 0.02)
  finally:
    if pidfd is not None:
      os.close(pidfd)


def _cleanup(proc: subprocess.Popen, cgroup: pathlib.Path | None, in_pidns: bool) -> float:
  """SIGKILLs everything the run started, reaps the direct child and returns its CPU seconds."""
  leader = proc.pid
  deadline = time.monotonic() + _CLEANUP_S
  if in_pidns:
    # Kill the namespace's processes but not `unshare` (the leader): it must live to reap the namespace's
    # init, whose death makes the kernel kill and reap the rest. Killing `unshare` first would orphan that
    # init to PID 1, which need not reap promptly (on the development VM it lets zombies pile up).
    while time.monotonic() < deadline:
      others = _members(leader, cgroup) - {leader}
      if not others:
        break
      _kill(others)
      if _wait_exit(leader, 0.05):
        break
    if not _wait_exit(leader, max(0.0, deadline - time.monotonic())):
      _kill([leader])
  else:
    # The program is the leader itself: kill the whole group, then any process that left it (setsid) but
    # stayed in the session or the cgroup. As a child subreaper we adopt the orphans and reap them here, so
    # that no zombie is left behind either.
    try:
      os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    me = os.getpid()
    seen = set()  # Every pid found in the cgroup: one that left the session is still ours to reap.
    while time.monotonic() < deadline:
      in_cgroup = _cgroup_pids(cgroup) - {leader}
      seen |= in_cgroup
      live, ours = set(in_cgroup), []
      for pid, state, ppid, pgrp, sid in _proc_stats():
        if pid != leader and (sid == leader or pgrp == leader or pid in seen):
          if state != "Z":
            live.add(pid)
          elif ppid == me:
            ours.append(pid)
      for pid in ours:
        try:
          os.waitpid(pid, 0)  # Only pids of this run: other threads' children are never touched.
        except ChildProcessError:
          pass
      if not live and not ours:
        break
      _kill(live)
      time.sleep(0.005)
  # Reap with wait4 for the CPU time (it includes the namespace's processes, which `unshare` reaped).
  _, status, usage = os.wait4(leader, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if cgroup is not None:
    # The kernel drops exited tasks from the group asynchronously; rmdir fails with EBUSY until it has.
    while True:
      try:
        cgroup.rmdir()
        break
      except FileNotFoundError:
        break
      except OSError:
        if time.monotonic() >= deadline:
          break
        _kill(_cgroup_pids(cgroup))
        time.sleep(0.01)
  return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------------------------
# One run.


def _read_stream(f) -> str:
  """Head and tail of a captured stream, decoded, with the size of what was cut out."""
  size = f.seek(0, os.SEEK_END)
  f.seek(0)
  if size <= _HEAD_BYTES + _TAIL_BYTES:
    data = f.read()
  else:
    head = f.read(_HEAD_BYTES)
    f.seek(size - _TAIL_BYTES)
    data = head + f"\n[... {size - _HEAD_BYTES - _TAIL_BYTES} bytes cut ...]\n".encode() + f.read()
  return data.decode("utf-8", "replace")


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1][:_REASON_CHARS] if lines else ""


def _unwrap_unshare(returncode: int, stderr: str) -> tuple[int, str]:
  """Undoes util-linux `unshare`'s report of a SIGKILLed child: it tries to re-raise the child's signal on
  itself, cannot install SIG_DFL for SIGKILL, and exits 1 with this message instead (util-linux 2.38)."""
  marker = "unshare: sigprocmask unblock failed"
  lines = stderr.rstrip("\n").split("\n")
  if returncode == 1 and lines and lines[-1].startswith(marker):
    return -signal.SIGKILL, "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else "")
  return returncode, stderr


def _classify(returncode: int, stderr: str, timed_out: bool, timeout_s: float, cpu_s: float,
              cpu_limit_s: int) -> tuple[str, str]:
  if timed_out:
    return "timeout", f"timed out after {timeout_s} s"
  if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and cpu_s >= cpu_limit_s:
    # RLIMIT_CPU: SIGXCPU at the soft limit (ignored by a namespace's init), SIGKILL at the hard one. Only
    # multi-threaded code burns CPU seconds faster than wall-clock ones, so this is rare.
    return "timeout", f"CPU time limit of {cpu_limit_s} s exceeded"
  if returncode == 0:
    return "passed", ""
  last = _last_line(stderr)
  if last.startswith("MemoryError"):
    return "memory", last
  if last.startswith(("unshare:", "prlimit:")):  # A wrapper failed (e.g. a namespace limit): not the program.
    return "error", last
  if returncode < 0:
    sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
    return "failed", f"killed by {sig}" + (f" after: {last}" if last else "")
  return "failed", last or f"exit code {returncode}"


def _uid_processes() -> int:
  uid = os.getuid()
  n = 0
  for entry in os.scandir("/proc"):
    if entry.name.isdigit():
      try:
        n += entry.stat().st_uid == uid
      except OSError:
        pass
  return n


def _clamp(limits: list[tuple[int, tuple[int, int]]]) -> list[tuple[int, tuple[int, int]]]:
  """Lowers each limit to the hard limit this process already has, which the child inherits.

  An unprivileged process cannot raise a hard limit, so asking for more would fail in the child; asking for
  the inherited limit instead is what the child would get anyway (never a looser limit than requested).
  """
  out = []
  for which, (soft, hard) in limits:
    _, inherited = resource.getrlimit(which)
    if inherited != resource.RLIM_INFINITY:
      soft, hard = min(soft, inherited), min(hard, inherited)
    out.append((which, (soft, hard)))
  return out


_PRLIMIT_NAMES = {resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu", resource.RLIMIT_FSIZE: "fsize",
                  resource.RLIMIT_CORE: "core", resource.RLIMIT_NPROC: "nproc"}


def _prlimit_args(limits: list[tuple[int, tuple[int, int]]]) -> list[str]:
  return [f"--{_PRLIMIT_NAMES[which]}={soft}:{hard}" for which, (soft, hard) in limits]


def _release_gate(proc: subprocess.Popen, gate: int, cgroup: pathlib.Path) -> None:
  """Moves the gated child into `cgroup`, then lets it run; on failure kills, reaps it and raises OSError."""
  try:
    (cgroup / "cgroup.procs").write_text(str(proc.pid))
    os.write(gate, b"go\n")
  except OSError:
    _kill([proc.pid])  # Still the shell at the gate: nothing else of the run exists yet.
    proc.wait()
    raise
  finally:
    os.close(gate)


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_procs: int = 64,
               allow_network: bool = False) -> SandboxResult:
  """Runs `code` as a Python program in the sandbox (see the module docstring) and reports how it ended."""
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  if memory_mb < 1 or max_procs < 1:
    raise ValueError(f"memory_mb and max_procs must be >= 1, got {memory_mb}, {max_procs}")
  with _probe_lock:
    prefix = _unshare_prefix()
    prlimit = _prlimit_exe()
    sh = _sh_exe()
    cgroup_root = _pids_cgroup_root() if sh is not None else None
    if prefix is None:
      _become_subreaper()
  isolation_used = isolation(allow_network)

  cpu_s = math.ceil(timeout_s) + 1
  nproc = max_procs + (0 if os.geteuid() == 0 else _uid_processes())
  limits = _clamp([
      (resource.RLIMIT_AS, (memory_mb << 20,) * 2),
      (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard one.
      (resource.RLIMIT_FSIZE, (_FSIZE_BYTES,) * 2),
      (resource.RLIMIT_CORE, (0, 0)),
      (resource.RLIMIT_NPROC, (nproc,) * 2),
  ])

  # [sh gate] [prlimit] [unshare] python: each wrapper execs the next (`unshare` forks it, as the namespace's
  # init), so the gate's pid is the session leader, the rlimits cover `unshare` too (as a `preexec_fn` did),
  # and every process after the gate starts inside the cgroup.
  cmd = []
  if cgroup_root is not None:
    cmd += [sh, "-c", _GATE, "sandbox-gate"]
  if prlimit is not None:
    cmd += [prlimit, *_prlimit_args(limits), "--"]
  if prefix is not None:
    cmd += [*prefix, *(() if allow_network else ("--net",))]
  guard = "" if allow_network or prefix is not None else _AUDIT_GUARD
  rlimits = "" if prlimit is not None else _RLIMITS_PRELUDE.format(limits=limits)
  cmd += [sys.executable, "-I", "-c", _BOOT.format(limits=rlimits, guard=guard)]

  workdir = pathlib.Path(tempfile.mkdtemp(prefix="sandbox-"))
  cgroup = None
  try:
    (workdir / "prog.py").write_text(code, encoding="utf-8")
    # `-I` ignores PYTHON* variables anyway; C.UTF-8 makes the child's stdio UTF-8.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      start = time.monotonic()
      try:
        stdin, gate = subprocess.DEVNULL, None
        if cgroup_root is not None:
          cgroup = cgroup_root / f"{_CGROUP_PREFIX}{os.getpid()}-{next(_counter)}"
          cgroup.mkdir()
          # +1: the `unshare` wrapper is a task of the group too.
          (cgroup / "pids.max").write_text(str(max_procs + (prefix is not None)))
          stdin, gate = os.pipe()
        try:
          proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=stdin, stdout=out, stderr=err,
                                  start_new_session=True)  # setsid() in C: no Python runs after the fork.
        except BaseException:
          if gate is not None:
            os.close(gate)
          raise
        finally:
          if gate is not None:
            os.close(stdin)  # The read end is the child's alone now.
        if gate is not None:
          _release_gate(proc, gate, cgroup)
      except (OSError, subprocess.SubprocessError) as e:
        return SandboxResult("error", f"could not start the sandbox: {e}"[:_REASON_CHARS], None, "", "",
                             time.monotonic() - start, isolation_used)
      try:
        timed_out = not _wait_exit(proc.pid, timeout_s)
        seconds = time.monotonic() - start
      finally:
        cpu_used = _cleanup(proc, cgroup, prefix is not None)
      stdout, stderr = _read_stream(out), _read_stream(err)
    returncode = proc.returncode
    if prefix is not None:
      returncode, stderr = _unwrap_unshare(returncode, stderr)
    status, reason = _classify(returncode, stderr, timed_out, timeout_s, cpu_used, cpu_s)
    return SandboxResult(status, reason, returncode, stdout, stderr, seconds, isolation_used)
  finally:
    if cgroup is not None and cgroup.exists():
      _remove_cgroup(cgroup)
    _rmtree(workdir)


def _rmtree(path: pathlib.Path) -> None:
  """Deletes the work dir even when the program removed permissions from folders inside it.

  Runs after every sandbox process is dead, so nothing can swap a folder for a symlink meanwhile; symlinks
  are skipped (chmod would follow one out of the work dir).
  """
  def unlock(p: str) -> None:
    if not os.path.islink(p):
      try:
        os.chmod(p, 0o700)
      except OSError:
        pass
  unlock(str(path))
  for root, dirs, _ in os.walk(path):  # Top-down: a folder is unlocked before the walk enters it.
    for d in dirs:
      unlock(os.path.join(root, d))
  shutil.rmtree(path, ignore_errors=True)


def run_many(codes: Sequence[str], *, workers: int | None = None, **kwargs) -> list[SandboxResult]:
  """`run_python` over `codes` on a thread pool of `workers` (default: CPU count), results in input order.

  Threads suffice: each worker only waits on its child process. `kwargs` go to `run_python`.
  """
  workers = workers or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(functools.partial(_run_one, kwargs), codes))


def _run_one(kwargs: dict, code: str) -> SandboxResult:
  return run_python(code, **kwargs)


if __name__ == "__main__":
  print(json.dumps({"isolation": isolation(), "unshare": _unshare_prefix(),
                    "cgroup": str(_pids_cgroup_root())}))
