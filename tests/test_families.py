"""More model families (#29): native LLaDA-MoE against the golden logits of its upstream modeling
code, the MoE forward's paths (grouped, expert by expert, compiled, --cache), the checkpoints' real or
reconstructed configs and tokenizer files, and random-weight hub-layout checkpoints of every new
label's model run through the command line."""
import json
import os
import pytest
import torch
from safetensors.torch import load_file

from demask import core, moe, networks
from conftest import FIXTURES

MOE_SETS = ["llada_moe_tiny", "llada_moe_paths_tiny"]


def tiny_moe(name, dtype=None):
    return core.load_model(os.path.join(FIXTURES, name), device="cpu", dtype=dtype)


def cases(name):
    return load_file(os.path.join(FIXTURES, name, "cases.safetensors"))


# ---------------------------------------------------------------------------
# LLaDA-MoE against upstream


@pytest.mark.parametrize("name", MOE_SETS)
def test_moe_golden_logits(name):
    """Plain input (both upstream copies), and row 1 left-padded by 5 with upstream's attention mask,
    pads numbered like real tokens as upstream numbers them."""
    model, c = tiny_moe(name), cases(name)
    a = model(c["a.input_ids"]).logits
    torch.testing.assert_close(a, c["a.logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, c["a.logits_hub"], atol=1e-4, rtol=1e-4)
    mask = c["b.attention_mask"]
    b = model(c["b.input_ids"], attention_mask=mask, positions=torch.arange(24).expand(2, 24)).logits
    torch.testing.assert_close(b, c["b.logits"], atol=1e-4, rtol=1e-4)
    default = model(c["b.input_ids"], attention_mask=mask).logits  # real tokens numbered from 0
    torch.testing.assert_close(default[mask.bool()], c["b.logits"][mask.bool()], atol=1e-4, rtol=1e-4)


def test_moe_is_llada_family_with_its_own_network():
    model = tiny_moe("llada_moe_tiny")
    assert (model.family, type(model.net).__name__, model.net.shift) == ("llada", "LLaDAMoE", 0)
    assert model.mask_id == 300 and model.stop_ids == [301]


@pytest.mark.parametrize("name", MOE_SETS)
def test_grouped_experts_equal_expert_by_expert(name):
    model = tiny_moe(name)
    x = torch.randn(40, model.net.config["hidden_size"])
    for block in model.net.model.layers:
        if isinstance(block.mlp, moe.SparseMoE):
            experts = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
            weights = torch.rand(40, 2)
            grouped = block.mlp.experts(x, experts, weights)
            torch.testing.assert_close(grouped, block.mlp.experts.one_by_one(x, experts, weights))


def test_paths_set_exercises_every_path():
    """The second fixture runs what the real config leaves off: a dense layer, a shared expert,
    expert_bias, partial RoPE, grouped-query attention, biases, clip_qkv and a tied head."""
    net = tiny_moe("llada_moe_paths_tiny").net
    first, second = net.model.layers[0], net.model.layers[1]
    assert isinstance(first.mlp, moe.SwiGLU) and first.shared_expert is None
    assert second.shared_expert is not None and second.mlp.expert_bias.abs().sum() > 0
    assert (net.rope_dim, net.head_dim, second.self_attn.n_kv_heads, second.self_attn.clip) == (8, 16, 2, 3.0)
    assert second.self_attn.q_proj.bias is not None
    assert net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(os.path.join(FIXTURES, "llada_moe_paths_tiny", "model.safetensors"))


@pytest.mark.parametrize("name", MOE_SETS)
def test_moe_query_rows_and_left_padding(name):
    model = tiny_moe(name)
    x = cases(name)["a.input_ids"]
    full = model(x).logits
    query = torch.tensor([[3, 7, 20], [0, 1, 23]])
    torch.testing.assert_close(model(x, query_idx=query).logits,
                               full.gather(1, query[..., None].expand(-1, -1, full.shape[-1])))
    alone = model(x[:1, :18]).logits
    padded = torch.cat([torch.full((1, 6), model.pad_id), x[:1, :18]], dim=1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 18)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 6:], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_moe_cache_forwards_match_the_exact_forward():
    net = tiny_moe("llada_moe_paths_tiny").net
    x = cases("llada_moe_paths_tiny")["a.input_ids"]
    positions, query = torch.arange(24).expand(2, 24), torch.arange(16, 24).expand(2, 8)
    logits, keys, values, hidden = networks.refresh_forward(net, x, positions, None, query)
    torch.testing.assert_close(logits, networks.forward_logits(net, x, positions, None, query))
    assert keys.shape == (3, 2, 2, 24, 16)
    cache = networks.KVCache(2)
    cache.store(torch.tensor([0, 1]), keys, values, hidden)
    rows, computed = torch.tensor([1, 0]), torch.arange(12, 24).expand(2, 12)
    cached = networks.cached_forward(net, x[rows], positions[rows], None, query[rows], cache.keys, cache.values,
                                     cache.hidden, rows, computed)
    torch.testing.assert_close(cached, logits[rows], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiled_moe_blocks_in_bf16_stay_as_close_to_fp32_as_eager():
    """The GPU path compiles the blocks (grouped matmuls in bf16): on the CPU its logits are as close to
    the fp32 forward as the eager bf16 forward's."""
    x = cases("llada_moe_tiny")["a.input_ids"]
    positions = torch.arange(24).expand(2, 24)
    reference = networks.forward_logits(tiny_moe("llada_moe_tiny").net, x, positions, None, positions)
    net = tiny_moe("llada_moe_tiny", dtype=torch.bfloat16).net
    eager = networks.forward_logits(net, x, positions, None, positions).float()
    compiled = networks.forward_logits(net, x, positions, None, positions,
                                       blocks=[torch.compile(b, dynamic=True) for b in net.parts()[1]]).float()
    for out in (compiled, eager):
        assert ((out - reference).norm() / reference.norm()).item() < 0.03


# ---------------------------------------------------------------------------
# The real checkpoints' configs and tokenizer files


def real_config(folder):
    return json.load(open(os.path.join(FIXTURES, "model_files", folder, "config.json")))


def test_llada_moe_real_shapes_and_active_parameters():
    """The (reconstructed) config of LLaDA-MoE-7B-A1B-Instruct: 7.36B parameters, 1.40B of them active
    per token (the model card's 7B total, 1.4B active), 3219 checkpoint tensors."""
    config = real_config("llada-moe-7b-a1b-instruct")
    assert networks.model_architecture(config) == "llada_moe" and networks.model_family(config) == "llada"
    with torch.device("meta"):
        net = moe.LLaDAMoE(config)
    assert sum(p.numel() for p in net.parameters()) == 7_356_880_896
    assert moe.active_parameters(config) == 1_397_751_808
    names = moe.checkpoint_names(net)
    assert len(names) == len(set(names)) == 16 * (9 + 64 * 3) + 3
    assert "model.layers.15.mlp.experts.63.down_proj.weight" in names and "lm_head.weight" in names
    assert networks.CHECKPOINT_BYTES["inclusionAI/LLaDA-MoE-7B-A1B-Instruct"] == 2 * 7_356_880_896


def test_model_type_lladamoe_of_dllm_copies_is_the_moe_too():
    config = dict(real_config("llada-moe-7b-a1b-instruct"), model_type="lladamoe")
    assert networks.model_architecture(config) == "llada_moe"
    assert networks.model_architecture(real_config("llada-8b-instruct")) == "llada"


# ---------------------------------------------------------------------------
# Random-weight checkpoints in the hub's layout (config.json, index, two shards, tokenizer) of each new
# label's model, loaded through the command line

NEW_LABELS = ["llada15-math", "llada15-gsm8k", "llada15-humaneval", "llada15-mbpp", "llada-base-math",
              "llada-base-gsm8k", "dreamcoder-humaneval", "dreamcoder-mbpp", "diffucoder-humaneval", "diffucoder-mbpp",
              "llada-moe-math", "llada-moe-humaneval", "llada-moe-gsm8k"]
TINY_SHAPES = {
    "llada": dict(d_model=64, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, n_layers=2),
    "dream": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2),
}
LING_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"]
# Ling's chat format (inclusionAI) as the stand-in tokenizer renders it; the real checkpoint brings its own.
LING_TEMPLATE = ("{% for m in messages %}<role>{{ {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'}"
                 "[m['role']] }}</role>{{ m['content'] }}<|role_end|>{% endfor %}<role>ASSISTANT</role>")


def bench_e2e():
    import sys
    from conftest import REPO
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import bench_e2e as module
    return module


def checkpoint_state(config):
    """Random weights under the official names (LLaDA-MoE's experts one tensor each; no head when tied)."""
    architecture = networks.model_architecture(config)
    torch.manual_seed(0)
    net = networks.network_class(architecture)(config)
    state = {k: (1 + 0.1 * torch.randn_like(v)) if "norm" in k else 0.3 * torch.randn_like(v)
             for k, v in net.state_dict().items()}
    for key in list(state):
        head, _, name = key.rpartition(".")
        if head.endswith("mlp.experts") and name in moe.EXPERT_PROJECTIONS:
            state.update({f"{head}.{j}.{name}.weight": t for j, t in enumerate(state.pop(key))})
    if architecture == "llada_moe":
        assert sorted(state) == sorted(moe.checkpoint_names(net))
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    return state


def write_hub_checkpoint(folder, config):
    from safetensors.torch import save_file
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=2)
    state = checkpoint_state(config)
    keys = sorted(state)
    files = {k: f"model-{1 + (i >= len(keys) // 2):05d}-of-00002.safetensors" for i, k in enumerate(keys)}
    for name in sorted(set(files.values())):
        save_file({k: state[k].contiguous() for k in keys if files[k] == name}, os.path.join(folder, name))
    index = dict(metadata=dict(total_size=sum(4 * t.numel() for t in state.values())), weight_map=files)
    json.dump(index, open(os.path.join(folder, "model.safetensors.index.json"), "w"), indent=2)


def ling_tokenizer(folder):
    """A small BPE tokenizer with Ling's special tokens and chat format (LLaDA-MoE's real one is not here)."""
    from conftest import small_tokenizer
    return small_tokenizer(folder, LING_SPECIALS, LING_TEMPLATE, mask_token="<|mask|>")


def new_checkpoint(folder, model):
    """The tiny hub-layout checkpoint standing in for `model` (a label's hub id)."""
    import custom_demask_eval as cde
    e2e = bench_e2e()
    os.makedirs(folder)
    if model == cde.LLADA_MOE:
        tokenizer = ling_tokenizer(folder)
        config = dict(real_config("llada-moe-7b-a1b-instruct"), hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=4, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                      expert_intermediate_size=32, moe_layer_freq=[1, 1], vocab_size=len(tokenizer) + 4,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    elif model in (cde.LLADA15, cde.LLADA_BASE):
        tokenizer = e2e.llada_tokenizer()
        if model == cde.LLADA_BASE:
            tokenizer.chat_template = None
        tokenizer.save_pretrained(folder)
        config = {**real_config("llada-8b-instruct"), **TINY_SHAPES["llada"]}
    else:
        import shutil
        for name in e2e.DREAM_TOKENIZER_FILES:
            shutil.copy(e2e.real_file("dream", name), folder)
        if model == cde.DIFFUCODER:
            tokenizer = networks.load_tokenizer(folder, "dream")
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|dlm_pad|>"]})
            tokenizer.save_pretrained(folder)
        config = {**real_config("dream-v0-instruct-7b"), **TINY_SHAPES["dream"]}
    write_hub_checkpoint(folder, config)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import custom_demask_eval as cde
    root = tmp_path_factory.mktemp("hub")
    return {m: new_checkpoint(str(root / m.replace("/", "--")), m)
            for m in (cde.LLADA15, cde.LLADA_BASE, cde.DREAM_CODER, cde.DIFFUCODER, cde.LLADA_MOE)}


def test_every_new_label_has_its_script_and_a_known_checkpoint_size():
    import custom_demask_eval as cde
    from conftest import REPO
    for label in NEW_LABELS:
        path = os.path.join(REPO, "scripts", label.replace("-", "_") + ".sh")
        assert f"--label {label} " in open(path).read() and os.access(path, os.X_OK)
        run = cde.LABELS[label]
        assert run.gen_length % run.block_length == 0 and run.steps % run.n_blocks == 0
        assert networks.CHECKPOINT_BYTES[run.model] > 1e10


@pytest.mark.parametrize("args,message", [
    (["--label", "llada15-math", "--steps", "1001"], "not divisible by the number of blocks 8"),
    (["--label", "llada-moe-gsm8k", "--gen_length", "100"], "not divisible by block_length"),
    (["--label", "diffucoder-mbpp", "--decoder", "klass", "--decoder_args", "bogus=1"], "no parameter(s) ['bogus']"),
    (["--label", "llada-base-math", "--model_path", "/no/such/model"], "model path '/no/such/model' not found"),
])
def test_new_labels_reject_bad_settings_before_loading(monkeypatch, capsys, args, message):
    import custom_demask_eval as cde
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("label,metric", [("llada15-gsm8k", "accuracy"), ("llada-base-math", "accuracy"),
                                          ("dreamcoder-humaneval", "pass@1"), ("diffucoder-mbpp", "pass@1"),
                                          ("llada-moe-math", "accuracy")])
def test_hub_layout_checkpoint_runs_through_the_command_line(tmp_path, checkpoints, label, metric):
    import re
    import subprocess
    import sys
    import custom_demask_eval as cde
    from conftest import REPO
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--label", label,
                          "--model_path", checkpoints[cde.LABELS[label].model], "--limit", "2", "--batch_size", "1",
                          "--gen_length", "16", "--steps", "16", "--block_length", "16", "--device", "cpu",
                          "--decoder", "confidence_greedy", "--results_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"^{re.escape(metric)}_{label}: \d\.\d{{4}}$", out.stdout, re.M)
    assert f"avg_steps_{label}: 16.0000" in out.stdout and f"n_samples_{label}: 2.0000" in out.stdout


def test_loaded_checkpoints_read_their_ids_templates_and_stops(checkpoints):
    import custom_demask_eval as cde
    from demask import tasks
    moe_lm = core.load_model(checkpoints[cde.LLADA_MOE], device="cpu")
    tok = moe_lm.tokenizer
    assert moe_lm.family == "llada" and "mask_token_id" not in moe_lm.config
    assert moe_lm.mask_id == tok.convert_tokens_to_ids("<|mask|>")  # from the tokenizer: not in config.json
    assert moe_lm.stop_ids == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|role_end|>")])
    ids = tasks.encode_chat(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert tok.decode(ids) == "<role>SYSTEM</role>S<|role_end|><role>HUMAN</role>Q<|role_end|><role>ASSISTANT</role>"

    base = core.load_model(checkpoints[cde.LLADA_BASE], device="cpu")
    ids = tasks.encode_chat(base.tokenizer, [{"role": "system", "content": " S "}, {"role": "user", "content": "Q"}])
    assert base.tokenizer.decode(ids) == "<|startoftext|>S\n\nQ\n\n"  # no chat template: the plain prompt
    instruct = core.load_model(checkpoints[cde.LLADA15], device="cpu")
    assert (instruct.mask_id, instruct.stop_ids) == (126336, [126081, 126348])

    diffucoder = core.load_model(checkpoints[cde.DIFFUCODER], device="cpu")
    assert diffucoder.mask_id == 151666 and diffucoder.stop_ids == [151643, 151645, 151667]  # <|dlm_pad|> stops
    assert os.path.exists(os.path.join(checkpoints[cde.DIFFUCODER], "chat_template.jinja"))  # as DiffuCoder ships it
    ids = tasks.encode_chat(diffucoder.tokenizer, [{"role": "user", "content": "Q"}])
    assert diffucoder.tokenizer.decode(ids).endswith("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    assert core.load_model(checkpoints[cde.DREAM_CODER], device="cpu").stop_ids == [151643, 151645]


def test_throughput_bench_counts_only_the_routed_experts():
    """bench_throughput's FLOP bound for LLaDA-MoE: per token, all 2-D block weights plus top_k of the
    num_experts experts of each layer, i.e. the active parameters less the head's (counted apart)."""
    import sys
    from conftest import REPO
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import bench_throughput
    config = bench_throughput.CONFIGS["llada_moe"]
    with torch.device("meta"):
        blocks = moe.LLaDAMoE(config).parts()[1]
    active = bench_throughput.active_linear_params(blocks)
    assert active == moe.active_parameters(config) - config["hidden_size"] * config["vocab_size"] == 1_075_838_976
    with torch.device("meta"):
        dense = networks.LLaDA(bench_throughput.CONFIGS["llada"]).parts()[1]
    assert bench_throughput.active_linear_params(dense) == sum(p.numel() for p in dense.parameters() if p.dim() == 2)


def test_e2e_bench_writes_and_runs_llada_moe(tmp_path):
    """bench_e2e at LLaDA-MoE's real shapes plans the hub's 3 shards of 3219 tensors (14.71 GB bf16); at
    tiny shapes it writes the checkpoint and runs llada-moe-math through its script."""
    import subprocess
    import sys
    from conftest import REPO
    e2e = bench_e2e()
    config = e2e.model_config("llada_moe", "real")
    index = e2e.shard_plan("llada_moe", config, e2e.parameter_shapes("llada_moe", config))
    assert len(index["weight_map"]) == 3219 and index["metadata"]["total_size"] == 14_713_761_792
    assert len(set(index["weight_map"].values())) == 3
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_e2e.py"), "--labels", "llada-moe-math",
                          "--shapes", "tiny", "--limit", "2", "--device", "cpu", "--workdir", str(tmp_path),
                          "--json", str(tmp_path / "e2e.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.load(open(tmp_path / "e2e.json"))["rows"]
    assert (row["label"], row["rc"], row["n"], row["avg_steps"]) == ("llada-moe-math", 0, 2, 16.0)
