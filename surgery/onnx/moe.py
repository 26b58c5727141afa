"""Mixture-of-experts blocks made traceable for ONNX export, during the export only.

transformers 5 runs the experts of Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE (every class decorated
with `use_experts_implementation`) through grouped_mm on CPU: the dynamo exporter has no ONNX
lowering for grouped_mm, and the legacy exporter none for the histc that computes its offsets.
"eager" loops over the experts a batch hits (data-dependent), and "batched_mm" gathers one copy of
an expert's weights per (token, expert) pair, which traces but makes a prefill of T tokens
materialise T·k weight matrices (gigabytes per layer for a real Mixtral).

    with dense_experts(model) as note:   # note: None when the model has no such experts
        torch.onnx.export(model, ...)     # every expert on every token, weighted densely

The dense formulation runs every expert on every token (one batched MatMul over the experts'
fused gate/up and down parameters, which transformers already stores as (experts, out, in)) and
combines them with the router's top-k weights scattered into a (tokens, experts) matrix, zeros for
the experts a token did not select. The router itself (softmax, top-k, renormalisation) is the
model's own code and traces as it is. The sum is the sparse block's sum plus exact zeros, so the
graph computes the same function; it costs experts/top_k times the sparse block's expert FLOPs
(activations, not weights, grow: (experts, tokens, intermediate)).

Only the instances' `forward` is replaced, and restored on exit: models and classes are never
modified permanently, and the PyTorch reference used for validation runs the untouched code.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

#: attributes transformers' `use_experts_implementation` decorator sets on an experts module
_DECORATED = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")


def is_fused_experts(module: torch.nn.Module) -> bool:
    """True for an experts module of transformers' `use_experts_implementation` kind (3-D fused
    weights, forward(hidden_states, top_k_index, top_k_weights)), outside expert parallelism."""
    if not all(hasattr(module, a) for a in _DECORATED) or getattr(module, "_is_expert_parallel", False):
        return False
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.ndim == down.ndim == 3


def _linear_all(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """Every expert's linear on every row: x (T, in) or (E, T, in), weight (E, out, in) (or (E, in, out)
    when transposed), bias (E, out) -> (E, T, out)."""
    w = weight if transposed else weight.transpose(1, 2)
    out = torch.matmul(x.to(weight.dtype), w)
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out


def dense_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts block computed densely: sum over experts e of routing[t, e] · expert_e(x_t).

    Args:
        self: an experts module for which is_fused_experts() holds.
        hidden_states: (tokens, hidden). top_k_index: (tokens, k) expert ids chosen by the router.
        top_k_weights: (tokens, k) their routing weights.

    Returns:
        (tokens, hidden) in hidden_states' dtype, equal to transformers' sparse implementations up to
        the order of floating-point summation.

    Example:
        >>> experts.forward = types.MethodType(dense_experts_forward, experts)
    """
    num_experts = self.down_proj.shape[0]
    # (tokens, experts): each token's top-k weights at its experts' columns, exact zeros elsewhere
    routing = torch.zeros(top_k_weights.shape[0], num_experts, dtype=top_k_weights.dtype,
                          device=top_k_weights.device).scatter(1, top_k_index, top_k_weights)
    if self.has_gate:
        bias = self.gate_up_proj_bias if self.has_bias else None
        proj = self._apply_gate(_linear_all(hidden_states, self.gate_up_proj, bias, self.is_transposed))
    else:
        bias = self.up_proj_bias if self.has_bias else None
        proj = self.act_fn(_linear_all(hidden_states, self.up_proj, bias, self.is_transposed))
    out = _linear_all(proj, self.down_proj, self.down_proj_bias if self.has_bias else None, self.is_transposed)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    weighted = out * routing.transpose(0, 1).unsqueeze(-1)  # (experts, tokens, hidden)
    return weighted.sum(dim=0).to(hidden_states.dtype)


def _note(modules: list[Any]) -> str:
    """The manifest's line: how many blocks, and the FLOPs factor experts/top_k (from the config
    the decorator keeps on each experts module)."""
    k = getattr(getattr(modules[0], "config", None), "num_experts_per_tok", None)
    e = modules[0].down_proj.shape[0]
    cost = f"{e}/{k} = {e / k:g}x" if isinstance(k, int) and k > 0 else f"{e}/top_k x"
    return (f"MoE: {len(modules)} experts blocks exported densely (every expert on every token, weighted by the "
            f"router's top-k weights, zeros elsewhere): same function as the sparse model, {cost} its expert FLOPs")


@contextlib.contextmanager
def dense_experts(model: torch.nn.Module) -> Iterator[str | None]:
    """Within the block, every fused experts module of `model` computes densely (traceable by both
    torch.onnx exporters); on exit each instance's own forward is back.

    Args:
        model: any module; those without fused experts pass through unchanged.

    Yields:
        A one-line note for the manifest (what was swapped and what it costs), or None when the
        model has no fused experts.

    Example:
        >>> with dense_experts(mixtral) as note:
        ...     torch.onnx.export(mixtral, args, dynamo=True)
    """
    modules = [m for m in model.modules() if is_fused_experts(m)]
    if not modules:
        yield None
        return
    saved = [(m, m.__dict__.get("forward")) for m in modules]
    try:
        for m in modules:
            m.forward = types.MethodType(dense_experts_forward, m)
        yield _note(modules)
    finally:
        for m, own in saved:
            if own is None:
                del m.forward
            else:
                m.forward = own
