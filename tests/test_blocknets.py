"""SDAR and Fast-dLLM v2 (demask/blocknets.py) against the logits of the upstream modeling code (golden
fixtures sdar_tiny/ and fastdllm_v2_tiny/, see SOURCES.md), the cached forwards against the full one, and the
real checkpoints' shapes."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from demask import networks
from demask.blocknets import BLOCK_ARCHITECTURES, FastDLLMv2, SDAR, block_mask

FAMILIES = {"sdar_tiny": SDAR, "fastdllm_v2_tiny": FastDLLMv2}
REAL = {"sdar-4b-chat": ("SDAR-4B-Chat", SDAR, 4), "sdar-8b-chat": ("SDAR-8B-Chat", SDAR, 4),
        "fast_dllm_v2_7b": ("Fast_dLLM_v2_7B", FastDLLMv2, 32)}


def load_tiny(name):
    folder = os.path.join(FIXTURES, name)
    net = FAMILIES[name](json.load(open(os.path.join(folder, "config.json")))).eval()
    net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    return net, load_file(os.path.join(folder, "cases.safetensors"))


def raw_rows(net, rows):
    """query_idx whose logits are the head of the hidden states at padded indices `rows` (upstream's
    logits, unshifted)."""
    return rows + net.shift


def every_row(x):
    return torch.arange(x.shape[1]).expand_as(x)


def inputs(cases, case):
    """(tokens, key_mask or None, positions, prompt width) of a case."""
    x = cases[f"{case}.input_ids"]
    key_mask = cases.get(f"{case}.key_mask")
    positions = cases[f"{case}.positions"] if key_mask is not None else every_row(x)
    return x, key_mask, positions, int(cases[f"{case}.prompt_width"])


def full_mask(net, x, key_mask, prompt_width):
    return block_mask(key_mask, prompt_width, net.block_size, length=x.shape[1]).expand(x.shape[0], -1, -1, -1)


def test_block_mask_values():
    """Prompt width 3, blocks of 2: indices 0..2 are blocks -2, -1, -1 (the prompt's first block partial) and
    3..5 blocks 0, 0, 1; row 1 has one pad at index 0, which is never attended but attends itself."""
    key_mask = torch.tensor([[True] * 6, [False] + [True] * 5])
    m = block_mask(key_mask, 3, 2)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], expected)
    padded = expected.clone()
    padded[:, 0] = False
    padded[0, 0] = True
    assert torch.equal(m[1, 0], padded)
    rows = block_mask(key_mask, 3, 2, query_idx=torch.tensor([[3, 5], [4, 0]]))
    assert torch.equal(rows[0, 0], expected[[3, 5]]) and torch.equal(rows[1, 0], padded[[4, 0]])
    assert torch.equal(block_mask(None, 3, 2, length=6)[0, 0], expected)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", ["a", "b"])
def test_golden_logits(name, case):
    """a: no padding; b: row 1 left-padded by 5 (the upstream model run under the same 4-D mask)."""
    net, cases = load_tiny(name)
    x, key_mask, positions, prompt_width = inputs(cases, case)
    with torch.no_grad():
        logits = networks.forward_logits(net, x, positions, full_mask(net, x, key_mask, prompt_width),
                                         raw_rows(net, every_row(x)))
    real = key_mask if key_mask is not None else torch.ones_like(x, dtype=torch.bool)
    assert (logits - cases[f"{case}.logits"])[real].abs().max() < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", ["a", "b"])
def test_cached_continuation(name, case):
    """The finished blocks' keys and values kept by refresh_forward, then only the current block computed:
    equal to upstream's own cached forward (prefill stored in its cache, then the block) and to the full forward."""
    net, cases = load_tiny(name)
    x, key_mask, positions, prompt_width = inputs(cases, case)
    B, S, start = x.shape[0], net.block_size, int(cases[f"c{case}.cached"])
    current = torch.arange(start, start + S).expand(B, S)
    with torch.no_grad():
        full, keys, values, hidden = networks.refresh_forward(
            net, x, positions, full_mask(net, x, key_mask, prompt_width), raw_rows(net, every_row(x)))
        query_mask = block_mask(key_mask, prompt_width, S, query_idx=current, length=x.shape[1]).expand(B, -1, -1, -1)
        cached = networks.cached_forward(net, x, positions, query_mask, raw_rows(net, current), keys, values, hidden,
                                         torch.arange(B), current)
    assert (cached - cases[f"c{case}.logits"]).abs().max() < 1e-4
    assert (cached - full[:, start:start + S]).abs().max() < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_not_a_multiple_of_the_block(name):
    """Upstream aligns blocks at position 0; ours at the generation start. With a prompt length that is not
    a multiple of the block size the two differ; with the grid moved to 0 ours gives upstream's logits."""
    net, cases = load_tiny(name)
    x, _, positions, prompt_width = inputs(cases, "d")
    assert prompt_width % net.block_size != 0
    with torch.no_grad():
        at_zero, at_prompt = (networks.forward_logits(net, x, positions, full_mask(net, x, None, width),
                                                      raw_rows(net, every_row(x))) for width in (0, prompt_width))
    assert (at_zero - cases["d.logits"]).abs().max() < 1e-4
    assert (at_prompt - cases["d.logits"]).abs().max() > 1e-1


@pytest.mark.parametrize("folder", REAL)
def test_real_checkpoint_shapes(folder):
    """Built on the meta device from the real config.json: the parameter names of model.safetensors.index.json,
    and as many parameters as its total_size holds in bf16 (2 bytes each)."""
    name, cls, block_size = REAL[folder]
    path = os.path.join(FIXTURES, "model_files", folder)
    config = json.load(open(os.path.join(path, "config.json")))
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert BLOCK_ARCHITECTURES[config["model_type"].lower()] is cls
    with torch.device("meta"):
        net = cls(config)
    assert set(dict(net.named_parameters())) == set(index["weight_map"])
    assert 2 * sum(p.numel() for p in net.parameters()) == index["metadata"]["total_size"]
    assert net.block_size == block_size


@pytest.mark.parametrize("tiny, real", [("sdar_tiny", "sdar-4b-chat"), ("fastdllm_v2_tiny", "fast_dllm_v2_7b")])
def test_tiny_config_has_the_real_layout(tiny, real):
    tiny_config = json.load(open(os.path.join(FIXTURES, tiny, "config.json")))
    real_config = json.load(open(os.path.join(FIXTURES, "model_files", real, "config.json")))
    assert list(tiny_config) == list(real_config)
    assert tiny_config["model_type"] == real_config["model_type"]
