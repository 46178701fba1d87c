"""The block-diffusion families' decoders (demask/blockdecoders.py): parity with the authors' generate
functions on recorded outputs (tests/fixtures/{sdar,llada2,fastdllm_v2}_generate_upstream.json), the
commit rules on hand-made cases, batches equal to their rows alone; and each decoder through the harness
on its family's tiny network against the same functions run on the authors' modeling code with the same
weights (`tiny_network` in the same files).

The recorded outputs come from the authors' generate functions run unmodified in /tmp on
`ToyBlockLM`, a tiny deterministic block-causal language model defined here: a row's logits are a
fixed random function of its own token and position and of the tokens it attends to, and the same
numbers come out whether the visible tokens arrive as a full sequence or as a stored prefix plus the
current block (every key sits in a slot indexed by its position). So one toy answers the upstream
calling conventions (full prefix with a block mask, KV-cache prefill plus current block) and our
decoders' model handle (`ToyHandle`, blocks aligned at the generation start), and the parity covers
the decoding rules alone; the networks' block-causal logits are checked by their own tests.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import custom_demask_eval as cde
from demask import blockdecoders, core, decoders
from conftest import FIXTURES


class ToyBlockLM:
    """vocab ids 0 .. vocab-1; `mask_id` is never predicted (its logit is -1e4); `eos_bias` raises the
    logit of `eos_id` so that some generations stop."""

    def __init__(self, vocab=48, mask_id=47, eos_id=1, dim=16, max_len=160, scale=5.0, eos_bias=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.mask_id, self.eos_id, self.max_len = vocab, mask_id, eos_id, max_len
        self.embed = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.place = torch.randn(max_len, dim, generator=g, dtype=torch.float64) * 0.5
        self.out = torch.randn(dim, vocab, generator=g, dtype=torch.float64) * scale / dim ** 0.5
        self.bias = torch.zeros(vocab, dtype=torch.float64)
        self.bias[eos_id] = eos_bias

    def rows(self, tokens, positions, visible, query):
        """tokens, positions [B, T] (keys); visible [B, Q, T] bool; query [B, Q] key index of each row.
        Returns float32 logits [B, Q, vocab]."""
        B, T = tokens.shape
        slots = torch.zeros(B, self.max_len, self.embed.shape[1], dtype=torch.float64)
        weight = torch.zeros(B, query.shape[1], self.max_len, dtype=torch.float64)
        state = self.embed[tokens] + self.place[positions]
        for b in range(B):
            slots[b, positions[b]] = state[b]
            row_pos = positions[b, query[b]]
            near = torch.exp(-(row_pos[:, None] - positions[b][None]).abs().double() / 3.0)
            weight[b][:, positions[b]] = torch.where(visible[b], near, 0.0)
        context = (weight[..., None] * slots[:, None]).sum(-2)
        own = state.gather(1, query[..., None].expand(-1, -1, state.shape[-1]))
        logits = (own + torch.tanh(context)) @ self.out + self.bias
        logits[..., self.mask_id] = -1e4
        return logits.float()


class ToyHandle:
    """What our decoders see: model(x, attention_mask=None, query_idx=None, positions=None).logits with
    the block grid aligned at the generation start (prompt width P, block size S): key k is visible to
    row r iff it is not padding and block(k) <= block(r), block(k) = floor((k - P) / S). `shift` 1 gives
    query q the logits of row q - 1 (Fast-dLLM v2). `inputs` keeps each forward's input."""

    def __init__(self, toy, prompt_mask, block_size, shift=0, family="toy"):
        self.toy, self.prompt_mask, self.block_size, self.shift = toy, prompt_mask.bool(), block_size, shift
        self.mask_id, self.n_tokens, self.vocab_size = toy.mask_id, toy.vocab, toy.vocab
        self.device, self.family, self.stop_ids = torch.device("cpu"), family, (toy.eos_id,)
        self.inputs = []

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        self.inputs.append(x.clone())
        B, T = x.shape
        P = self.prompt_mask.shape[1]
        key_mask = torch.nn.functional.pad(self.prompt_mask, (0, T - P), value=True)
        positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        query = torch.arange(T).expand(B, T) if query_idx is None else query_idx
        row = (query - self.shift).clamp(min=0)
        block = torch.div(torch.arange(T) - P, self.block_size, rounding_mode="floor")
        visible = key_mask[:, None, :] & (block[None, None, :] <= block[row][..., None])
        return SimpleNamespace(logits=self.toy.rows(x, positions, visible, row))


# ---------------------------------------------------------------- parity with the authors' generate functions

EOS = 1


def fixture(family):
    with open(os.path.join(FIXTURES, f"{family}_generate_upstream.json")) as f:
        return json.load(f)


def our_arguments(family, s):
    """(decoder_args, gen_length, steps, block_length) of a recorded upstream setting."""
    if family == "fastdllm_v2":
        args = dict(temperature=s["temperature"], top_p=s["top_p"], threshold=s["threshold"],
                    sub_block=s["small_block_size"])
        return args, s["max_new_tokens"], s["max_new_tokens"], s["block_size"]
    per_block = s["denoising_steps"] if family == "sdar" else s["steps"]
    args = dict(temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], threshold=s["threshold"])
    return args, s["gen_length"], per_block * s["gen_length"] // s["block_length"], s["block_length"]


def until_stop(ids):
    return ids[:ids.index(EOS) + 1] if EOS in ids else ids


def decode(family, toy, prompts, s, seed):
    """Our decoder on left-padded `prompts` as one batch; returns (generations cut after the first EOS,
    forwards each row needed until its block holding that EOS was full) and the handle."""
    args, gen_length, steps, block = our_arguments(family, s)
    decoder = decoders.build_decoder(family, toy.mask_id, {}, args)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    handle = ToyHandle(toy, mask, block, shift=1 if family == "fastdllm_v2" else 0)
    torch.manual_seed(seed)
    x, _ = decoder.decode(handle, ids, gen_length, steps, block)
    gens = [until_stop(row) for row in x[:, width:].tolist()]
    forwards = []
    for row, gen in enumerate(gens):
        end = -(-len(gen) // block) * block
        forwards.append(sum(int((state[row, width:width + end] == toy.mask_id).any()) for state in handle.inputs))
    return gens, forwards


def upstream_extra(family, gen, setting):
    """Forwards the authors' function makes besides ours: SDAR a prefill and one store per finished
    block; Fast-dLLM v2 reads a block's first token from the forward that stores the previous block
    (the prefill for the first block) where ours spends the block's first forward on it, so it makes one
    more only when it runs to the end (it skips the store after the block that holds EOS); LLaDA2.0
    none (it recomputes the prefix every step)."""
    if family == "sdar":
        return 1 + -(-len(gen) // setting["block_length"])
    return int(family == "fastdllm_v2" and EOS not in gen)


CASES = [(f, i) for f, n in (("sdar", 3), ("llada2", 3), ("fastdllm_v2", 2)) for i in range(n)]


@pytest.mark.parametrize("family,run", CASES)
def test_same_tokens_as_upstream_one_prompt_at_a_time(family, run):
    """Every prompt alone (as the authors' functions decode), with the recorded seed: the same tokens up to
    the first EOS, and the recorded model calls less `upstream_extra`. The last prompt's length is not a
    multiple of the block size: the authors' grid starts at position 0, ours at the generation, and that
    case is only recorded (tests below check it differs as documented, or not at all)."""
    data = fixture(family)
    toy = ToyBlockLM(**data["toy"])
    recorded = data["runs"][run]
    s = recorded["settings"]
    aligned = [i for i, p in enumerate(data["prompts"]) if len(p) % our_arguments(family, s)[3] == 0]
    assert aligned == list(range(12))
    for i in aligned:
        gens, forwards = decode(family, toy, [data["prompts"][i]], s, s["seed"] + i)
        assert gens[0] == recorded["tokens"][i], (family, s["name"], i)
        assert forwards[0] == recorded["model_calls"][i] - upstream_extra(family, gens[0], s)


@pytest.mark.parametrize("family,run", [("sdar", 0), ("sdar", 1), ("llada2", 0), ("llada2", 1), ("fastdllm_v2", 0)])
def test_greedy_batch_of_four_equals_upstream(family, run):
    """Greedy settings: prompts of different lengths left-padded in batches of four give each prompt's
    upstream tokens."""
    data = fixture(family)
    toy = ToyBlockLM(**data["toy"])
    recorded = data["runs"][run]
    assert recorded["settings"]["name"].startswith("greedy")
    for start in range(0, 12, 4):
        gens, _ = decode(family, toy, data["prompts"][start:start + 4], recorded["settings"], 0)
        assert gens == recorded["tokens"][start:start + 4]


@pytest.mark.parametrize("family,run", CASES)
def test_unaligned_prompt_differs_from_upstream_grid(family, run):
    """The recorded prompt of 19 tokens (not a multiple of the block size): the authors' first generated
    block holds the prompt's last 19 mod S tokens, ours starts at the generation, so the attention
    differs from the first generated token on and so do the tokens (recorded to document the grid)."""
    data = fixture(family)
    prompt, recorded = data["prompts"][12], data["runs"][run]
    s = recorded["settings"]
    assert len(prompt) == 19 and len(prompt) % our_arguments(family, s)[3]
    gens, _ = decode(family, ToyBlockLM(**data["toy"]), [prompt], s, s["seed"] + 12)
    assert gens[0] != recorded["tokens"][12]


@pytest.mark.parametrize("run", [0, 1])
def test_sdar_through_the_harness_on_the_tiny_sdar_network(run):
    """The harness's decode path (block-causal handle, exact cache of finished blocks, rule checks) with
    the tiny SDAR checkpoint gives the authors' tokens, greedy and sampled, each prompt alone; forwards
    are the authors' calls less the prefill and one store per block."""
    data = fixture("sdar")["tiny_network"]
    lm = core.load_model(os.path.join(FIXTURES, "sdar_tiny"), device="cpu")
    recorded = data["runs"][run]
    s = recorded["settings"]
    args, gen_length, steps, block = our_arguments("sdar", s)
    run_settings = cde.LABELS["tiny-math"].replace(gen_length=gen_length, steps=steps, block_length=block)
    decoder = decoders.build_decoder("sdar", lm.mask_id, run_settings, args)
    for i, prompt in enumerate(data["prompts"]):
        gens, counted, _ = core.decode_batch(run_settings, lm, decoder, [dict(id=i, prompt_ids=prompt)], seed=s["seed"] + i)
        cut = gens[0][:gens[0].index(lm.stop_ids[0]) + 1] if lm.stop_ids[0] in gens[0] else gens[0]
        assert cut == recorded["tokens"][i]
        assert counted[0] == recorded["model_calls"][i] - 1 - gen_length // block


def test_dynamic_commit_by_hand():
    """Row 0: two candidates above 0.9 and k 2, both go; row 1: one above 0.9 but k 2, so the top two;
    row 2: k 1 and none above, the best alone. A committed position (not a candidate) never goes."""
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.99], [0.95, 0.3, 0.5, 0.1], [0.4, 0.6, 0.2, 0.1]])
    candidates = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, True]])
    commit = blockdecoders.dynamic_commit(conf, candidates, torch.tensor([2, 2, 1]), 0.9)
    assert commit.tolist() == [[True, False, True, False], [True, False, True, False], [False, True, False, False]]


# The tiny configs carry no mask id, like the real checkpoints' configs; the harness would take the
# architecture's real one (outside the tiny vocabularies), so the tests set the id the recorded runs used.
TINY_MASK_ID = {"llada2": 95, "fastdllm_v2": 380}


@pytest.mark.parametrize("family,run", [(f, i) for f in ("llada2", "fastdllm_v2") for i in range(3)])
def test_llada2_and_fastdllm_v2_through_the_harness_on_their_tiny_networks(family, run):
    """The harness's decode path (block-causal handle, exact cache of finished blocks, rule checks) with
    the tiny LLaDA2.0 / Fast-dLLM v2 checkpoint, its loaded `mask_id` set to the recorded runs' id (95 /
    380; the config has none), gives the authors' tokens, greedy and sampled, each prompt alone. No
    generation reaches the stop id (94 / 379), so every forward of a full decode is compared: LLaDA2.0
    the same count (one forward per step; upstream recomputes the prefix, the harness reads its cached
    finished blocks); Fast-dLLM v2 one fewer (upstream's final forward stores the last block and reads a
    next block's first token that is never used; the prefill's read of the first block's first token is
    the harness's first forward of that block)."""
    data = fixture(family)["tiny_network"]
    lm = core.load_model(os.path.join(FIXTURES, f"{family}_tiny"), device="cpu")
    lm.mask_id = TINY_MASK_ID[family]
    recorded = data["runs"][run]
    s = recorded["settings"]
    args, gen_length, steps, block = our_arguments(family, s)
    assert block == lm.block_size
    run_settings = cde.LABELS["tiny-math"].replace(gen_length=gen_length, steps=steps, block_length=block)
    decoder = decoders.build_decoder(family, lm.mask_id, run_settings, args)
    for i, prompt in enumerate(data["prompts"]):
        assert len(prompt) % block == 0
        gens, counted, _ = core.decode_batch(run_settings, lm, decoder, [dict(id=i, prompt_ids=prompt)], seed=s["seed"] + i)
        assert lm.stop_ids[0] not in recorded["tokens"][i] and len(recorded["tokens"][i]) == gen_length
        assert gens[0] == recorded["tokens"][i], (family, s["name"], i)
        assert counted[0] == recorded["model_calls"][i] - (family == "fastdllm_v2")


def test_a_draw_may_give_the_mask_id_never_a_padded_column():
    """Row 0 holds all its mass on the mask id (4) and draws it; row 1 splits it between id 1 and the
    padded column 5 (beyond the 5 tokenizer ids) and always draws 1."""
    probs = torch.zeros(1, 2, 6)
    probs[0, 0, 4] = 1.0
    probs[0, 1, 1] = probs[0, 1, 5] = 0.5
    model = SimpleNamespace(mask_id=4, n_tokens=5)
    torch.manual_seed(0)
    assert all(blockdecoders.draw(probs, model).tolist() == [[4, 1]] for _ in range(20))
