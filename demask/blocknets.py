"""Native SDAR and Fast-dLLM v2 block-diffusion networks, and the block-causal attention mask they decode under.

Both follow networks.py's interface (parts(), shift, rope_dim, theta, head_dim, config) and add block_size;
they reuse its RMSNorm, RoPE and attention, so networks.forward_logits / refresh_forward / cached_forward run
them unchanged when passed block_mask's 4-D mask. Parameter names are those of the official checkpoints:
- SDAR (JetAstra/SDAR, training/model/SDAR-*-Chat/modeling_sdar.py): Qwen3 layers (per-head RMSNorm of
  queries and keys before RoPE, no biases, head_dim from config.json); row i predicts token i.
- Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_7B modeling.py, NVlabs/Fast-dLLM v2): Qwen2.5 layers
  (query/key/value biases); row i predicts token i + 1 (its generate shifts the logits right by one).
"""
import torch
import torch.nn as nn

from .networks import RMSNorm, DreamBlock, DreamMLP, attention

# The block size of a checkpoint whose config.json does not give it: the family's published one.
SDAR_BLOCK_SIZE = 4        # SDAR-*-Chat config.json "block_size"; block_diffusion_generate's default
FAST_DLLM_BLOCK_SIZE = 32  # Fast_dLLM_v2_7B config.json "bd_size"; its generate's default


def block_of(index, prompt_width, block_size):
    """The block of padded index `index` (a tensor), the grid starting at the generation: floor((index - P) / S)."""
    return torch.div(index - prompt_width, block_size, rounding_mode="floor")


def block_mask(key_mask, prompt_width, block_size, query_idx=None, length=None):
    """Block-causal attention mask [B, 1, Q, T] (True = attend) with the block grid at the generation start:
    the token at padded index k is in block floor((k - prompt_width) / block_size), and query q attends key k
    iff k is not padding and block(k) <= block(q). A padding query also attends itself, so that no row is
    empty (SDPA would give NaN). key_mask [B, T] bool or None (no padding: then `length` gives T);
    query_idx [B, Q] the queries' padded indices (default: all T positions)."""
    if key_mask is None:
        key_mask = torch.ones(1, length, dtype=torch.bool, device=None if query_idx is None else query_idx.device)
    B, T = key_mask.shape
    device = key_mask.device
    if query_idx is None:
        query_idx = torch.arange(T, device=device).expand(B, T)
    keys = torch.arange(T, device=device)
    key_block, query_block = block_of(keys, prompt_width, block_size), block_of(query_idx, prompt_width, block_size)
    allowed = key_mask[:, None, :] & (key_block[None, None, :] <= query_block[..., None])
    allowed = allowed | (keys[None, None, :] == query_idx[..., None])
    return allowed[:, None]


def head_dim(c):
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


class QKNormAttention(nn.Module):
    """Qwen3 attention: queries and keys RMS-normed per head (q_norm / k_norm) before RoPE; no biases."""

    def __init__(self, c):
        super().__init__()
        d, self.head_dim = c["hidden_size"], head_dim(c)
        self.n_heads, self.n_kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        bias = bool(c.get("attention_bias", False))
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, c["rms_norm_eps"]), RMSNorm(self.head_dim, c["rms_norm_eps"])

    def per_head_norm(self, norm, x):
        return norm(x.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def forward(self, a, rope, key_mask, kv=None):
        q, k = self.per_head_norm(self.q_norm, self.q_proj(a)), self.per_head_norm(self.k_norm, self.k_proj(a))
        out, k, v = attention(q, k, self.v_proj(a), self.n_heads, self.n_kv_heads, rope, key_mask, kv)
        return self.o_proj(out), k, v


class SDARBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn, self.mlp = QKNormAttention(c), DreamMLP(c)

    def forward(self, h, rope, key_mask, kv=None):
        """(output, keys, values): see networks.attention."""
        a, k, v = self.self_attn(self.input_layernorm(h), rope, key_mask, kv)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class QwenLayout(nn.Module):
    """The Qwen2/Qwen3 checkpoint layout: model.{embed_tokens, layers.i, norm}, lm_head."""

    def __init__(self, c, block_class, default_block_size, block_size_key):
        super().__init__()
        self.config, self.theta, self.head_dim = c, c["rope_theta"], head_dim(c)
        self.rope_dim = self.head_dim
        self.block_size = int(c.get(block_size_key) or default_block_size)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(block_class(c) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def parts(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head


class SDAR(QwenLayout):
    """SDAR / TraDo (Qwen3 layers, config.json "block_size"); row i predicts token i."""
    shift = 0

    def __init__(self, c):
        super().__init__(c, SDARBlock, SDAR_BLOCK_SIZE, "block_size")


class FastDLLMv2(QwenLayout):
    """Fast-dLLM v2 (Qwen2.5 layers with query/key/value biases, config.json "bd_size"); row i predicts
    token i + 1."""
    shift = 1

    def __init__(self, c):
        super().__init__(c, DreamBlock, FAST_DLLM_BLOCK_SIZE, "bd_size")


# config.json model_type, lower-cased (as networks.model_architecture reads it) -> network
BLOCK_ARCHITECTURES = {"sdar": SDAR, "fast_dllm_qwen": FastDLLMv2}
