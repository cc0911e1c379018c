"""A decoder-only transformer over discrete tokens (GPT-2 shape, pre-norm), with a key/value
cache for sampling, and the temperature / top-k / top-p filter.

The sequence is [start, t_0, ..., t_{L-2}] -> predicts [t_0, ..., t_{L-1}]; the start token is a
class token (one per class) or one shared start-of-sequence token. Token ids >= vocab_size are
those special tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KVCache = list[tuple[Tensor, Tensor]]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # new positions attend to every cached one and causally among themselves
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        past = k.shape[2] - T
        if past == 0:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(h.transpose(1, 2).reshape(B, T, C)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, kv = self.attn(self.ln1(x), cache)
        x = x + h
        return x + self.mlp(self.ln2(x)), kv


class Transformer(nn.Module):
    def __init__(self, *, vocab_size: int, seq_len: int, num_classes: int = 0, dim: int = 128,
                 layers: int = 4, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.vocab_size, self.seq_len, self.num_classes = vocab_size, seq_len, num_classes
        self.tok = nn.Embedding(vocab_size + max(num_classes, 1), dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        # Scaled to the width, as x-transformers initialises: linear layers keep PyTorch's
        # U(±1/√fan_in), the token embeddings are He-normal (std √(2/dim)) and the positions
        # N(0, 1/dim). GPT-2's N(0, 0.02) everywhere is about PyTorch's std at its width, 768,
        # but 2.5x too small at 128, where it cost 0.04 nats per token at 300 steps (bench/peers.py).
        nn.init.kaiming_normal_(self.tok.weight)
        nn.init.normal_(self.pos, std=dim ** -0.5)

    def start_tokens(self, n: int, labels: Tensor | None, device: torch.device) -> Tensor:
        if labels is None:
            return torch.full((n, 1), self.vocab_size, dtype=torch.long, device=device)
        return (self.vocab_size + labels.long()).view(n, 1)

    def forward(self, idx: Tensor, cache: KVCache | None = None
                ) -> tuple[Tensor, KVCache]:
        """Logits (B, T, vocab) for positions past..past+T, and the extended cache."""
        past = cache[0][0].shape[2] if cache else 0
        x = self.tok(idx) + self.pos[:, past:past + idx.shape[1]]
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache else None)
            new_cache.append(kv)
        return self.head(self.ln(x)), new_cache

    def logits(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, L, vocab) next-token logits of a (B, L) batch of token sequences (teacher
        forcing): position i predicts tokens[:, i]."""
        start = self.start_tokens(len(tokens), labels if self.num_classes else None, tokens.device)
        return self(torch.cat([start, tokens[:, :-1]], dim=1))[0]

    def loss(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """Next-token cross-entropy over a (B, L) batch of token sequences."""
        return F.cross_entropy(self.logits(tokens, labels).reshape(-1, self.vocab_size),
                               tokens.reshape(-1))

    @torch.no_grad()
    def generate(self, n: int, *, labels: Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
        """(n, seq_len) sampled tokens. With use_cache each step feeds one token and reuses the
        keys and values of the earlier ones; without it every step reruns the whole prefix."""
        device = self.pos.device
        seq = self.start_tokens(n, labels if self.num_classes else None, device)
        cache: KVCache | None = None
        for t in range(self.seq_len):
            if use_cache:
                logits, cache = self(seq[:, -1:], cache)
            else:
                logits, _ = self(seq)
            nxt = sample_token(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if progress is not None:
                progress(t + 1, self.seq_len)
        return seq[:, 1:]


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Logits with everything outside the top k, and outside the smallest set whose probability
    reaches top_p (nucleus), set to -inf. The most likely token always survives."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
