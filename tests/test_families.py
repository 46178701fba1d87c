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
