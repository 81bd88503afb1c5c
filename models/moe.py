"""The sparse mixture-of-experts FFN (qwen3moe; llama.cpp build_moe_ffn with softmax gating): a router picks the
top-k experts per token, whose SwiGLU FFNs run through ggml's mul_mat_id on experts stacked as 3-D tensors
(ffn_gate_exps / ffn_up_exps / ffn_down_exps, [n_in, n_out, n_expert]), and the outputs are summed with the
router's probabilities as weights (renormalised over the k chosen when `expert_weights_norm`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ml.backend import Context, Tensor
from ml.module import weight
from ml.nn import Linear, RMSNorm
from models.decoder import Block, DecoderParams

# llama.cpp clamps the weight sum to the smallest normal f16 before dividing, so a row of tiny weights stays finite.
_MIN_WEIGHT_SUM = 6.103515625e-5


@dataclass(kw_only=True)
class MoeBlock(Block):
    """A decoder block whose dense FFN is replaced by routed experts."""

    ffn_gate: Linear | None = weight(optional=True)  # type: ignore[assignment]
    ffn_up: Linear | None = weight(optional=True)  # type: ignore[assignment]
    ffn_down: Linear | None = weight(optional=True)  # type: ignore[assignment]
    ffn_gate_inp: Linear = weight(shape=lambda p: (p.n_embd, p.n_expert))
    ffn_gate_exps: Tensor = weight(shape=lambda p: (p.n_embd, p.n_ff_exp, p.n_expert))
    ffn_up_exps: Tensor = weight(shape=lambda p: (p.n_embd, p.n_ff_exp, p.n_expert))
    ffn_down_exps: Tensor = weight(shape=lambda p: (p.n_ff_exp, p.n_embd, p.n_expert))
    ffn_gate_shexp: Linear | None = weight(optional=True, shape=lambda p: (p.n_embd, p.n_ff_exp))
    ffn_up_shexp: Linear | None = weight(optional=True, shape=lambda p: (p.n_embd, p.n_ff_exp))
    ffn_down_shexp: Linear | None = weight(optional=True, shape=lambda p: (p.n_ff_exp, p.n_embd))

    def ffn(self, ctx: Context, h: Tensor, p: DecoderParams) -> Tensor:
        n_embd, n = h.shape[0], (tuple(h.shape) + (1,))[1]
        k = p.n_expert_used
        logits = self.ffn_gate_inp.forward(ctx, h)  # [n_expert, n]
        probs = logits.sigmoid(ctx) if p.moe_sigmoid else logits.softmax(ctx)
        chosen = probs.top_k(ctx, k)  # I32 [k, n] (sigmoid is monotonic: the same as the logits' top k)
        weights = probs.reshape(ctx, 1, p.n_expert, n).get_rows(ctx, chosen)  # [1, k, n]
        if p.expert_weights_norm:
            w = weights.reshape(ctx, k, n)
            total = w.sum_rows(ctx).clamp(ctx, _MIN_WEIGHT_SUM, float("inf"))  # [1, n]
            weights = w.div(ctx, total).reshape(ctx, 1, k, n)
        if p.expert_weights_scale not in (0.0, 1.0):
            weights = weights.scale(ctx, p.expert_weights_scale)
        x = h.reshape(ctx, n_embd, 1, n)
        up = self.ffn_up_exps.matmul_id(ctx, x, chosen)  # [n_ff_exp, k, n]
        gate = self.ffn_gate_exps.matmul_id(ctx, x, chosen)
        if p.moe_sigmoid:  # llama4 weighs the expert's input; gate and up are linear in it
            up, gate = up.mul(ctx, weights), gate.mul(ctx, weights)
        out = self.ffn_down_exps.matmul_id(ctx, gate.swiglu(ctx, up), chosen)  # [n_embd, k, n]
        if not p.moe_sigmoid:
            out = out.mul(ctx, weights)
        total_out = out.view(ctx, 0, (n_embd, n), (out.stride(2),))
        for i in range(1, k):  # sum over the chosen experts, in the order top_k gave them
            total_out = total_out.add(ctx, out.view(ctx, i * out.stride(1), (n_embd, n), (out.stride(2),)))
        if k == 1:
            total_out = total_out.contiguous(ctx)
        if self.ffn_gate_shexp is not None and self.ffn_up_shexp is not None and self.ffn_down_shexp is not None:
            shared = self.ffn_gate_shexp.forward(ctx, h).swiglu(ctx, self.ffn_up_shexp.forward(ctx, h))
            total_out = total_out.add(ctx, self.ffn_down_shexp.forward(ctx, shared))
        return total_out


@dataclass(kw_only=True)
class MoeNormBlock(MoeBlock):
    """MoE with the q/k RMSNorm per head that qwen3moe requires."""

    attn_q_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))
    attn_k_norm: RMSNorm = weight(shape=lambda p: (p.head_dim_k,))
