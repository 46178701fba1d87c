"""scripts/bench_e2e.py: checkpoints in the hub's layout, label scripts run as subprocesses, the table."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_e2e  # noqa: E402
import custom_demask_eval as cde  # noqa: E402
from demask import networks  # noqa: E402
from demask import tasks  # noqa: E402

LABELS = ["llada-math", "dream-math", "dream-humaneval"]
BLOCK_LABELS = ["sdar-gsm8k", "fast-dllm-v2-math"]


def run_bench(workdir, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_e2e.py"), "--shapes", "tiny",
                           "--device", "cpu", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    out = run_bench(workdir, "--limit", "2", "--keep", "--json", str(workdir / "e2e.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    return workdir, out.stdout, json.load(open(workdir / "e2e.json"))



@pytest.fixture(scope="module")
def block_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e_block")
    out = run_bench(workdir, "--labels", ",".join(BLOCK_LABELS), "--limit", "2", "--keep",
                    "--json", str(workdir / "e2e.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, json.load(open(workdir / "e2e.json"))


def layer_of(name):
    """Layer number of a parameter name, None outside the layers."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None

# ---------------------------------------------------------------------------
# The whole path on CPU


def test_table_has_every_label(tiny_run):
    _, stdout, report = tiny_run
    table = stdout[stdout.index("| label"):].splitlines()
    assert "s/sample" in table[0] and "projected min" in table[0]
    assert [line.split("|")[1].strip() for line in table[1:]] == LABELS
    assert all("n/a" in line for line in table[1:])  # no GPU: no peak memory
    assert [r["label"] for r in report["rows"]] == LABELS
    assert report["env"]["shapes"] == "tiny" and report["env"]["limit"] == 2


def test_rows_come_from_the_checkpoints_and_add_up(tiny_run):
    _, _, report = tiny_run
    for row in report["rows"]:
        family = bench_e2e.label_family(row["label"])
        assert row["rc"] == 0 and "error" not in row
        assert row["model"] == report["checkpoints"][family]["path"]  # loaded through --model_path
        assert row["decoder"] == "confidence_greedy" and row["batch_size"] == 1
        assert row["n"] == 2 and row["avg_steps"] == 16.0
        assert row["first_batch_size"] == 1 and row["steady_samples"] == 1
        assert row["steady_s_per_sample"] > 0 and row["peak_gpu_gb"] is None
        assert 0 < row["first_batch_done_s"] < row["wall_s"]
        assert row["n_full"] == {"llada-math": 500, "dream-math": 500, "dream-humaneval": 164}[row["label"]]
        full_s = row["us_per_token_forward"] * 1e-6 * row["avg_steps"] * row["n_full"] * row["full_mean_width"]
        assert row["projected_min"] == pytest.approx((row["warmup_s"] + full_s) / 60, rel=2e-3, abs=0.01)
        assert row["mean_width"] > 16 and row["full_mean_width"] > 16  # prompt + the 16 generated positions
        assert os.path.exists(row["log"])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_checkpoint_is_sharded_per_its_index(tiny_run, family):
    from safetensors import safe_open
    workdir, _, report = tiny_run
    folder = report["checkpoints"][family]["path"]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config == bench_e2e.model_config(family, "tiny")
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    with torch.device("meta"):
        names = networks.MODEL_CLASSES[family](config).state_dict()
    assert set(index["weight_map"]) == set(names)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == report["checkpoints"][family]["shards"] > 1
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == name}
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16 and t.shape == names[key].shape
                total += 2 * t.numel()
                if key.endswith("norm.weight") or key.endswith("ln_f.weight"):
                    assert bool((t == 1).all())
                elif t.numel() > 1000:
                    assert t.float().std().item() == pytest.approx(0.02, rel=0.1)
    assert total == index["metadata"]["total_size"]


def test_block_labels_write_their_rows(block_run):
    stdout, report = block_run
    table = stdout[stdout.index("| label"):].splitlines()
    assert [line.split("|")[1].strip() for line in table[1:]] == BLOCK_LABELS
    assert sorted(report["checkpoints"]) == ["fast_dllm_qwen", "sdar"]
    for row in report["rows"]:
        family = bench_e2e.label_family(row["label"])
        assert row["rc"] == 0 and row["model"] == report["checkpoints"][family]["path"]
        assert row["decoder"] == "confidence_greedy" and row["n"] == 2 and row["avg_steps"] == 16.0
        assert row["steady_samples"] == 1 and row["us_per_token_forward"] > 0 and row["projected_min"] > 0
        assert row["n_full"] == {"sdar-gsm8k": 1319, "fast-dllm-v2-math": 500}[row["label"]]


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_qwen"])
def test_tiny_block_checkpoint_has_the_real_indexs_names(block_run, family):
    """The tiny checkpoint's tensors are the real index's names of its first two layers and the rest."""
    _, report = block_run
    folder = report["checkpoints"][family]["path"]
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    real = json.load(open(bench_e2e.real_file(family, "model.safetensors.index.json")))["weight_map"]
    assert set(index["weight_map"]) == {k for k in real if layer_of(k) is None or layer_of(k) < 2}
    assert 1 < report["checkpoints"][family]["shards"] <= len(set(real.values()))
    tokenizer = networks.load_tokenizer(folder, networks.FAMILIES[family])
    assert len(tokenizer) == {"sdar": 151670, "fast_dllm_qwen": 151666}[family]
    assert os.path.exists(os.path.join(folder, "tokenizer.json")) == (family == "sdar")


def test_failed_label_is_reported(tmp_path):
    out = run_bench(tmp_path, "--labels", "llada-math", "--limit", "1", "--extra", "--gen_length 16 --block_length 5")
    assert out.returncode == 1
    assert "FAILED (exit 2)" in out.stdout and "not divisible" in out.stdout
    assert not os.path.exists(tmp_path / "llada-tiny")  # deleted without --keep

# ---------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("family", ["llada", "dream", "sdar", "fast_dllm_qwen"])
def test_real_config_reuses_the_real_index(family):
    config = bench_e2e.model_config(family, "real")
    index = bench_e2e.shard_plan(family, config, bench_e2e.parameter_shapes(family, config))
    assert index == json.load(open(bench_e2e.real_file(family, "model.safetensors.index.json")))


def test_llada2_real_plan_has_official_names_in_seven_shards():
    config = bench_e2e.model_config("llada2_moe", "real")
    shapes = bench_e2e.parameter_shapes("llada2_moe", config)
    index = bench_e2e.shard_plan("llada2_moe", config, shapes)
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    bias = 19 * 256 * 2  # the 19 sparse layers' expert_bias, which CHECKPOINT_BYTES leaves out
    assert index["metadata"]["total_size"] == networks.CHECKPOINT_BYTES[cde.LLADA2_MINI] + bias
    assert len(shapes) == 3 + 9 + 19 * (8 + 256 * 3 + 3)  # outside, dense layer 0, sparse layers
    assert shapes["model.layers.19.mlp.experts.255.down_proj.weight"] == ((2048, 512), "randn")
    assert shapes["model.layers.1.mlp.gate.expert_bias"] == ((256,), "zeros")
    assert shapes["model.layers.0.attention.query_layernorm.weight"] == ((128,), "ones")
    sizes = {}
    for key, name in index["weight_map"].items():
        sizes[name] = sizes.get(name, 0) + 2 * torch.Size(shapes[key][0]).numel()
    assert max(sizes.values()) < 5e9


def test_llada2_gets_the_ling_stand_in_with_its_ids(tmp_path):
    bench_e2e.write_tokenizer(str(tmp_path), "llada2_moe")
    tok = networks.load_tokenizer(str(tmp_path), "llada")
    config = bench_e2e.model_config("llada2_moe", "real")
    assert len(tok) == config["vocab_size"] == 157184
    assert tok.eos_token_id == config["pad_token_id"] == 156892
    assert tok.mask_token_id == networks.GENERATE_MASK_IDS["llada2_moe"] == 156895


def test_shard_keys_are_contiguous_and_named_like_the_hub():
    sizes = {"a": 100, "b": 1, "c": 1, "d": 100, "e": 100}
    shards = bench_e2e.shard_keys(sizes, 3)
    assert shards == {"a": "model-00001-of-00003.safetensors", "b": "model-00001-of-00003.safetensors",
                      "c": "model-00002-of-00003.safetensors", "d": "model-00002-of-00003.safetensors",
                      "e": "model-00003-of-00003.safetensors"}  # by each key's starting byte
    assert set(bench_e2e.shard_keys({"a": 1}, 6).values()) == {"model-00001-of-00001.safetensors"}


def test_llada_stand_in_tokenizer(tmp_path):
    bench_e2e.llada_tokenizer().save_pretrained(tmp_path)
    tok = networks.load_tokenizer(str(tmp_path), "llada")
    assert len(tok) == 126349
    ids = {"<|mdm_mask|>": 126336, "<|endoftext|>": 126081, "<|eot_id|>": 126348, "<|startoftext|>": 126080,
           "<|start_header_id|>": 126346, "<|end_header_id|>": 126347}
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (126080, 126081, 126081)
    chat = tasks.encode_chat(tok, [{"role": "user", "content": " hi "}])
    assert tok.decode(chat) == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.decode(chat, skip_special_tokens=True) == "user\n\nhiassistant\n\n"
    lengths = json.load(open(os.path.join(REPO, "data", "math500_prompt_lengths.json")))["llada"]
    problems = tasks.MathTask().load(cde.LABELS["llada-math"])[:50]
    assert [len(tasks.encode_chat(tok, p["messages"])) for p in problems] == lengths[:50]


def test_timing_skips_the_first_batch_and_prices_the_full_run_by_width():
    def batch(seed, ids, seconds):
        return [dict(id=i, seed=seed, seconds=seconds, steps=10) for i in ids]
    records = batch(1, "ab", 9.0) + batch(3, "cd", 1.0) + batch(5, "ef", 2.0)
    widths = dict(a=50, b=50, c=100, d=100, e=200, f=200)
    t = bench_e2e.timing(records, first_done=30.0, widths=widths, full_widths=[(2, 100), (2, 300)])
    assert t["steady_s_per_sample"] == 1.5 and t["steady_samples"] == 4 and t["first_batch_size"] == 2
    # 6 s over 10 forwards of 2 x 100 + 2 x 200 positions: 1 ms per position; the full run 10 x 800 of them
    assert t["us_per_token_forward"] == 1000.0 and t["mean_width"] == 150.0 and t["full_mean_width"] == 200.0
    assert t["warmup_s"] == 27.0 and t["projected_min"] == pytest.approx((27 + 8) / 60, abs=0.01)
    alone = bench_e2e.timing(records[:2], first_done=30.0, widths=widths, full_widths=[(2, 100)])
    assert alone["steady_s_per_sample"] is None and alone["warmup_s"] is None and alone["projected_min"] is None


def test_padded_widths_follow_the_clis_length_sorted_batches():
    lengths = {0: 5, 1: 3, 2: 9, 3: 4, 4: 1}
    width, full = bench_e2e.padded_widths(lengths, list(lengths), batch_size=2, gen_length=10)
    assert full == [(2, 13), (2, 15), (1, 19)]
    assert width == {4: 13, 1: 13, 3: 15, 0: 15, 2: 19}
    width, full = bench_e2e.padded_widths(lengths, [2, 4], batch_size=2, gen_length=10)
    assert full == [(2, 19)] and width == {2: 19, 4: 19}
