"""Native LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B) in plain PyTorch, in the style of networks.py.

Parameter names are those of the official checkpoints (modeling_lladamoe.py of the Hugging Face
repos): model.{embed_tokens, layers.i, norm} and lm_head. A layer is bidirectional attention with
per-head RMSNorm on queries and keys (qk_layernorm), RoPE over the first partial_rotary_factor of
each head, then either a dense SwiGLU MLP (moe_layer_freq[i] == 0) or a sparse mixture: a linear
router, softmax over the experts in fp32 (plus expert_bias when the config enables it), the top
num_experts_per_tok experts per token, weighted by those probabilities as they are (the official
forward never renormalises them, whatever norm_topk_prob says), and a shared SwiGLU expert added when
shared_expert_intermediate_size is set. Row i predicts token i, as in LLaDA.

The experts of a layer are held stacked ([experts, out, in]), so a token's experts run as one
grouped matmul over tokens sorted by expert: static shapes, no host sync, so the layer compiles and
replays as a CUDA graph like the dense models. The checkpoint's per-expert tensors
(mlp.experts.j.gate_proj.weight, ...) are stacked when the state dict is loaded.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .networks import RMSNorm, attention

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class SwiGLU(nn.Module):
    """The dense MLP and the shared expert (gate_proj, up_proj, down_proj)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, m):
        return self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class Experts(nn.Module):
    """The routed experts of a layer, stacked: gate_proj, up_proj [E, hidden, d], down_proj [E, d, hidden]."""

    def __init__(self, n_experts, d, hidden):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d, hidden))
        self._register_load_state_dict_pre_hook(stack_expert_tensors)

    def forward(self, x, experts, weights):
        """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for tokens x [N, d]; experts, weights [N, k]."""
        if x.is_cuda and x.dtype != torch.bfloat16:  # grouped matmul on CUDA takes bf16 only
            return self.one_by_one(x, experts, weights)
        n_experts, k = self.gate_proj.shape[0], experts.shape[1]
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        tokens = order // k
        counts = torch.zeros(n_experts, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        ends = counts.cumsum(0, dtype=torch.int32)
        h = x[tokens]
        h = F.silu(F.grouped_mm(h, self.gate_proj.transpose(1, 2), offs=ends)) * F.grouped_mm(
            h, self.up_proj.transpose(1, 2), offs=ends)
        y = F.grouped_mm(h, self.down_proj.transpose(1, 2), offs=ends) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def one_by_one(self, x, experts, weights):
        """The same sum, expert by expert (data-dependent shapes: eager only)."""
        out = torch.zeros_like(x)
        for e in range(self.gate_proj.shape[0]):
            token, slot = torch.where(experts == e)
            h = x[token]
            h = F.silu(h @ self.gate_proj[e].T) * (h @ self.up_proj[e].T)
            out.index_add_(0, token, (h @ self.down_proj[e].T) * weights[token, slot, None])
        return out


def stack_expert_tensors(state, prefix, *args):
    """Load hook: the checkpoint's prefix.{j}.{gate,up,down}_proj.weight become prefix.{gate,up,down}_proj."""
    for name in EXPERT_PROJECTIONS:
        keys = sorted((k for k in state if k.startswith(prefix) and k.endswith(f".{name}.weight")),
                      key=lambda k: int(k[len(prefix):].split(".")[0]))
        if keys:
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])


def checkpoint_names(net):
    """The tensor names of the official checkpoint of `net` (its state dict with experts unstacked)."""
    names = []
    for key, value in net.state_dict().items():
        head, _, name = key.rpartition(".")
        if head.endswith("mlp.experts") and name in EXPERT_PROJECTIONS:
            names += [f"{head}.{j}.{name}.weight" for j in range(value.shape[0])]
        else:
            names.append(key)
    return names


class SparseMoE(nn.Module):
    """Router (gate) + routed experts; the shared expert is the layer's (LLaDAMoEBlock)."""

    def __init__(self, c):
        super().__init__()
        self.top_k = c["num_experts_per_tok"]
        self.gate = nn.Linear(c["hidden_size"], c["num_experts"], bias=False)
        self.experts = Experts(c["num_experts"], c["hidden_size"], c["expert_intermediate_size"])
        if c.get("moe_router_enable_expert_bias"):
            self.register_buffer("expert_bias", torch.zeros(c["num_experts"]))
        else:
            self.expert_bias = None

    def forward(self, m):
        x = m.reshape(-1, m.shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias
        weights, experts = probs.topk(self.top_k, dim=-1)
        return self.experts(x, experts, weights.to(x.dtype)).view_as(m)


class LLaDAMoEAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, bias = c["hidden_size"], bool(c.get("attention_bias"))
        self.n_heads, self.n_kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        head_dim = d // self.n_heads
        self.q_proj, self.o_proj = nn.Linear(d, d, bias), nn.Linear(d, d, bias)
        self.k_proj, self.v_proj = nn.Linear(d, head_dim * self.n_kv_heads, bias), nn.Linear(d, head_dim * self.n_kv_heads, bias)
        if c.get("qk_layernorm"):
            self.q_norm, self.k_norm = RMSNorm(head_dim, c["rms_norm_eps"]), RMSNorm(head_dim, c["rms_norm_eps"])
        self.clip = c.get("clip_qkv")
        self.head_dim = head_dim

    def forward(self, a, rope, key_mask, kv=None):
        q, k, v = self.q_proj(a), self.k_proj(a), self.v_proj(a)
        if hasattr(self, "q_norm"):
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        out, k, v = attention(q, k, v, self.n_heads, self.n_kv_heads, rope, key_mask, kv)
        return self.o_proj(out), k, v


class LLaDAMoEBlock(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        d = c["hidden_size"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"]), RMSNorm(d, c["rms_norm_eps"])
        self.self_attn = LLaDAMoEAttention(c)
        sparse = c["moe_layer_freq"][layer] != 0
        self.mlp = SparseMoE(c) if sparse else SwiGLU(d, c["dense_intermediate_size"])
        shared = c.get("shared_expert_intermediate_size")
        self.shared_expert = SwiGLU(d, shared) if sparse and shared else None

    def forward(self, h, rope, key_mask, kv=None):
        """(output, keys, values): see networks.attention."""
        a, k, v = self.self_attn(self.input_layernorm(h), rope, key_mask, kv)
        h = h + a
        m = self.post_attention_layernorm(h)
        out = self.mlp(m)
        if self.shared_expert is not None:
            out = out + self.shared_expert(m)
        return h + out, k, v


class LLaDAMoE(nn.Module):
    """LLaDA-MoE layout: model.{embed_tokens, layers.i, norm}, lm_head; row i predicts token i."""
    shift = 0

    def __init__(self, c):
        super().__init__()
        self.config, self.theta = c, c["rope_theta"]
        self.head_dim = c["hidden_size"] // c["num_attention_heads"]
        self.rope_dim = int(self.head_dim * c.get("partial_rotary_factor", 1.0))
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(LLaDAMoEBlock(c, i) for i in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def parts(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head


def active_parameters(config):
    """Parameters a token runs through (its top-k experts, not all of them), the head included,
    the embedding (a lookup) left out: the FLOP bound's 2 x active parameters per token."""
    d, n_heads = config["hidden_size"], config["num_attention_heads"]
    kv = d // n_heads * (config.get("num_key_value_heads") or n_heads)
    attention_params = 2 * d * d + 2 * d * kv
    total = 0
    for flag in config["moe_layer_freq"][:config["num_hidden_layers"]]:
        if flag:
            mlp = config["num_experts_per_tok"] * 3 * d * config["expert_intermediate_size"] + d * config["num_experts"]
            mlp += 3 * d * (config.get("shared_expert_intermediate_size") or 0)
        else:
            mlp = 3 * d * config["dense_intermediate_size"]
        total += attention_params + mlp
    return total + d * config["vocab_size"]
