"""The block-diffusion labels (sdar-*, trado-*, fast-dllm-v2-*, llada2-mini-*): their scripts and settings,
refusals before a model loads, and tiny random-weight checkpoints in each family's hub layout (the real
config.json with tiny sizes, two shards, a tokenizer) run end to end through the command line with the
zoo's decoders and the family's own."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REPO
from test_families import LING_SPECIALS, LING_TEMPLATE, write_hub_checkpoint

import custom_demask_eval as cde
from demask import core, networks

BLOCK_LABELS = [f"{prefix}-{task}" for prefix, *_ in cde.BLOCK_MODELS for task, *_ in cde.BLOCK_TASKS]
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2)


def real_config(folder):
    return json.load(open(os.path.join(FIXTURES, "model_files", folder, "config.json")))


def qwen_tokenizer(folder, tokenizer_config):
    """Qwen2.5's vocabulary (Dream's shipped vocab.json / merges.txt) with the checkpoint's own
    tokenizer_config.json (its added tokens, mask and chat template)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(FIXTURES, "model_files", "dream-v0-instruct-7b", name), folder)
    shutil.copy(os.path.join(FIXTURES, "model_files", tokenizer_config, "tokenizer_config.json"), folder)
    return networks.load_tokenizer(folder, "dream")


def block_checkpoint(folder, model):
    os.makedirs(folder)
    if model == cde.FAST_DLLM_V2:
        qwen_tokenizer(folder, "fast_dllm_v2_7b")
        config = {**real_config("fast_dllm_v2_7b"), **TINY, "bd_size": 4}
    elif model == cde.SDAR:
        tokenizer = qwen_tokenizer(folder, "sdar-4b-chat")
        tokenizer.save_pretrained(folder)  # the real checkpoint ships tokenizer.json: the LLaDA family's loader
        config = {**real_config("sdar-4b-chat"), **TINY, "head_dim": 16}
    else:
        from conftest import small_tokenizer
        tokenizer = small_tokenizer(folder, LING_SPECIALS, LING_TEMPLATE, mask_token="<|mask|>")
        config = dict(real_config("llada2.0-mini"), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, num_shared_experts=1, first_k_dense_replace=1,
                      vocab_size=len(tokenizer) + 4, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, block_size=4)
    write_hub_checkpoint(folder, config)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("block_hub")
    return {m: block_checkpoint(str(root / m.replace("/", "--")), m) for m in (cde.SDAR, cde.FAST_DLLM_V2, cde.LLADA2_MINI)}


def test_every_block_label_has_its_script_settings_and_checkpoint_size():
    assert len(BLOCK_LABELS) == 12
    for label in BLOCK_LABELS:
        path = os.path.join(REPO, "scripts", label.replace("-", "_") + ".sh")
        assert f"--label {label} " in open(path).read() and os.access(path, os.X_OK)
        run = cde.LABELS[label]
        assert run.gen_length % run.block_length == 0 and run.steps % run.n_blocks == 0
        assert networks.CHECKPOINT_BYTES[run.model] > 8e9 and networks.is_block_model(run.model)
    assert cde.LABELS["sdar-math"].block_length == 4 and cde.LABELS["llada2-mini-gsm8k"].block_length == 32


@pytest.mark.parametrize("args,message", [
    (["--label", "sdar-math", "--cache", "dual"], "keeps its own exact cache of finished blocks"),
    (["--label", "fast-dllm-v2-gsm8k", "--cache", "prefix"], "keeps its own exact cache of finished blocks"),
    (["--label", "trado-humaneval", "--steps", "7"], "not divisible by the number of blocks 64"),
    (["--label", "llada2-mini-math", "--decoder", "llada2", "--decoder_args", "bogus=1"], "no parameter(s) ['bogus']"),
    (["--label", "fast-dllm-v2-math", "--decoder", "fastdllm_v2", "--decoder_args", "sub_block=5"], "not a multiple of sub_block 5"),
])
def test_block_labels_reject_bad_settings_before_loading(monkeypatch, capsys, args, message):
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_local_block_checkpoint_is_refused_a_prefix_cache_before_loading(monkeypatch, capsys, checkpoints):
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "llada-math", "--model_path", checkpoints[cde.SDAR], "--cache", "prefix"])
    assert exit_info.value.code == 2 and "block-diffusion model" in capsys.readouterr().err


def test_loaded_block_checkpoints_read_their_ids_and_blocks(checkpoints):
    sdar = core.load_model(checkpoints[cde.SDAR], device="cpu")
    assert (sdar.family, sdar.block_size, sdar.mask_id) == ("llada", 4, 151669)  # config.json's mask_token_id
    fast = core.load_model(checkpoints[cde.FAST_DLLM_V2], device="cpu")
    assert (fast.family, fast.block_size, fast.net.shift) == ("dream", 4, 1)
    assert fast.mask_id == 151665 == fast.tokenizer.convert_tokens_to_ids("|<MASK>|")  # its added token
    assert fast.tokenizer.convert_tokens_to_ids("<|im_end|>") in fast.stop_ids
    llada2 = core.load_model(checkpoints[cde.LLADA2_MINI], device="cpu")
    assert llada2.mask_id == llada2.tokenizer.convert_tokens_to_ids("<|mask|>") and llada2.block_size == 4
    assert "mask_token_id" not in llada2.config


@pytest.mark.parametrize("label,decoder", [("sdar-gsm8k", "sdar"), ("sdar-math", "klass"),
                                           ("fast-dllm-v2-math", "fastdllm_v2"), ("fast-dllm-v2-humaneval", "threshold"),
                                           ("llada2-mini-gsm8k", "llada2"), ("llada2-mini-math", "confidence_greedy")])
def test_block_checkpoint_runs_through_the_command_line(tmp_path, checkpoints, label, decoder):
    extra = ["--decoder_args", "sub_block=2"] if decoder == "fastdllm_v2" else []
    metric = "pass@1" if "humaneval" in label else "accuracy"
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--label", label,
                          "--model_path", checkpoints[cde.LABELS[label].model], "--limit", "3", "--batch_size", "3",
                          "--gen_length", "16", "--steps", "16", "--block_length", "4", "--device", "cpu",
                          "--decoder", decoder, "--results_dir", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"^{re.escape(metric)}_{label}: \d\.\d{{4}}$", out.stdout, re.M)
    steps = float(re.search(rf"^avg_steps_{label}: (\S+)$", out.stdout, re.M).group(1))
    assert 4 <= steps <= 16 and f"n_samples_{label}: 3.0000" in out.stdout


def test_block_models_report_the_deviation_of_their_grid(tmp_path, checkpoints):
    """summary.json of a block model's run lists the block grid and the exact cache among its deviations."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--label", "sdar-gsm8k",
                          "--model_path", checkpoints[cde.SDAR], "--limit", "1", "--gen_length", "8", "--steps", "8",
                          "--block_length", "4", "--device", "cpu", "--decoder", "sdar", "--results_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.load(open(next(p for p in (tmp_path.rglob("summary.json")))))
    text = json.dumps(summary)
    assert "block grid starts at the generation" in text and "exact cache of finished blocks" in text


def test_lm_eval_loglikelihood_of_a_block_model_has_its_blocks_start_at_the_target(checkpoints):
    """lm-eval's Monte Carlo log-likelihood on a block-diffusion model: a one-token target is masked
    alone, so the estimate is log p(target | prefix) of the block-causal forward with the grid at the target."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -r requirements-lmeval.txt")
    from types import SimpleNamespace
    from demask import lmeval
    model = lmeval.DemaskLM(model=checkpoints[cde.SDAR], decoder="sdar", gen_length=16, steps=16, block_length=4,
                            batch_size=2, mc_num=4, mc_batch=2, device="cpu")
    context, continuation = "Tom has 3 apples and buys 5", " more"
    prefix, target = model.encode_pair(context, continuation)
    assert len(target) == 1
    x = torch.tensor([prefix + [model.lm.mask_id]])
    exact = torch.log_softmax(model.lm.logits(x, None, prompt_width=len(prefix))[0, -1], -1)[target[0]].item()
    elsewhere = torch.log_softmax(model.lm.logits(x, None, prompt_width=len(prefix) - 1)[0, -1], -1)[target[0]].item()
    (ll, _), = model.loglikelihood([SimpleNamespace(args=(context, continuation))])
    assert ll == pytest.approx(exact, abs=1e-5) and abs(ll - elsewhere) > 1e-3  # the grid matters
