"""Native LLaDA2.0 (inclusionAI/LLaDA2.0-mini, -flash; model_type "llada2_moe") in plain PyTorch, in
the style of networks.py and moe.py.

Follows the authors' Hugging Face remote code, modeling_llada2_moe.py and configuration_llada2_moe.py
of the checkpoints (as copied into ZHZisZZ/dllm, dllm/pipelines/llada2/models/). Parameter names are
the checkpoint's: model.{word_embeddings, layers.i, norm} and lm_head. A layer (BailingMoeV2 layout)
is attention with one fused query_key_value projection ([query heads, key heads, value heads] x
head_dim), per-head RMSNorm on queries and keys (use_qk_norm), RoPE over the first
partial_rotary_factor of each head, an output projection `dense` (bias when use_bias), then a SwiGLU
MLP: dense for the first first_k_dense_replace layers, else a mixture of experts.

Routing of the mixture (LLaDA2MoeGate): router logits in fp32, sigmoid scores; the choice adds the
buffer expert_bias to the scores and is group-limited: the experts are split into n_group groups, a
group scores the sum of its two best experts, the topk_group best groups stay and the
num_experts_per_tok best experts among them are taken. The weights are the chosen experts' sigmoid
scores without the bias, divided by their sum (when more than one expert is taken) and multiplied by
routed_scaling_factor. A shared SwiGLU expert of width moe_intermediate_size x num_shared_experts
is added. The routed experts run as moe.Experts (one grouped matmul, static shapes, no host sync).

Row i predicts token i, as in LLaDA. Attention is block-causal in blocks of block_size tokens
(config.json's block_size when present, else 32, the block_length of the authors' generate); the
mask comes from the caller (networks.forward_logits with a 4-D mask), the network is mask-agnostic.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe import Experts, SwiGLU
from .networks import RMSNorm, attention

DEFAULT_BLOCK_SIZE = 32


def head_dim(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


class LLaDA2Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], head_dim(c)
        width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(c["hidden_size"], width, bias=c.get("use_qkv_bias", False))
        if c.get("use_qk_norm", True):
            self.query_layernorm = RMSNorm(self.head_dim, c["rms_norm_eps"])
            self.key_layernorm = RMSNorm(self.head_dim, c["rms_norm_eps"])
        self.dense = nn.Linear(self.n_heads * self.head_dim, c["hidden_size"], bias=c.get("use_bias", True))

    def forward(self, a, rope, key_mask, kv=None):
        heads = self.query_key_value(a).unflatten(-1, (-1, self.head_dim))
        q, k, v = heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=-2)
        if hasattr(self, "query_layernorm"):
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        out, k, v = attention(q.flatten(-2), k.flatten(-2), v.flatten(-2), self.n_heads, self.n_kv_heads, rope,
                              key_mask, kv)
        return self.dense(out), k, v


class Router(nn.Module):
    """LLaDA2MoeGate: weight [experts, d] and the buffer expert_bias; see the module docstring."""

    def __init__(self, c):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = c["num_experts_per_tok"], c["n_group"], c["topk_group"]
        self.scale = c["routed_scaling_factor"]
        self.weight = nn.Parameter(torch.empty(c["num_experts"], c["hidden_size"]))
        self.register_buffer("expert_bias", torch.zeros(c["num_experts"]))

    def forward(self, x):
        """(experts [N, top_k], weights [N, top_k] fp32) of tokens x [N, d]."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores + self.expert_bias.float()
        groups = biased.unflatten(-1, (self.n_group, -1))
        best_groups = groups.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter(1, best_groups, True)
        experts = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return experts, weights * self.scale


class SparseMoE(nn.Module):
    """LLaDA2MoeSparseMoeBlock: mlp.{gate, experts.j, shared_experts}."""

    def __init__(self, c):
        super().__init__()
        self.gate, self.top_k = Router(c), c["num_experts_per_tok"]
        self.experts = Experts(c["num_experts"], c["hidden_size"], c["moe_intermediate_size"])
        shared = c.get("num_shared_experts") or 0
        self.shared_experts = SwiGLU(c["hidden_size"], c["moe_intermediate_size"] * shared) if shared else None

    def forward(self, m):
        x = m.reshape(-1, m.shape[-1])
        experts, weights = self.gate(x)
        out = self.experts(x, experts, weights.to(x.dtype)).view_as(m)
        return out if self.shared_experts is None else out + self.shared_experts(m)


class LLaDA2Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        d = c["hidden_size"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"]), RMSNorm(d, c["rms_norm_eps"])
        self.attention = LLaDA2Attention(c)
        sparse = c.get("num_experts") is not None and layer >= c.get("first_k_dense_replace", 0)
        self.mlp = SparseMoE(c) if sparse else SwiGLU(d, c["intermediate_size"])

    def forward(self, h, rope, key_mask, kv=None):
        """(output, keys, values): see networks.attention."""
        a, k, v = self.attention(self.input_layernorm(h), rope, key_mask, kv)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class LLaDA2MoE(nn.Module):
    """LLaDA2.0 layout: model.{word_embeddings, layers.i, norm}, lm_head; row i predicts token i;
    block-causal attention in blocks of `block_size`."""
    shift = 0

    def __init__(self, c):
        super().__init__()
        self.config, self.theta = c, c.get("rope_theta", 10000.0)
        self.head_dim = head_dim(c)
        self.rope_dim = int(self.head_dim * c.get("partial_rotary_factor", 0.5))
        self.block_size = c.get("block_size", DEFAULT_BLOCK_SIZE)
        self.model = nn.Module()
        self.model.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(LLaDA2Block(c, i) for i in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def parts(self):
        return self.model.word_embeddings, self.model.layers, self.model.norm, self.lm_head


def active_parameters(net):
    """Parameters a token runs through: all but the routed experts it is not sent to, and the
    embedding (a lookup) left out, as moe.active_parameters counts LLaDA-MoE's."""
    c = net.config
    total = sum(p.numel() for p in net.parameters()) - net.model.word_embeddings.weight.numel()
    for layer in net.model.layers:
        if isinstance(layer.mlp, SparseMoE):
            experts = layer.mlp.experts
            per_expert = sum(p[0].numel() for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
            total -= (c["num_experts"] - c["num_experts_per_tok"]) * per_expert
    return total
