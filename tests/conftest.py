"""Shared test helpers: tiny random-weight LLaDA / Dream folders with a real BPE tokenizer."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")   # everything the tests read ships here (see SOURCES.md)
sys.path.insert(0, REPO)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses too: tiny models are faster on one thread
torch.set_num_threads(1)

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLADA_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                  "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                  "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                  "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
CORPUS = ["The final answer is \\boxed{42}. So 3 + 4 = 7 and 12 * 3 = 36.",
          "def add(a, b):\n    return a + b\n", "Tom has 3 apples and buys 5 more. How many apples?",
          "Your task is to answer the question below. Give step by step reasoning.",
          "You complete only Python code. The quick brown fox jumps over the lazy dog."] * 4


def small_tokenizer(folder, specials=None, chat_template=None, **tokens):
    """A 400-token BPE of CORPUS with `specials` (default SPECIALS), saved in `folder`; `tokens` name
    more special tokens (mask_token=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import transformers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials or SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>", **tokens)
    fast.chat_template = chat_template or LLADA_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def save_tokenizer(folder):
    return len(small_tokenizer(folder))


def make_tiny_model(folder, family, seed=0):
    """A random-weight model in the real on-disk format of `family`, with a tokenizer."""
    from safetensors.torch import save_file
    from demask import networks
    os.makedirs(folder, exist_ok=True)
    n_tokens = save_tokenizer(folder)
    config = json.load(open(os.path.join(FIXTURES, f"{family}_tiny", "config.json")))
    vocab = n_tokens + 7  # padded logit width, like the real models
    if family == "llada":
        config.update(vocab_size=vocab, embedding_size=vocab)
    else:
        config.update(vocab_size=vocab)
    config.update(mask_token_id=2, eos_token_id=1, pad_token_id=1)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    torch.manual_seed(seed)
    net = networks.MODEL_CLASSES[family](config)
    state = {k: (1 + 0.1 * torch.randn_like(v)) if "norm" in k else 0.3 * torch.randn_like(v)
             for k, v in net.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llada")), "llada")


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_dream")), "dream")
