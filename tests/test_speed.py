"""Speed tooling on CPU: the throughput benchmark's CPU mode, the compiled blocks of the GPU
forward, and a smoke run of the tiny model's training script."""
import json
import os
import subprocess
import sys
from functools import partial

import torch
import torch._dynamo.utils

from demask import core
from demask import networks
from conftest import REPO

BENCH = os.path.join(REPO, "scripts", "bench_throughput.py")


def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_bench_cpu_mode_on_bundled_model(tmp_path):
    out = run_script(BENCH, "--model_path", os.path.join(REPO, "models", "tiny-llada"), "--device", "cpu",
                     "--batch_sizes", "1,3", "--samples", "1", "--gen_length", "16", "--steps", "16",
                     "--block_length", "8", "--invariance", "3", "--cache", "none,dual", "--widths", "--json",
                     str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    speed = {(r["batch"], r["cache"]): r for r in rows if "ms_per_forward" in r}
    assert set(speed) == {(1, "none"), (3, "none"), (1, "dual"), (3, "dual")}
    assert all(r["ms_per_forward"] > 0 for r in speed.values())
    assert speed[3, "none"]["samples"] == 3 and speed[1, "none"]["samples"] == 1
    work = {k: r["tflops"] * r["ms_per_forward"] for k, r in speed.items()}  # FLOPs per forward (/ 1e9)
    assert work[1, "dual"] < work[1, "none"] and work[3, "dual"] < work[3, "none"]  # dual computes fewer positions
    (inv,) = [r for r in rows if "identical_fraction" in r]
    assert inv["dtype"] == "torch.float32" and inv["identical_fraction"] == 1.0 and inv["identical_tokens"] == 1.0
    assert inv["avg_steps_alone"] == inv["avg_steps_batched"]
    (widths,) = [r for r in rows if "width_shapes" in r]  # every batch of a full run at B=3, sorted by length
    lengths = sorted(json.load(open(os.path.join(REPO, "data", "math500_prompt_lengths.json")))["llada"])
    assert [(s["rows"], s["width"]) for s in widths["width_shapes"]] == [
        (len(lengths[i:i + 3]), max(lengths[i:i + 3]) + 16) for i in range(0, 500, 3)]
    assert widths["first_forward_seconds"] > 0 and widths["peak_allocated_gib"] is None  # no GPU memory on CPU


def test_bench_profile_needs_a_gpu():
    out = run_script(BENCH, "--device", "cpu", "--profile")
    assert out.returncode == 2 and "--profile measures GPU kernels" in out.stderr


def test_compiled_blocks_share_one_graph_and_match_eager(tiny_llada):
    """What fast_forwards runs on a GPU, minus the CUDA graphs: compiled blocks for every layer."""
    net = core.load_model(tiny_llada, device="cpu").net
    blocks = [torch.compile(block, dynamic=True) for block in net.parts()[1]]
    assert len(blocks) > 1
    compiled = partial(networks.forward_logits, net, blocks=blocks)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for B, T in [(2, 24), (3, 40)]:
        x = torch.randint(10, 200, (B, T))
        key_mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
        key_mask[0, ..., :3] = False
        positions = (key_mask[:, 0, 0].long().cumsum(1) - 1).clamp(min=0)
        query = torch.arange(T - 8, T).expand(B, -1)
        with torch.no_grad():
            fast, eager = compiled(x, positions, key_mask, query), networks.forward_logits(net, x, positions, key_mask, query)
        assert torch.allclose(fast, eager, atol=1e-4, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # all layers, both shapes


def test_train_tiny_smoke_run_gives_a_loadable_model(tmp_path):
    out = run_script(os.path.join(REPO, "scripts", "train_tiny.py"), "--device", "cpu", "--steps", "3",
                     "--batch_size", "4", "--math_problems", "200", "--d_model", "32", "--n_layers", "1",
                     "--n_heads", "2", "--mlp", "64", "--out", str(tmp_path / "model"))
    assert out.returncode == 0, out.stderr[-3000:]
    log = json.load(open(tmp_path / "model" / "training_log.json"))
    assert log["steps"] == 3 and log["args"]["math_problems"] == 200
    model = core.load_model(str(tmp_path / "model"), device="cpu")
    assert model.net.config["d_model"] == 32 and len(model.net.parts()[1]) == 1
