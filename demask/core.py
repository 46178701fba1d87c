"""The decode core: the loaded model, the per-batch handle a decoder calls, forward counting, rule
checks, left padding, decoding a batch and judging it.

What every tool reuses (the command line, lm-eval, benchmarks, policy training, tests): nothing here
knows about run directories, labels or the command line. `decode_batch` is the one way a decoder is
run: its model handle counts each forward per sample and hands every input and the returned x to a
`RuleChecker`.
"""
import contextlib
import copy
import os
from types import MappingProxyType, SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from . import blocknets, kvcache, networks, trajectories
from .decoders import current_block
from .tasks import InputError

# ---------------------------------------------------------------------------
# The model a decoder sees


class RuleViolation(RuntimeError):
    pass


class DiffusionLM:
    """A loaded LLaDA, LLaDA-MoE or Dream as the harness holds it: the network and its forward, the tokenizer
    and the special ids. Decoders never get this object; they get a `DecoderModel` per batch."""

    def __init__(self, loaded, graphed=True):
        self.net, self.family, self.tokenizer = loaded.net, loaded.family, loaded.tokenizer
        self.config, self.device, self.dtype = loaded.config, loaded.device, loaded.dtype
        self.mask_id = networks.mask_token_id(self.config, self.tokenizer)
        self.pad_id = self.config.get("pad_token_id", self.config.get("eos_token_id"))
        self.stop_ids = stop_ids(self.config, self.pad_id, self.tokenizer)
        self.vocab_size = self.net.parts()[3].out_features
        self.n_tokens = len(self.tokenizer) if self.tokenizer else self.vocab_size
        self.forward, self.cache_forwards = networks.network_forwards(self.net, self.device, graphed)
        self.block_size = getattr(self.net, "block_size", None)  # block diffusion: blockcache.py
        if self.block_size:
            self.block_layers = networks.block_layers(self.net, self.device, graphed)
        self.work = []
        self.renew_decoder_tokenizer()

    def renew_decoder_tokenizer(self):
        """A fresh copy of the tokenizer for the decoders' handles (the judge keeps its own)."""
        self.decoder_tokenizer = copy.deepcopy(self.tokenizer)

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None, prompt_width=None):
        """An uncounted, unchecked forward for tools and tests; decoders get a DecoderModel. A
        block-diffusion model needs the prompt width (its block grid starts there)."""
        key_mask = None if attention_mask is None else attention_mask.to(self.device).bool()
        return SimpleNamespace(logits=self.logits(x.to(self.device), key_mask, positions, query_idx,
                                                  prompt_width=prompt_width))

    @torch.no_grad()
    def logits(self, x, key_mask, positions=None, query_idx=None, cache=None, prompt_width=None):
        """fp32 logits [B, Q, V]; rows without any mask token are not computed (zeros) unless no
        row has one. key_mask [B, T] bool (False = padding) or None; `cache`: a kvcache.BatchCache
        or blockcache.BlockCache. `work` lists what the call computed, as BatchCache.work does:
        [(rows, positions per row)]. A block-diffusion model without its cache runs the whole
        block-causal forward (blocknets.block_mask), which needs `prompt_width`."""
        if cache is not None:
            return cache(x, key_mask, positions, query_idx)
        if self.block_size and prompt_width is None:
            raise ValueError("a block-diffusion model's forward needs the prompt width (its block grid starts there)")
        B, T = x.shape
        if positions is None and key_mask is None:
            positions = torch.arange(T, device=self.device).expand(B, T)
        elif positions is None:
            positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        if query_idx is None:
            query_idx = torch.arange(T, device=self.device).expand(B, T)
        attend = None if key_mask is None else key_mask[:, None, None, :]
        if self.block_size:
            attend = blocknets.block_mask(key_mask, prompt_width, self.block_size, None, T).expand(B, -1, -1, -1)
            attend = attend.to(self.device)
        live = (x == self.mask_id).any(1)
        if int(live.sum()) in (0, B):
            self.work = [(torch.arange(B), T)]
            return self.forward(x, positions, attend, query_idx).float()
        self.work = [(live, T)]
        logits = torch.zeros(B, query_idx.shape[1], self.vocab_size, device=self.device)
        logits[live] = self.forward(x[live], positions[live], None if attend is None else attend[live],
                                    query_idx[live]).float()
        return logits


# Tokens that end an answer besides EOS and pad: LLaDA's and Qwen's end of turn, Ling's (LLaDA-MoE) end of
# a role, DiffuCoder-Instruct's padding after the answer (its model card cuts the output there).
STOP_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|role_end|>", "<|dlm_pad|>")


def stop_ids(config, pad_id, tokenizer):
    unk = getattr(tokenizer, "unk_token_id", None) if tokenizer else None
    named = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS] if tokenizer else []
    return sorted({i for i in [config.get("eos_token_id"), pad_id, *named] if isinstance(i, int) and i != unk})


class DecoderModel:
    """What a decoder calls for one batch: model(x, attention_mask=None, query_idx=None,
    positions=None).logits, plus the documented attributes. Forwards are counted and checked
    here, by state the decoder cannot reach by attribute (the slots hold only what is documented).
    The attributes are copies: stop_ids a tuple, config a read-only copy per batch, the tokenizer
    the DiffusionLM's decoder copy (renewed per configuration), so that changing them reaches
    neither the judge nor another configuration of a sweep."""
    __slots__ = ("device", "mask_id", "stop_ids", "tokenizer", "config", "family", "n_tokens", "vocab_size",
                 "_call")

    def __init__(self, lm, call):
        copies = dict(stop_ids=tuple(lm.stop_ids), config=MappingProxyType(copy.deepcopy(lm.config)),
                      tokenizer=lm.decoder_tokenizer)
        for name in self.__slots__[:-1]:
            object.__setattr__(self, name, copies.get(name, getattr(lm, name)))
        object.__setattr__(self, "_call", call)

    def __setattr__(self, name, value):
        raise AttributeError(f"the model handle is read-only ({name!r} cannot be set)")

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        return self._call(x, attention_mask, query_idx, positions)


def batch_model(lm, prompt_mask, checker, nfe, recorder=None, cache=None):
    """A DecoderModel for one batch. Every call is checked (`checker`) and counted into `nfe`
    ([B] long): a call of k*B rows counts k forwards for every sample with a mask left,
    rows i, i + B, i + 2B, ... belonging to sample i (e.g. a guidance batch of 2B rows).
    A `recorder` (trajectories.Recorder) sees each call's input, its counts and the logits returned;
    a `cache` (kvcache.BatchCache, --cache prefix|dual) computes the forwards."""
    B, P = prompt_mask.shape
    padded = None if bool(prompt_mask.all()) else prompt_mask.to(lm.device)

    def call(x, attention_mask, query_idx, positions):
        x = checker.plain(x, "forward input", "model()'s input")
        counted = checker(x)
        R, T = x.shape
        attention_mask, query_idx, positions = (
            None if t is None else checker.plain(t, "forward input", f"model()'s {name}", rows=R, integer=integer)
            for t, name, integer in ((attention_mask, "attention_mask", False), (query_idx, "query_idx", True),
                                     (positions, "positions", True)))
        if query_idx is not None and ((query_idx < 0) | (query_idx >= T)).any():
            checker.violation("forward input", 0, f"query_idx holds positions outside [0, {T})")
        nfe.add_(counted)
        if recorder is not None:
            recorder.forward(x, counted)
        if attention_mask is not None:
            key_mask = attention_mask.bool()
        elif padded is not None:
            key_mask = F.pad(padded.repeat(x.shape[0] // B, 1), (0, x.shape[1] - P), value=True)
        else:
            key_mask = None
        logits = lm.logits(x, key_mask, positions, query_idx, cache)
        if recorder is not None:
            recorder.returned(logits, query_idx, T)
            recorder.computed(cache.work if cache is not None else lm.work, T)
        return SimpleNamespace(logits=logits)
    return DecoderModel(lm, call)


def check_reachable(path_or_id):
    """Before any long work: a hub id that is neither cached nor reachable is an InputError that says
    what to do (download it, or point the run at a local copy)."""
    if networks.cached_model_path(path_or_id) is not None:
        return
    reason = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else None
    if reason is None:
        try:
            import huggingface_hub
            huggingface_hub.model_info(path_or_id, timeout=10)
            return
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    size = networks.CHECKPOINT_BYTES.get(path_or_id)
    disk = f" ({size / 1e9:.0f} GB of weights)" if size else ""
    raise InputError(f"cannot load model {path_or_id!r}: it is not in the local hub cache and the hub cannot be "
                     f"reached ({reason}). Download it where the hub is reachable: `huggingface-cli download "
                     f"{path_or_id}`{disk}, or give a local copy: --model_path DIR (label scripts: MODEL_PATH=DIR)")


def load_model(path_or_id, device=None, dtype=None, graphed=True):
    """Load LLaDA, LLaDA-MoE or Dream (architecture from config.json) with its tokenizer; returns a DiffusionLM.
    graphed=False keeps the plain forward on a GPU too (no compiled blocks, no CUDA graphs: for
    callers whose batches change their number of rows at every forward, like policy training)."""
    try:
        return DiffusionLM(networks.load_checkpoint(path_or_id, device, dtype), graphed)
    except Exception as e:  # hub unreachable, missing or broken files: one line, not a traceback
        raise InputError(f"cannot load model {path_or_id!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

# ---------------------------------------------------------------------------
# Rule checks: every forward's input and the returned x


class RuleChecker:
    """Checks a decode of one batch, from the prompt + all-mask state on: shape, integer ids inside
    the vocabulary, prompt unchanged, no mask left, committed tokens never change (unless the
    decoder declares `remasks = True`), blocks in order (positions committed between two states,
    the start, each forward's input and the result, lie in the earliest block that still had masks
    in the earlier one), progress (a row with masks left whose generation has not changed for
    `patience` forwards is stopped), a budget of forwards per sample (remasking decoders that make
    no net progress) and at least one forward per sample. It checks plain copies (`plain`) of what
    the decoder hands over, so no method of the decoder's objects runs in a check."""

    def __init__(self, sample_ids, input_ids, gen_length, steps, block_length, mask_id, vocab_limit, remasks):
        self.ids, self.prompt, self.gen_length, self.block_length = sample_ids, input_ids.clone(), gen_length, block_length
        self.mask_id, self.vocab_limit, self.remasks = mask_id, vocab_limit, remasks
        self.shape = (input_ids.shape[0], input_ids.shape[1] + gen_length)
        self.patience = gen_length + steps
        self.budget = 4 * max(steps, gen_length)
        self.previous = F.pad(self.prompt, (0, gen_length), value=mask_id)  # the start state
        self.idle = torch.zeros(input_ids.shape[0], dtype=torch.long)
        self.forwards = torch.zeros(input_ids.shape[0], dtype=torch.long)
        self.broken = None

    def violation(self, rule, rows, detail):
        """Raise the broken rule; it stays broken (a decoder that catches it meets it again at its
        next forward and at the end)."""
        row = int(rows.nonzero()[0, 0]) if torch.is_tensor(rows) else rows
        self.broken = RuleViolation(f"rule '{rule}' broken for sample {self.ids[row]}: {detail}")
        raise self.broken

    def plain(self, value, rule, what, rows=None, integer=True, same_device=False):
        """A copy of a tensor the decoder handed over, as a plain torch.Tensor on the model's device:
        tensor subclasses are refused (their methods could answer the checks), and a copy carries
        none of the instance's attributes. same_device: the tensor must already be on the model's
        kind of device (the returned x)."""
        if type(value) is not torch.Tensor:
            kind = "a torch.Tensor subclass " if isinstance(value, torch.Tensor) else ""
            self.violation(rule, 0, f"{what} is {kind}{type(value).__name__}; expected a plain torch.Tensor")
        device = self.prompt.device
        where = torch.Tensor.__getattribute__(value, "device")
        if where.type == "meta" or same_device and where.type != device.type:
            self.violation(rule, 0, f"{what} is a tensor on {where}, expected a tensor on {device}")
        value = torch.Tensor.clone(torch.Tensor.to(value, device))
        if integer and value.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            self.violation(rule, 0, f"{what}: token ids must be integers, got dtype {value.dtype}")
        if rows is not None and (value.dim() != 2 or value.shape[0] != rows):
            self.violation(rule, 0, f"{what} has shape {list(value.shape)}; expected [{rows}, ...]")
        return value.long() if integer else value

    def __call__(self, x):
        """Check one forward's input (a plain copy); returns the forwards it counts per sample: k for
        a call of k*B rows, for every sample with a mask left (for all when none has one)."""
        B, T = self.shape
        if self.broken:
            raise self.broken
        if x.dim() != 2 or x.shape[1] != T or x.shape[0] % B:
            self.violation("forward shape", 0, f"model() got input {list(x.shape)}; expected [{B}, {T}] "
                           f"(or [k*{B}, {T}] for guidance rows)")
        self.check_ids(x, "forward input")
        gen = x[:, -self.gen_length:].view(-1, B, self.gen_length)
        if (gen != gen[:1]).any():
            self.violation("guidance rows", (gen != gen[:1]).any(0).any(1),
                           "rows i + k*B of a forward must hold sample i's generation")
        state = x[:B]
        self.check_prompt(state)
        self.check_transition(self.previous, state)
        if self.forwards.any():
            self.check_progress(self.previous, state)
        self.previous = state.clone()
        live = (state[:, -self.gen_length:] == self.mask_id).any(1).cpu()
        counted = (x.shape[0] // B) * (live if bool(live.any()) else torch.ones_like(live)).long()
        self.forwards += counted
        if (self.forwards > self.budget).any():
            self.violation("forward budget", self.forwards > self.budget,
                           f"more than {self.budget} forwards (4 x max(steps, gen_length))")
        return counted

    def finish(self, x):
        if self.broken:
            raise self.broken
        x = self.plain(x, "decoder returns (x, used_steps)", "x", same_device=True)
        if tuple(x.shape) != self.shape:
            self.violation("output shape", 0, f"expected {list(self.shape)}, got {list(x.shape)}")
        if (self.forwards == 0).any():
            self.violation("no forward", self.forwards == 0, "the generation was produced without calling the model")
        self.check_ids(x, "valid token ids")
        self.check_prompt(x)
        self.check_transition(self.previous, x)
        gen = x[:, -self.gen_length:]
        left = gen == self.mask_id
        if left.any():
            self.violation("no mask left", left.any(1), f"{int(left.sum())} mask tokens remain in the generation")
        return x

    def check_ids(self, x, rule):
        if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            self.violation(rule, 0, f"token ids must be integers, got dtype {x.dtype}")
        bad = ((x < 0) | ((x >= self.vocab_limit) & (x != self.mask_id)))[:, -self.gen_length:]
        if bad.any():
            rows = bad.view(-1, self.shape[0], self.gen_length).any(0).any(1)
            self.violation(rule, rows, f"ids outside the vocabulary of {self.vocab_limit} tokens")

    def check_prompt(self, x):
        changed = (x[:, :self.prompt.shape[1]] != self.prompt).any(1)
        if changed.any():
            self.violation("prompt unchanged", changed, "the decoder wrote into the prompt")

    def check_transition(self, before, after):
        before, after = before[:, -self.gen_length:], after[:, -self.gen_length:]
        was_masked = before == self.mask_id
        rewritten = ~was_masked & (after != before)
        if rewritten.any() and not self.remasks:
            self.violation("committed tokens are final", rewritten.any(1),
                           "a committed token was changed or re-masked (declare remasks = True for remasking decoders)")
        new = was_masked & (after != self.mask_id)
        first_block = current_block(was_masked, self.block_length)
        block = torch.arange(self.gen_length, device=after.device)[None] // self.block_length
        out_of_order = new & (block != first_block[:, None])
        if out_of_order.any():
            self.violation("blocks in order", out_of_order.any(1),
                           "tokens were committed outside the earliest block that still had masks")

    def check_progress(self, before, after):
        unchanged = (before == after).all(1).cpu() & (after[:, -self.gen_length:] == self.mask_id).any(1).cpu()
        self.idle = torch.where(unchanged, self.idle + 1, 0)
        if (self.idle >= self.patience).any():
            self.violation("progress", self.idle >= self.patience,
                           f"no token committed or re-masked in {self.patience} consecutive forwards "
                           "(gen_length + steps)")

# ---------------------------------------------------------------------------
# Decoding a batch under the rule checks, and judging it


def left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = True
    return ids, mask


def cut_at_stop(ids, stop_ids):
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i], True
    return ids, False


class DecoderError(RuleViolation):
    """The decoder raised an exception while decoding a sample."""


def checked_output(result, sample_id):
    """The decoder's (x, used_steps) with used_steps as an int, or a RuleViolation naming what it
    returned instead (x itself is checked by RuleChecker.finish)."""
    rule = f"rule 'decoder returns (x, used_steps)' broken for sample {sample_id}"
    if not (type(result) is tuple and len(result) == 2):
        got = type(result).__name__ + (f" of {len(result)}" if isinstance(result, tuple) else "")
        raise RuleViolation(f"{rule}: got {got}")
    x, steps = result
    plain_int = type(steps) is int or isinstance(steps, np.integer) or (
        type(steps) is torch.Tensor and steps.numel() == 1 and not steps.is_floating_point() and steps.dtype != torch.bool)
    if not plain_int:
        raise RuleViolation(f"{rule}: used_steps is {type(steps).__name__}, expected an int")
    return x, int(steps)


@contextlib.contextmanager
def torch_state():
    """Restores what a decoder may change of torch's global state: default dtype, grad mode,
    deterministic algorithms, float32 matmul precision, cuDNN flags and the random generators
    (so that draws outside the seeded decode do not depend on the decoder)."""
    saved = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_float32_matmul_precision(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        dtype, grad, deterministic, warn_only, precision, cudnn_det, cudnn_bench, rng, cuda_rng = saved
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, cudnn_bench
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def decode_rows(run, lm, decoder, input_ids, prompt_mask, sample_ids, traces=None):
    """One decode of rows that form one call of the decoder, under the rule checks; returns the
    generations [B, gen_length], the counted forwards per row and the reported steps. `run`: the
    RunSettings (gen_length, steps, block_length, cache). With a list `traces`, each row's trace
    (trajectories.py) is appended to it. The decoder gets a copy of input_ids; an exception it
    raises becomes a DecoderError naming the sample."""
    G = run.gen_length
    checker = RuleChecker(sample_ids, input_ids.to(lm.device), G, run.steps, run.block_length,
                          lm.mask_id, lm.n_tokens, getattr(decoder, "remasks", False))
    nfe = torch.zeros(len(sample_ids), dtype=torch.long)
    recorder = None if traces is None else trajectories.Recorder(len(sample_ids), G, lm.mask_id)
    model = batch_model(lm, prompt_mask, checker, nfe, recorder, kvcache.for_batch(run, lm, input_ids.shape[1]))
    try:
        result = decoder.decode(model, input_ids.clone(), G, run.steps, run.block_length)
    except RuleViolation:
        raise
    except Exception as e:
        raise DecoderError(f"decoder raised {type(e).__name__} on sample {sample_ids[0]}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    x, reported = checked_output(result, sample_ids[0])
    x = checker.finish(x)
    if recorder is not None:
        traces.extend(recorder.finish(x))
    return x[:, -G:].tolist(), nfe.tolist(), reported


def decode_batch(run, lm, decoder, batch, seed, traces=None):
    """Decode one batch: together when the decoder declares `batched = True`, else one row at a
    time with that row's unpadded prompt (decoders written for batch 1, like LLaDA's generate.py).
    Returns generations, counted forwards per sample and reported steps per sample; with a list
    `traces`, the samples' traces are appended to it in batch order."""
    with torch_state():
        torch.manual_seed(seed)
        return decode_each(run, lm, decoder, batch, traces)


def decode_each(run, lm, decoder, batch, traces):
    prompts = [s["prompt_ids"] for s in batch]
    if getattr(decoder, "batched", False):
        input_ids, prompt_mask = left_pad(prompts, lm.pad_id)
        generations, counted, reported = decode_rows(run, lm, decoder, input_ids, prompt_mask, [s["id"] for s in batch],
                                                     traces)
        return generations, counted, [reported] * len(batch)
    out = [], [], []
    for s, prompt in zip(batch, prompts):
        input_ids = torch.tensor([prompt])
        gen, counted, reported = decode_rows(run, lm, decoder, input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                                             [s["id"]], traces)
        for acc, value in zip(out, (gen[0], counted[0], reported)):
            acc.append(value)
    return out


def judge_batch(lm, task, batch, generations):
    texts, stopped = [], []
    for ids in generations:
        kept, stop = cut_at_stop(ids, lm.stop_ids)
        texts.append(lm.tokenizer.decode(kept, skip_special_tokens=True))
        stopped.append(stop)
    return texts, stopped, task.judge(batch, texts)
