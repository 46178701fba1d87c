"""Native LLaDA / Dream against the upstream golden logits, checkpoint names and padding."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from demask import core
from demask import networks
from demask import tasks
from conftest import FIXTURES


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_golden_logits(family):
    model = core.load_model(os.path.join(FIXTURES, f"{family}_tiny"), device="cpu")
    cases = load_file(os.path.join(FIXTURES, f"{family}_tiny", "cases.safetensors"))
    suffix = "logits_shifted" if family == "dream" else "logits"
    a = model(cases["a.input_ids"]).logits
    torch.testing.assert_close(a, cases[f"a.{suffix}"], atol=1e-4, rtol=1e-4)

    mask = cases["b.attention_mask"]
    if family == "llada":  # upstream numbers every position, pads included
        b = model(cases["b.input_ids"], attention_mask=mask, positions=torch.arange(24).expand(2, 24)).logits
        torch.testing.assert_close(b, cases["b.logits"], atol=1e-4, rtol=1e-4)
        valid = mask.bool()
    else:
        b = model(cases["b.input_ids"], attention_mask=mask, positions=cases["b.position_ids"]).logits
        valid = torch.zeros_like(mask, dtype=torch.bool)
        valid[:, 1:] = mask[:, :-1].bool()
        torch.testing.assert_close(b[valid], cases[f"b.{suffix}"][valid], atol=1e-4, rtol=1e-4)
    # default positions (real tokens numbered from 0) give the same real-position logits
    default = model(cases["b.input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(default[valid], cases[f"b.{suffix}"][valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_query_rows_equal_full_rows(family):
    model = core.load_model(os.path.join(FIXTURES, f"{family}_tiny"), device="cpu")
    x = load_file(os.path.join(FIXTURES, f"{family}_tiny", "cases.safetensors"))["a.input_ids"]
    full = model(x).logits
    query = torch.tensor([[3, 7, 20], [0, 1, 23]])
    part = model(x, query_idx=query).logits
    torch.testing.assert_close(part, full.gather(1, query[..., None].expand(-1, -1, full.shape[-1])))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_left_padding_does_not_change_real_logits(family):
    model = core.load_model(os.path.join(FIXTURES, f"{family}_tiny"), device="cpu")
    x = load_file(os.path.join(FIXTURES, f"{family}_tiny", "cases.safetensors"))["a.input_ids"][:1, :18]
    alone = model(x).logits
    padded = torch.cat([torch.full((1, 6), model.pad_id), x], dim=1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 18)], dim=1)
    first = 1 if family == "dream" else 0  # Dream's row for the first real token has no predecessor
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 6 + first:], alone[:, first:],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("folder,family", [("llada-8b-instruct", "llada"), ("dream-v0-instruct-7b", "dream")])
def test_real_checkpoint_names_and_shapes(folder, family):
    """Full-size model on the meta device: its state_dict has exactly the checkpoint's names."""
    path = os.path.join(FIXTURES, "model_files", folder)
    config = json.load(open(os.path.join(path, "config.json")))
    assert networks.model_family(config) == family
    with torch.device("meta"):
        net = networks.MODEL_CLASSES[family](config)
    names = set(json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"])
    assert set(net.state_dict()) == names
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == {"llada": 8_015_581_184, "dream": 7_615_616_512}[family]


def test_dream_real_tokenizer_template_and_stop_ids():
    path = os.path.join(FIXTURES, "model_files", "dream-v0-instruct-7b")
    tok = networks.load_tokenizer(path, "dream")
    ids = tasks.encode_chat(tok, [{"role": "system", "content": tasks.CODE_SYSTEM}, {"role": "user", "content": "x"}])
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nYou complete only Python code.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
                    "<|im_start|>assistant\n")
    config = json.load(open(os.path.join(path, "config.json")))
    with torch.device("meta"):
        net = networks.Dream(config)
    model = core.DiffusionLM(SimpleNamespace(net=net, family="dream", tokenizer=tok, config=config,
                                            device=torch.device("cpu"), dtype=torch.float32))
    assert model.stop_ids == [151643, 151645] and model.mask_id == 151666


def test_llada_real_template_renders_like_llada():
    path = os.path.join(FIXTURES, "model_files", "llada-8b-instruct")
    template = json.load(open(os.path.join(path, "tokenizer_config.json")))["chat_template"]
    from conftest import save_tokenizer
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_tokenizer(d)
        tok = networks.load_tokenizer(d, "llada")
        tok.chat_template = template
        ids = tasks.encode_chat(tok, [{"role": "user", "content": " hi "}])
        assert tok.decode(ids) == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
