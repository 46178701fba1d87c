"""Native LLaDA2.0 (demask/llada2.py) against golden logits of the authors' modeling code on a tiny
random configuration (tests/fixtures/llada2_tiny, see SOURCES.md): the block-causal forward with and
without left padding, upstream's KV-cached continuation, the forwards of --cache under the 4-D block
mask, the router's semantics, and the real-shape parameter counts of LLaDA2.0-mini."""
import json
import os

import torch
from safetensors.torch import load_file

from demask import llada2, moe, networks
from demask.blocknets import block_mask
from conftest import FIXTURES

TINY = os.path.join(FIXTURES, "llada2_tiny")
PROMPT_WIDTH = 32  # the fixtures' prompt width, one block of the default size


def tiny_net():
    net = llada2.LLaDA2MoE(json.load(open(os.path.join(TINY, "config.json"))))
    net.load_state_dict(load_file(os.path.join(TINY, "model.safetensors")), strict=True)
    return net.eval()


def cases():
    return load_file(os.path.join(TINY, "cases.safetensors"))


def every_position(x):
    return torch.arange(x.shape[1]).expand_as(x)


def key_mask_of(c, name):
    return c.get(f"{name}.key_mask", torch.ones_like(c[f"{name}.input_ids"], dtype=torch.bool))


def test_config_gives_the_interface():
    net = tiny_net()
    assert (net.shift, net.block_size, net.head_dim, net.rope_dim, net.theta) == (0, 32, 16, 8, 600000)
    assert [type(layer.mlp).__name__ for layer in net.model.layers] == ["SwiGLU", "SparseMoE", "SparseMoE"]
    assert net.model.layers[1].mlp.shared_experts.gate_proj.out_features == 2 * 12


def test_checkpoint_names_are_upstream_names():
    net = tiny_net()
    assert sorted(moe.checkpoint_names(net)) == sorted(load_file(os.path.join(TINY, "model.safetensors")))


def test_block_mask_is_the_mask_upstream_was_given():
    """Every query row that is not padding (the fixture's padding rows saw every key; ours see themselves:
    their outputs are never used)."""
    c = cases()
    for name in "ab":
        key_mask = key_mask_of(c, name)
        ours, given = block_mask(key_mask, PROMPT_WIDTH, 32), c[f"{name}.mask"]
        real = key_mask[:, None, :, None].expand_as(ours)
        assert torch.equal(ours[real], given[real])


def test_logits_match_upstream_block_causal_forward():
    """a: no padding (upstream generate's own mask); b: row 1 left-padded by 5. Padding rows are not
    compared (their outputs are never used)."""
    net, c = tiny_net(), cases()
    with torch.no_grad():
        for name in "ab":
            x = c[f"{name}.input_ids"]
            out = networks.forward_logits(net, x, c[f"{name}.positions"], c[f"{name}.mask"], every_position(x))
            real = key_mask_of(c, name)
            assert (out[real] - c[f"{name}.logits"][real]).abs().max() < 1e-4


def test_cached_block_matches_upstream_kv_cache():
    """Upstream prefilled its DynamicCache with the two finished blocks and then ran the current block;
    here the cache comes from a refresh in which the current block holds other tokens (block-causal
    attention keeps them out of the finished blocks' keys and values)."""
    net, c = tiny_net(), cases()
    done = int(c["c.done"])
    with torch.no_grad():
        for name in "ab":
            x, positions, mask = c[f"{name}.input_ids"], c[f"{name}.positions"], c[f"{name}.mask"]
            stale = x.clone()
            stale[:, done:] = 7
            _, keys, values, hidden = networks.refresh_forward(net, stale, positions, mask, every_position(x))
            computed = every_position(x)[:, done:]
            out = networks.cached_forward(net, x, positions, mask[:, :, done:], computed, keys, values, hidden,
                                          torch.arange(2), computed)
            assert (out - c[f"c{name}.logits"]).abs().max() < 1e-4


def test_refresh_and_cached_forward_equal_full_forward():
    """networks.refresh_forward + cached_forward of one block under the 4-D block mask give the full
    forward's logits, padded batch included."""
    net, c = tiny_net(), cases()
    x, positions, key_mask = c["b.input_ids"], c["b.positions"], c["b.key_mask"]
    mask = block_mask(key_mask, PROMPT_WIDTH, 32)
    with torch.no_grad():
        full = networks.forward_logits(net, x, positions, mask, every_position(x))
        refresh, keys, values, hidden = networks.refresh_forward(net, x, positions, mask, every_position(x))
        assert (refresh - full).abs().max() == 0
        for start in (0, 32, 64):
            computed = torch.arange(start, start + 32).expand(2, 32)
            rows = block_mask(key_mask, PROMPT_WIDTH, 32, computed)
            out = networks.cached_forward(net, x, positions, rows, every_position(x), keys, values, hidden,
                                          torch.arange(2), computed)
            assert (out - full)[key_mask].abs().max() < 1e-5


def test_prompt_off_the_block_grid_differs_from_upstream_grid():
    """A 30-token prompt: upstream's grid starts at position 0, the harness's at the generation. With
    upstream's mask the logits match; with the generation-aligned one the generated blocks differ."""
    net, c = tiny_net(), cases()
    x = c["d.input_ids"]
    q = every_position(x)
    with torch.no_grad():
        upstream_grid = networks.forward_logits(net, x, q, c["d.upstream_mask"], q)
        ours = networks.forward_logits(net, x, q, block_mask(torch.ones_like(x, dtype=torch.bool),
                                                             int(c["d.prompt_length"]), 32), q)
    assert (upstream_grid - c["d.logits"]).abs().max() < 1e-4
    assert (ours - c["d.logits"])[:, 30:].abs().max() > 1e-2


def test_router_group_limit_bias_and_weights():
    """On the fixture's layer-1 inputs: each token's experts lie in at most topk_group groups, the
    weights sum to routed_scaling_factor, and both the group limit and expert_bias change some choices
    against a plain top-k of the sigmoid scores (so the golden logits cover them)."""
    net, c = tiny_net(), cases()
    inputs = []
    hook = net.model.layers[1].mlp.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    with torch.no_grad():
        x = c["a.input_ids"]
        networks.forward_logits(net, x, c["a.positions"], c["a.mask"], every_position(x))
    hook.remove()
    router = net.model.layers[1].mlp.gate
    tokens = inputs[0].reshape(-1, inputs[0].shape[-1])
    experts, weights = router(tokens)
    groups = experts // (8 // router.n_group)
    assert max(len(set(row)) for row in groups.tolist()) <= router.topk_group
    torch.testing.assert_close(weights.sum(-1), torch.full((len(tokens),), 2.5))
    scores = torch.sigmoid(tokens @ router.weight.T)
    chosen = lambda e: e.sort(-1).values
    assert (chosen(scores.topk(3).indices) != chosen(experts)).any(1).sum() > 0
    unbiased_router = llada2.Router(net.config)
    unbiased_router.load_state_dict({"weight": router.weight, "expert_bias": torch.zeros(8)})
    assert (chosen(unbiased_router(tokens)[0]) != chosen(experts)).any(1).sum() > 0


def test_llada2_mini_real_shapes_and_active_parameters():
    """The reconstructed config of LLaDA2.0-mini: 16.26B parameters (the model card's 16B); per token
    1.43B with the embedding (the card's 1.4B active) and 789M without embedding and head (Ling-mini-2.0's
    published 789M non-embedding active)."""
    config = json.load(open(os.path.join(FIXTURES, "model_files", "llada2.0-mini", "config.json")))
    with torch.device("meta"):
        net = llada2.LLaDA2MoE(config)
    d, V, L, E = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"], config["num_experts"]
    hd, heads, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    attention = d * (heads + 2 * kv) * hd + heads * hd * d + 2 * hd + 2 * d
    expert = 3 * d * config["moe_intermediate_size"]
    sparse = E * expert + E * d + expert * config["num_shared_experts"]
    expected = 2 * V * d + d + L * attention + 3 * d * config["intermediate_size"] + (L - 1) * sparse
    total = sum(p.numel() for p in net.parameters())
    assert total == expected and round(total / 1e9, 1) == 16.3
    active = llada2.active_parameters(net)
    assert active == total - V * d - (L - 1) * (E - config["num_experts_per_tok"]) * expert
    assert round((active + V * d) / 1e9, 1) == 1.4 and round((active - V * d) / 1e6) == 789
    assert (net.shift, net.block_size, net.rope_dim) == (0, 32, 64)
    assert len(moe.checkpoint_names(net)) == 3 + L * 6 + 3 + (L - 1) * (2 + 3 * E + 3)  # 2: gate, expert_bias
