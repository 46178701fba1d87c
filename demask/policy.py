"""Learned unmasking policies (Jazbec et al., "Learning Unmasking Policies for Diffusion Language
Models", arXiv 2512.09106; apple/ml-rl-dllm).

A small policy network reads the frozen dLLM's top-1 probability at every generated position, the
mask bit and the time t = steps taken / gen_length, and gives one logit per position; an action
rule turns the logits into the set of masked positions of the current block to unmask. The
committed tokens are the dLLM's proposals (BlockDecoder.propose). `PolicyDecoder` registers
itself as the decoder `policy` on import.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import REPO
from .core import decode_rows
from .decoders import BlockDecoder, Range, register_method

SAMPLING_MODES = ("bernoulli", "bernoulli-argmax", "dpls")

# ---------------------------------------------------------------------------
# The policy network (the paper's dit_confidence: one DiT block with adaLN over the positions)


@dataclass
class PolicyConfig:
    policy_type: str = "dit_confidence"
    hidden_dim: int = 128
    feedforward_dim: int = 512
    num_heads: int = 2
    num_blocks: int = 1
    time_embed_dim: int = 128
    full_context: bool = True
    smart_init: float = -2.0


def timestep_embedding(t, dim):
    """DiT's sinusoidal embedding of t in [0, 1] (scaled by 1000 as DiT's integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(x):
    """Rotary position embedding (rotate-half form) over the sequence axis of x [B, H, L, D]."""
    L, D = x.shape[-2], x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    angles = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Bidirectional self-attention and an MLP, each with adaLN-Zero shift / scale / gate (DiT)."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(approximate="tanh"), nn.Linear(ff, d))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def attention(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PolicyNet(nn.Module):
    """logits [B, L] from the dLLM's top-1 probabilities conf [B, L], the mask bits masked [B, L]
    and the time t [B]. `stop` is DPLS's STOP logit, a learned scalar (initialised to 0)."""

    def __init__(self, config):
        super().__init__()
        self.config, d = config, config.hidden_dim
        self.inp = nn.Linear(1, d)
        self.mask_embed = nn.Embedding(2, d)
        self.time_mlp = nn.Sequential(nn.Linear(config.time_embed_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.feedforward_dim)
                                    for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)
        self.stop = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.out.weight)  # policy_smart_init: every position starts at sigmoid(smart_init)
        nn.init.constant_(self.out.bias, config.smart_init)

    def forward(self, conf, masked, t):
        x = self.inp(conf.float()[..., None])
        c = self.mask_embed(masked.long()) + self.time_mlp(timestep_embedding(t, self.config.time_embed_dim))[:, None]
        for block in self.blocks:
            x = block(x, c)
        return self.out(self.norm(x)).squeeze(-1)


def save_policy(net, folder):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(asdict(net.config), f, indent=1)


def load_policy(folder):
    with open(os.path.join(folder, "config.json")) as f:
        net = PolicyNet(PolicyConfig(**json.load(f)))
    net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return net.eval()

# ---------------------------------------------------------------------------
# Actions: which masked positions of the current block to unmask, with their exact log-likelihood


def bernoulli_logp(logits, candidates, chosen, temperature):
    """log P(chosen) [B] when each candidate is unmasked independently with sigmoid(logit / T)."""
    z = logits / temperature
    per = torch.where(chosen, F.logsigmoid(z), F.logsigmoid(-z))
    return torch.where(candidates, per, 0.0).sum(-1)


def argmax_fallback(logits, candidates):
    """The candidate with the highest logit ([B, L] one-hot; ties go to the lower position)."""
    best = torch.where(candidates, logits, -torch.inf).argmax(-1)
    return F.one_hot(best, logits.shape[-1]).bool() & candidates.any(-1, keepdim=True)


def bernoulli_argmax_logp(logits, candidates, chosen, temperature):
    """log P(chosen) under bernoulli-argmax: the fallback set {argmax} is also reached by drawing
    nothing, so its probability is P_bernoulli({argmax}) + P_bernoulli(empty)."""
    logp = bernoulli_logp(logits, candidates, chosen, temperature)
    empty = bernoulli_logp(logits, candidates, torch.zeros_like(chosen), temperature)
    is_fallback = (chosen == argmax_fallback(logits, candidates)).all(-1)
    return torch.where(is_fallback, torch.logaddexp(logp, empty), logp)


def dpls_sample(logits, candidates, stop, temperature):
    """Plackett-Luce with a STOP item: the first pick is from softmax over the candidates, every
    later one from the candidates left plus STOP, until STOP (or none left). Sampled by sorting
    Gumbel-perturbed scores (the first pick separately, without STOP). Returns rank [B, L]: the
    pick order of chosen positions, -1 elsewhere."""
    z = torch.where(candidates, logits / temperature, -torch.inf)
    first = (z - torch.log(-torch.log(torch.rand_like(z).clamp(min=1e-20)))).argmax(-1)
    rest = torch.cat([z, (stop / temperature).expand(z.shape[0], 1)], dim=-1)
    rest[torch.arange(z.shape[0]), first] = -torch.inf
    keys = rest - torch.log(-torch.log(torch.rand_like(rest).clamp(min=1e-20)))
    order = keys.argsort(-1, descending=True)
    rank_in_rest = order.argsort(-1)
    before_stop = (rank_in_rest < rank_in_rest[:, -1:]) & torch.isfinite(rest)
    rank = torch.where(before_stop, rank_in_rest + 1, -1)[:, :-1]
    rank[torch.arange(z.shape[0]), first] = 0
    return torch.where(candidates.any(-1, keepdim=True), rank, -1)


def dpls_logp(logits, candidates, rank, stop, temperature):
    """Exact log-likelihood [B] of the pick sequence `rank` (dpls_sample's format)."""
    z = torch.where(candidates, logits / temperature, -torch.inf)
    s = stop / temperature
    n_picks = (rank >= 0).sum(-1)
    j = torch.arange(logits.shape[-1] + 1, device=logits.device)
    # left[b, j, i]: candidate i is still available before pick j
    left = candidates[:, None] & ((rank[:, None] >= j[None, :, None]) | (rank[:, None] < 0))
    denom = torch.logsumexp(torch.where(left, z[:, None], -torch.inf), dim=-1)
    with_stop = torch.logaddexp(denom, s.expand_as(denom))
    denom = torch.where(j[None] > 0, with_stop, denom)
    picked = torch.where(rank[:, None] == j[None, :, None], z[:, None], 0.0).sum(-1)
    terms = torch.where(j[None] < n_picks[:, None], picked - denom, 0.0)
    stopped = left.any(-1) & (j[None] == n_picks[:, None])
    terms = terms + torch.where(stopped, s - with_stop, 0.0)
    return torch.where(candidates.any(-1), terms.sum(-1), 0.0)


def choose(logits, candidates, mode, temperature, stop):
    """Sample an action. Returns (commit [B, L] bool, action, log-likelihood [B]); the action is
    `commit` for the Bernoulli modes and the pick ranks for dpls."""
    if mode == "dpls":
        rank = dpls_sample(logits, candidates, stop, temperature)
        return rank >= 0, rank, dpls_logp(logits, candidates, rank, stop, temperature)
    chosen = candidates & (torch.rand_like(logits) < torch.sigmoid(logits / temperature))
    if mode == "bernoulli":
        return chosen, chosen, bernoulli_logp(logits, candidates, chosen, temperature)
    chosen = torch.where(chosen.any(-1, keepdim=True), chosen, argmax_fallback(logits, candidates))
    return chosen, chosen, bernoulli_argmax_logp(logits, candidates, chosen, temperature)


def action_logp(logits, candidates, action, mode, temperature, stop):
    """log-likelihood [B] of a recorded action under `mode` (for the GRPO ratio)."""
    if mode == "dpls":
        return dpls_logp(logits, candidates, action, stop, temperature)
    if mode == "bernoulli":
        return bernoulli_logp(logits, candidates, action, temperature)
    return bernoulli_argmax_logp(logits, candidates, action, temperature)

# ---------------------------------------------------------------------------
# The policy decoder


class PolicyDecoder(BlockDecoder):
    """Unmask the masked positions of the current block that a learned policy picks; commit the
    dLLM's proposed tokens there. With full_context (the policy's config) the policy sees the whole
    generation, otherwise the current block only. `trace`, when a list (training), receives one
    record per forward: the policy's inputs, the candidates, the action and its log-likelihood.
    `expert_rows` ([B] bool, training's expert steering), when set, replaces the policy's choice in
    those rows by Fast-dLLM's threshold rule (confidence >= `expert_threshold`, at least the most
    confident position), scored by the policy."""

    ranges = {**BlockDecoder.ranges, "policy_temperature": Range(0, open_low=True)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, policy_path="models/tiny-policy",
                 sampling_mode="bernoulli-argmax", policy_temperature=1.0):
        self.policy_path = os.path.join(REPO, policy_path)
        if not os.path.isfile(os.path.join(self.policy_path, "model.safetensors")):
            raise ValueError(f"no policy in {policy_path!r} (model.safetensors and config.json)")
        self.setup(mask_id, temperature, top_p, load_policy(self.policy_path), sampling_mode, policy_temperature)

    @classmethod
    def from_network(cls, mask_id, net, temperature=0.0, top_p=None, sampling_mode="bernoulli-argmax",
                     policy_temperature=1.0):
        """A decoder around a policy network in memory (training: the network being trained)."""
        decoder = cls.__new__(cls)
        decoder.policy_path = None
        decoder.setup(mask_id, temperature, top_p, net, sampling_mode, policy_temperature)
        return decoder

    def setup(self, mask_id, temperature, top_p, net, sampling_mode, policy_temperature):
        super().__init__(mask_id, temperature, top_p)
        if sampling_mode not in SAMPLING_MODES:
            raise ValueError(f"policy sampling_mode is one of {', '.join(SAMPLING_MODES)}; got {sampling_mode!r}")
        if not policy_temperature > 0:
            raise ValueError(f"policy_temperature must be > 0, got {policy_temperature!r}")
        self.net, self.sampling_mode, self.policy_temperature = net, sampling_mode, float(policy_temperature)
        self.whole_generation = net.config.full_context
        self.trace, self.expert_rows, self.expert_threshold = None, None, None

    def info(self, gen_length, steps, block_length):
        with open(os.path.join(self.policy_path, "model.safetensors"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return dict(policy_weights_sha256=digest, policy_config=asdict(self.net.config))

    def start(self, batch):
        self.net.to(batch.device)
        batch.forwards = torch.zeros(batch.size, dtype=torch.long, device=batch.device)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        top1 = p.max(-1).values.float()
        t = batch.forwards.float() / batch.gen_length
        active = candidates.any(-1)
        batch.forwards += active.long()
        with torch.no_grad():
            policy_logits = self.net(top1, batch.masked, t).double()
        stop = self.net.stop.double()
        commit, action, logp = choose(policy_logits, candidates, self.sampling_mode, self.policy_temperature, stop)
        if self.expert_rows is not None:
            expert = candidates & (conf >= self.expert_threshold) | argmax_fallback(conf, candidates)
            commit = action = torch.where(self.expert_rows[:, None], expert, commit)
            logp = action_logp(policy_logits, candidates, action, self.sampling_mode, self.policy_temperature, stop)
        if self.trace is not None:
            self.trace.append(dict(conf=top1, masked=batch.masked, t=t, candidates=candidates, action=action,
                                   logp=logp, active=active))
        return commit, tokens


def rollout(run, lm, decoder, input_ids, prompt_mask, sample_ids, expert_rows=None, expert_threshold=None):
    """A training rollout of a PolicyDecoder, decoded by the harness (rule checks, counted forwards).
    expert_rows ([B] bool or None): rows whose choice is Fast-dLLM's threshold rule at
    `expert_threshold` instead of the policy's. Returns (generations, counted forwards per row,
    trace: one record per forward of the policy's inputs, candidates, action and log-likelihood)."""
    decoder.trace, decoder.expert_rows, decoder.expert_threshold = [], expert_rows, expert_threshold
    try:
        generations, counted, _ = decode_rows(run, lm, decoder, input_ids, prompt_mask, sample_ids)
        return generations, counted, decoder.trace
    finally:
        decoder.trace, decoder.expert_rows, decoder.expert_threshold = None, None, None


register_method("policy", PolicyDecoder, method_type="adaptive", representative_param="policy_temperature",
                position_score="learned policy on the top-1 probability", uses_steps=False,
                summary="positions picked by a learned unmasking policy (bernoulli, bernoulli-argmax or dpls)",
                reference="Jazbec et al. arXiv 2512.09106 (apple/ml-rl-dllm)")
