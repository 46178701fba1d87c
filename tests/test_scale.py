"""Crash safety and multi-process evaluation (CPU, gloo)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import custom_demask_eval as cde
from conftest import REPO

ARGS = ["--label", "llada-math", "--limit", "12", "--batch_size", "2", "--gen_length", "16", "--steps", "16",
        "--block_length", "8"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model, results, processes=1, extra=()):
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    return [*launcher, os.path.join(REPO, "custom_demask_eval.py"), *ARGS, "--model_path", model,
            "--results_dir", str(results), *extra]


def final_lines(stdout):
    return sorted(l for l in stdout.splitlines() if l.split(":")[0].endswith("_llada-math"))


def only_run(results):
    (run,) = list((results / "llada-math").iterdir())
    return run


def run_ok(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def killed_run(cmd, results, after_lines):
    """Start cmd, SIGKILL its whole process group once `after_lines` samples are on disk."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        runs = list((results / "llada-math").glob("*/samples*.jsonl")) if (results / "llada-math").exists() else []
        if sum(open(p).read().count("\n") for p in runs) >= after_lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return only_run(results)


def generations(run):
    records = [json.loads(l) for l in open(run / "samples.jsonl")]
    assert len(records) == len({r["id"] for r in records}) == 12  # nothing lost, nothing twice
    assert not list(run.glob("samples.rank*"))
    return {r["id"]: (r["generation"], r["steps"]) for r in records}


def check_complete(run, reference):
    assert generations(run) == reference[1]


@pytest.fixture(scope="module")
def reference(tiny_llada, tmp_path_factory):
    results = tmp_path_factory.mktemp("reference")
    lines = final_lines(run_ok(command(tiny_llada, results)).stdout)
    return lines, generations(only_run(results))


def test_sigkill_then_resume_matches_uninterrupted(tiny_llada, tmp_path, reference):
    run = killed_run(command(tiny_llada, tmp_path), tmp_path, after_lines=3)
    assert not (run / "summary.json").exists()
    resumed = run_ok([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--resume", str(run)])
    assert final_lines(resumed.stdout) == reference[0]
    check_complete(run, reference)


def test_two_processes_merge_to_the_single_process_result(tiny_llada, tmp_path, reference):
    out = run_ok(command(tiny_llada, tmp_path, processes=2))
    assert final_lines(out.stdout) == reference[0]  # printed once, by rank 0
    run = only_run(tmp_path)
    check_complete(run, reference)
    assert json.load(open(run / "summary.json"))["metrics"]["n_samples"] == 12


def test_killed_two_process_run_resumes(tiny_llada, tmp_path, reference):
    run = killed_run(command(tiny_llada, tmp_path, processes=2), tmp_path, after_lines=4)
    resume = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
              os.path.join(REPO, "custom_demask_eval.py"), "--resume", str(run)]
    assert final_lines(run_ok(resume).stdout) == reference[0]
    check_complete(run, reference)


@pytest.mark.parametrize("gpu,backend,device", [(True, "nccl", "cuda:3"), (False, "gloo", "cpu")])
def test_distributed_picks_the_local_gpu_and_backend(monkeypatch, gpu, backend, device):
    """Under torchrun a process on a GPU host takes cuda:LOCAL_RANK and NCCL (the choice mocked here)."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.setdefault("set_device", index))
    monkeypatch.setattr(dist, "init_process_group", lambda name: seen.setdefault("backend", name))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    assert cde.distributed() == (3, 4, device)
    assert seen == ({"set_device": 3, "backend": "nccl"} if gpu else {"backend": "gloo"})
