"""kvctl's attention backend for transformers models — the one file that touches
transformers internals.

The model runs stateless (no HF cache). Its attention layers call ``kvctl_attention``
(registered with transformers' ``AttentionInterface``) with query/key/value after RoPE,
``[1, H, N, D]`` for one packed row of N tokens from several sequences. The per-step
``StepPlan`` (engine/plan.py) arrives as the ``kvctl_plan`` keyword: it says which rows
belong to which sequence, where each new token's K/V goes, and the block tables to
attend over. The function writes K/V into the store, then attends:

* decode rows (one token of a sequence): the paged decode kernel over the block table,
  whose per-block softmax partials feed the attention statistics;
* prefill rows (a chunk of a prompt): causal attention over the sequence's stored
  prefix plus the chunk, by absolute positions (blocks evicted from the middle simply
  are not there).

Compiled steps (``compile_model``): ``torch.compile`` of the whole model with kvctl
attention as one opaque custom op (``kvctl::attention``), vLLM's split: the norms, RoPE,
residual adds and the MLP's activation fuse into a few kernels per layer, the attention
(block writes, the paged decode kernel, statistics) runs as written. The plan reaches
the op through the step's context (``_CURRENT``), not through the model's kwargs, so
the compiled graph holds no plan object and guards on none.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from engine.kernels.paged_decode import paged_decode

ATTN_NAME = "kvctl"


_CURRENT: list = [None]     # the plan of the compiled step running now (one engine thread)


def kvctl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    kvctl_plan=None, **kwargs):
    """query [1, Hq, N, D], key/value [1, H, N, D] -> (out [1, N, Hq, D], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return torch.ops.kvctl.attention(query, key, value, module.layer_idx, scale), None
    plan = kvctl_plan if kvctl_plan is not None else _CURRENT[0]
    if plan is None:
        raise RuntimeError("kvctl attention called without a step plan; run the model "
                           "through engine.runner, or pick another attn_implementation")
    return _attend(plan, module.layer_idx, query, key, value, scale), None


@torch.library.custom_op("kvctl::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                  scale: float) -> torch.Tensor:
    """The compiled graph's view of kvctl attention: opaque; writes the step's K/V into
    the store and attends with the plan in ``_CURRENT``."""
    plan = _CURRENT[0]
    if plan is None:
        raise RuntimeError("compiled kvctl attention ran outside attention.forward")
    return _attend(plan, layer, query, key, value, scale)


@_attention_op.register_fake
def _(query, key, value, layer, scale):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def _attend(plan, layer: int, query, key, value, scale: float) -> torch.Tensor:
    q = query[0].transpose(0, 1)            # [N, Hq, D]
    k = key[0].transpose(0, 1)              # [N, H, D]
    v = value[0].transpose(0, 1)
    plan.write_kv(layer, k, v)
    arena_row = plan.arena_row(layer)
    out = torch.empty_like(q) if plan.prefills else None
    if plan.num_decode:
        # decode rows come first in the packed batch (engine/plan.py: build_plan)
        d = plan.decode
        qd = q[:plan.num_decode]
        offs, kb, vb, nt = plan.decode_table(layer, qd)
        o, m, l = paged_decode(qd, arena_row, offs, kb, vb, nt, plan.geom, scale, fmt=d.fmt,
                               cache=plan.layer_cache, groups=d.groups, row_len=d.lengths)
        plan.decode_done(layer)
        plan.record_partials(layer, m, l)
        if out is None:         # a decode-only step: the kernel's output is the layer's
            return o.to(q.dtype).unsqueeze(0)
        out[:plan.num_decode] = o
    for seg in plan.prefills:
        rows = slice(seg.start, seg.start + seg.length)
        if seg.plain_causal:  # keys are exactly this chunk: use them as they came
            kk, vv, kpos = k[rows].transpose(0, 1), v[rows].transpose(0, 1), seg.positions
        else:
            kk, vv, kpos = plan.gather_prefix(layer, seg)      # [H, M, D] x2, [M]
        qq = q[rows].transpose(0, 1)                             # [Hq, n, D]
        if seg.plain_causal or seg.tail_causal:
            # grouped-query attention on the kv heads as they are (the flash kernel reads
            # each kv head for its query heads); no [Hq, M, D] copies of K and V per layer
            # (at 30K keys on an 8B shape: 0.5 GB written and read again per layer)
            o = F.scaled_dot_product_attention(
                qq.unsqueeze(0), kk.unsqueeze(0), vv.unsqueeze(0), scale=scale,
                is_causal=seg.plain_causal, enable_gqa=True,
                # tail: the same mask, never built: an [n, M] boolean per layer (6K queries
                # over 24K keys: 144 M elements) that the fused kernels then read as a bias
                attn_mask=None if seg.plain_causal else causal_lower_right(qq.shape[1],
                                                                           kk.shape[1]))
        else:
            # an explicit mask (host blocks in the prefix): the kernels that take a mask
            # do not take grouped heads, so K and V are repeated per query head
            g = qq.shape[0] // kk.shape[0]
            mask = kpos.view(1, -1) <= seg.positions.view(-1, 1)    # [n, M]
            o = F.scaled_dot_product_attention(
                qq.unsqueeze(0), kk.repeat_interleave(g, 0).unsqueeze(0),
                vv.repeat_interleave(g, 0).unsqueeze(0), attn_mask=mask, scale=scale)
        out[rows] = o[0].transpose(0, 1)
        if seg.observe:
            plan.record_observation(layer, seg, qq, kk, kpos, scale)
    return out.unsqueeze(0)


AttentionInterface.register(ATTN_NAME, kvctl_attention)


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Select kvctl attention; the model then runs without any HF cache. Llama attention
    layers get one fused Q/K/V projection (``fuse_qkv``)."""
    model.set_attn_implementation(ATTN_NAME)
    model.config.use_cache = False
    fuse_qkv(model)
    return model


def fuse_qkv(model: torch.nn.Module) -> int:
    """Give each ``LlamaAttention`` one Q/K/V weight, as vLLM's QKVParallelLinear does:
    at batch 1 the K and V GEMVs (8 MiB each on a Llama-3-8B) read their weights at half
    the bandwidth the 4x larger Q GEMV reaches, and each GEMV pays a split-K reduction.
    ``q_proj``/``k_proj``/``v_proj`` keep working on views of the fused weight (no second
    copy), so the model still runs transformers' own forward under any other attention
    implementation (tests and benchmarks switch the same object to sdpa). Returns the
    number of layers fused; other architectures are left as they are."""
    n = 0
    for m in model.modules():
        if type(m) is not LlamaAttention:
            continue
        lins = (m.q_proj, m.k_proj, m.v_proj)
        if not all(type(x) is torch.nn.Linear for x in lins) or \
                len({(x.weight.dtype, x.weight.device, x.bias is None) for x in lins}) != 1:
            continue
        with torch.no_grad():
            w = torch.cat([x.weight for x in lins])
            b = None if m.q_proj.bias is None else torch.cat([x.bias for x in lins])
            start = 0
            for x in lins:
                rows = x.weight.shape[0]
                x.weight = torch.nn.Parameter(w[start:start + rows], requires_grad=False)
                if b is not None:
                    x.bias = torch.nn.Parameter(b[start:start + rows], requires_grad=False)
                start += rows
        m.register_buffer("kvctl_qkv_weight", w, persistent=False)
        m.register_buffer("kvctl_qkv_bias", b, persistent=False)
        m.kvctl_qkv_sizes = [x.weight.shape[0] for x in lins]
        m.forward = types.MethodType(_fused_llama_attention, m)
        n += 1
    return n


def _fused_llama_attention(self, hidden_states, position_embeddings=None, attention_mask=None,
                           **kwargs):
    """LlamaAttention.forward with one Q/K/V GEMM, for kvctl attention (stateless: no HF
    cache to update); any other implementation runs transformers' own forward."""
    if self.config._attn_implementation != ATTN_NAME:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    qkv = F.linear(hidden_states, self.kvctl_qkv_weight, self.kvctl_qkv_bias)
    q, k, v = (t.view(shape).transpose(1, 2) for t in qkv.split(self.kvctl_qkv_sizes, -1))
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out, weights = kvctl_attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                   **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(out), weights


def compile_model(model: torch.nn.Module):
    """The model's forward compiled around kvctl attention (see the module docstring);
    pass it to ``forward`` as ``compiled``. Shapes are dynamic in the token count: one
    graph serves every batch (dynamo specializes a count of 1 apart)."""
    return torch.compile(model, dynamic=True)


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, plan,
            logits_rows: torch.Tensor, compiled=None) -> torch.Tensor:
    """One packed step. input_ids/position_ids [1, N]; returns logits [len(rows), V].
    ``compiled``: ``compile_model(model)``, run instead of the model."""
    if plan.decode is not None and plan.decode.stager is not None:
        plan.decode.stager.begin()
    if compiled is None:
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=logits_rows, kvctl_plan=plan)
        return out.logits[0]
    _CURRENT[0] = plan
    try:
        out = compiled(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                       logits_to_keep=logits_rows)
    finally:
        _CURRENT[0] = None
    return out.logits[0]
