"""The researcher's loop without surprises: quiet and honest counting, introspection from the command
line, a GPU path that explains itself, and no run folders left by a failed start."""
import json
import os
import subprocess

import pytest
import torch

import custom_demask_eval as cde
from demask import core, decoders, networks
from demask.settings import RunSettings
from conftest import REPO
from test_trust import run_cli


# ---------------------------------------------------------------------------
# Counting: like with like


def test_no_steps_warning_for_any_shipped_decoder_on_the_tiny_labels(tmp_path):
    names = [n for n in decoders.DECODERS if n != "policy"] + ["policy"]
    for label in ("tiny-math", "tiny-code"):
        out = run_cli("--label", label, "--limit", "16", "--sweep", ";".join(names), "--results_dir", str(tmp_path))
        assert out.returncode == 0, out.stderr[-2000:]
        assert "warning:" not in out.stderr, out.stderr
    summaries = [json.load(open(p)) for p in tmp_path.glob("*/*/summary.json")]
    assert len(summaries) == 2 * len(names) and all(s["n_steps_mismatch"] == 0 for s in summaries)
    assert all("avg_reported_steps" in s for s in summaries)


class UnderReporting(decoders.TopKDecoder):
    def decode(self, model, input_ids, gen_length, steps, block_length):
        x, used = super().decode(model, input_ids, gen_length, steps, block_length)
        return x, used - 2


def test_a_decoder_that_under_reports_still_warns():
    decoder = UnderReporting(0)
    counted = [8, 6, 8]
    assert cde.steps_mismatch(decoder, counted, [6] * 3) == [True] * 3          # the batch's 8 reported as 6
    assert cde.steps_mismatch(decoder, counted, [8] * 3) == [False] * 3         # the longest row's count
    decoder.batched = False
    assert cde.steps_mismatch(decoder, [8, 6], [8, 5]) == [False, True]
    line = cde.mismatch_warning(decoder, [8, 6], [8, 5], [dict(id="a"), dict(id="b")], [False, True])
    assert line.startswith("warning: decoder reported 5 steps but 6 forwards were counted (sample b)")


# ---------------------------------------------------------------------------
# Introspection


def test_decoders_lists_every_decoder_with_defaults_and_ranges():
    out = run_cli("decoders")
    assert out.returncode == 0, out.stderr
    for name in decoders.DECODERS:
        assert f"\n{name} (" in "\n" + out.stdout
    assert "alg_threshold        0.9                    >= 0 and <= 1" in out.stdout
    one = run_cli("decoders", "factor")
    assert one.returncode == 0 and "alg_factor" in one.stdout and "> 0" in one.stdout and "reference:" in one.stdout
    assert "threshold" not in one.stdout.split("\n", 1)[1].replace("alg_threshold", "")
    unknown = run_cli("decoders", "nope")
    assert unknown.returncode == 2 and "known decoders:" in unknown.stderr


def test_help_names_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0 and "report RESULTS_DIR" in out.stdout and "decoders [NAME]" in out.stdout


def test_unknown_decoder_argument_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['threshold'\]; its parameters: temperature, top_p, "
                                         r"alg_threshold"):
        decoders.build_decoder("threshold", 0, RunSettings(), {"threshold": 0.8})


# ---------------------------------------------------------------------------
# The GPU path explains itself


def test_unreachable_hub_model_says_what_to_do_and_leaves_no_folder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = run_cli("--label", "llada-math", "--limit", "2", "--results_dir", str(tmp_path / "r"), env=env)
    assert out.returncode == 4 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "huggingface-cli download GSAI-ML/LLaDA-8B-Instruct` (16 GB of weights)" in out.stderr
    assert "MODEL_PATH=DIR" in out.stderr and not (tmp_path / "r").exists()


def test_script_wrapper_failing_offline_points_to_model_path(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), LIMIT="2")
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "llada_math.sh"), "--results_dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 4 and "MODEL_PATH" in out.stderr and not os.listdir(tmp_path)


@pytest.fixture
def large_checkpoint(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(REPO, "tests", "fixtures", "model_files",
                                                          "llada-8b-instruct", "config.json")).read())
    with open(folder / "model.safetensors", "wb") as f:   # sparse: 3 GiB of size, no disk
        f.truncate(3 << 30)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_real_size_model_without_cuda_needs_device_cpu(tmp_path, large_checkpoint):
    args = ["--label", "tiny-math", "--model_path", str(large_checkpoint), "--results_dir", str(tmp_path / "r")]
    out = run_cli(*args)
    assert out.returncode == 2 and "3.2 GB of weights and there is no CUDA GPU here" in out.stderr
    assert "--device cpu" in out.stderr and not (tmp_path / "r").exists()  # refused before any folder
    forced = run_cli(*args, "--device", "cpu")   # asked for: it goes on (and fails on the fake weights)
    assert forced.returncode == 4 and "cannot load model" in forced.stderr
    assert not [p for p in (tmp_path / "r").rglob("*")]  # the run folder of the failed start is gone


def test_weight_sizes_of_the_labels_checkpoints_are_the_real_ones():
    for name, folder in (("GSAI-ML/LLaDA-8B-Instruct", "llada-8b-instruct"),
                         ("Dream-org/Dream-v0-Instruct-7B", "dream-v0-instruct-7b")):
        index = json.load(open(os.path.join(REPO, "tests", "fixtures", "model_files", folder,
                                            "model.safetensors.index.json")))
        assert networks.CHECKPOINT_BYTES[name] == index["metadata"]["total_size"]
    assert networks.weight_bytes(cde.TINY) == os.path.getsize(os.path.join(cde.TINY, "model.safetensors"))


def test_gpu_preflight_line_names_the_gpu_free_memory_and_the_measured_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    run = cde.LABELS["llada-math"].replace(batch_size=8, device="cuda", decoder="confidence_greedy")
    line = cde.gpu_line(run, 16031162368)
    assert line == ("gpu: NVIDIA H100 80GB HBM3, 70.0 of 80.0 GiB free; llada-math at batch 8 peaked at 16.6 GB with "
                    "confidence_greedy on NVIDIA H200 (benchmarks/h200_e2e.json)")
    assert cde.measured_peak(run.replace(decoder="klass")) == (26.6, "klass", "NVIDIA H100 80GB HBM3",
                                                                "benchmarks/h100_e2e_cost.json")
    assert "none measured with threshold" in cde.gpu_line(run.replace(decoder="threshold"), None)
    assert cde.measured_peak(run.replace(cache="dual")) == (23.93, "confidence_greedy", "NVIDIA H200",
                                                             "benchmarks/h200_cache.json")
    unmeasured = cde.gpu_line(run.replace(batch_size=3), 16031162368)
    assert "no peak measured for llada-math at batch 3; its weights alone take 14.9 GiB" in unmeasured


def test_a_failed_sweep_configuration_leaves_no_folder(tmp_path):
    plugin = tmp_path / "crash.py"
    plugin.write_text("import custom_demask_eval as cde\n"
                      "class Crash(cde.TopKDecoder):\n"
                      "    def decode(self, model, input_ids, gen_length, steps, block_length):\n"
                      "        raise RuntimeError('no')\n"
                      "cde.register_method('crash', Crash)\n")
    out = run_cli("--label", "tiny-math", "--limit", "2", "--results_dir", str(tmp_path / "r"), "--plugin", str(plugin),
                  "--sweep", "klass;crash")
    assert out.returncode == 3 and "decoder raised RuntimeError on sample" in out.stderr
    (kept,) = (tmp_path / "r" / "tiny-math").iterdir()
    assert kept.name.startswith("klass-") and (kept / "summary.json").exists()


# ---------------------------------------------------------------------------
# Cost beyond forwards


def test_cost_in_seconds_tokens_and_model_work(tmp_path):
    summaries = {}
    for cache in ("none", "dual"):
        out = run_cli("--label", "tiny-math", "--limit", "8", "--decoder", "threshold", "--cache", cache,
                      "--results_dir", str(tmp_path / cache))
        assert out.returncode == 0, out.stderr
        line = next(l for l in out.stderr.splitlines() if l.startswith("cost: "))
        assert "s/sample decoding" in line and "tokens/s" in line and "tokens/forward" in line
        (run,) = (tmp_path / cache / "tiny-math").iterdir()
        summaries[cache] = json.load(open(run / "summary.json"))
        records = [json.loads(l) for l in open(run / "samples.jsonl")]
        assert all(r["decode_seconds"] > 0 and r["judge_seconds"] >= 0 for r in records)
        assert all(abs(r["seconds"] - r["decode_seconds"] - r["judge_seconds"]) < 2e-4 for r in records)
    exact, dual = summaries["none"], summaries["dual"]
    forwards = exact["metrics"]["avg_steps"] * 8
    assert exact["cost"]["full_forwards"] == forwards and exact["cost"]["partial_forwards"] == 0
    assert exact["cost"]["positions_share"] == 1.0
    assert dual["cost"]["full_forwards"] + dual["cost"]["partial_forwards"] == dual["metrics"]["avg_steps"] * 8
    assert dual["cost"]["partial_forwards"] > 0 and dual["cost"]["positions_share"] < 1.0
    for s in (exact, dual):
        c = s["cost"]
        assert c["tokens_per_forward"] == round(64 / s["metrics"]["avg_steps"], 3)
        assert c["tokens_per_second"] == round(64 / c["decode_seconds_per_sample"], 1) or abs(
            c["tokens_per_second"] - 64 / c["decode_seconds_per_sample"]) / c["tokens_per_second"] < 0.01


def test_report_shows_seconds_and_can_plot_them(tmp_path):
    results = tmp_path / "r"
    out = run_cli("--label", "tiny-math", "--limit", "6", "--sweep", "threshold;confidence_greedy",
                  "--results_dir", str(results))
    assert out.returncode == 0, out.stderr
    assert run_cli("report", str(results)).returncode == 0
    board = (results / "report.md").read_text()
    head = next(l for l in board.splitlines() if l.startswith("| decoder |"))
    assert "tiny-math s/sample" in head
    summaries = {json.load(open(p))["decoder"]: json.load(open(p)) for p in results.glob("tiny-math/*/summary.json")}
    row = next(l for l in board.splitlines() if l.startswith("| threshold"))
    assert f"{summaries['threshold']['cost']['decode_seconds_per_sample']:.3f}" in row.split(" | ")
    csv = (results / "report.csv").read_text()
    assert "seconds_per_sample" in csv.splitlines()[0]
    by_seconds = run_cli("report", str(results), "--x", "seconds", "--out", str(tmp_path / "s" / "report.md"))
    assert by_seconds.returncode == 0, by_seconds.stderr
    text = (tmp_path / "s" / "report.md").read_text()
    assert "Pareto front (accuracy vs seconds)" in text and " s/sample)" in text
    assert (tmp_path / "s" / "pareto_tiny-math.png").exists()
