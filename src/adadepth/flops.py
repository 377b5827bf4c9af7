"""Analytic FLOPs per token, module by module, counting only what is executed.

A multiply-add is 2 FLOPs. Backward costs twice the forward for modules whose weights train
(gradients for inputs and for weights) and once the forward for frozen modules the gradient
still crosses (inputs only); nothing below the lowest trainable module is differentiated at all.
Attention scores have no weights but two activation operands: crossing them costs twice their
forward. Attention cost depends on how many keys a query sees: `context`.
"""

from __future__ import annotations

import functools
import time

import torch

from adadepth.config import ModelConfig


def linear(d_in: int, d_out: int) -> float:
    return 2.0 * d_in * d_out


def swiglu(d_model: int, d_ff: int) -> float:
    return 3 * linear(d_model, d_ff)


def ffn(cfg: ModelConfig) -> float:
    """One dense FFN: three matrices for a gated one (SwiGLU), two for a plain MLP (GPT-2)."""
    return cfg.ffn_matrices * linear(cfg.d_model, cfg.d_ff)


def low_rank(d_model: int, rank: int) -> float:
    return linear(d_model, rank) + linear(rank, d_model)


def attention(cfg: ModelConfig, context: float) -> dict[str, float]:
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {
        "attn_proj": linear(cfg.d_model, q_out) + 2 * linear(cfg.d_model, kv_out)
        + linear(q_out, cfg.d_model),
        # Scores q.k and the weighted sum of values, each 2*context*head_dim per head.
        "attn_scores": 2 * 2.0 * context * q_out,
    }


def causal_context(seq_len: int) -> float:
    """Mean number of keys a query sees in a causal prefill of seq_len tokens."""
    return (seq_len + 1) / 2


def forward_per_token(cfg: ModelConfig, context: float) -> dict[str, float]:
    """Forward FLOPs per token of the dense model, by module."""
    attn = attention(cfg, context)
    return {
        "attn_proj": cfg.n_layers * attn["attn_proj"],
        "attn_scores": cfg.n_layers * attn["attn_scores"],
        "ffn": cfg.n_layers * ffn(cfg),
        "lm_head": linear(cfg.d_model, cfg.vocab_size),
    }


def train_per_token(cfg: ModelConfig, context: float) -> float:
    """Forward plus backward FLOPs per token of dense training (everything trains)."""
    return 3 * sum(forward_per_token(cfg, context).values())


@functools.cache
def measured_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul throughput of this machine in `dtype`, the yardstick for utilisation.

    CPUs have no published peak we can trust here, so we time one large matmul repeatedly and
    keep the fastest repetition: contention from a shared machine only ever slows a repetition
    down, and a mean over a contended window made utilisation read above 100 % later. Measure in
    the dtype the work runs in (bf16 under autocast on a GPU is several times the fp32 rate).
    """
    n = 1024 if device == "cpu" else 8192
    # A private generator: drawing from the global one would shift a resumed run's random stream.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up
    best, reps, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < 0.3 or reps < 3:
        t = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2.0 * n**3 / best


def module_flops(module: torch.nn.Module) -> float:
    """Forward FLOPs per token of a module built from linear layers, each applied once:
    `nn.Linear` and transformers' `Conv1D` (GPT-2's linear layers, weights stored transposed).

    Modules that apply a layer more than once say so with a `flops_per_token()` method.
    """
    if hasattr(module, "flops_per_token"):
        return module.flops_per_token()
    return sum(2.0 * m.weight.numel() for m in module.modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
