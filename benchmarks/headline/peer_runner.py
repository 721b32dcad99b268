"""The peers on the suite's samples, run by the peers environment's python (kvpress pins
an older transformers than kvctl's): JSON in, JSON out, token ids only.

    .venv-peers/bin/python benchmarks/headline/peer_runner.py REQUEST.json RESULT.json

Imports nothing of kvctl. Per sample, the context is prefilled once with transformers'
own model and a ``DynamicCache``, capturing each attention layer's input hidden states
and RoPE embeddings; each config then builds its cache from that prefill:

* kvpress presses (``ScorerPress``: StreamingLLM, SnapKV, TOVA, ExpectedAttention,
  KNorm) with ``compression_ratio = 1 - budget``: ``press.compress`` on each layer's
  keys and values with that layer's hidden states, as kvpress's forward hook does
  right after the layer's prefill. Doing it after the whole prefill is the same: a
  layer's compression never changes a later layer's prefill (it already attended).
* transformers' ``QuantizedCache`` (quanto backend, int4 / int2, its defaults: groups
  of 64, residual 128): each layer's keys and values go through ``cache.update`` as in
  the prefill, which quantizes the whole prompt.
* ``full``: the plain cache.

Then the continuation is one teacher-forced forward over the cache (positions after the
full context, as kvpress's pipeline does), and each scored position records the NLL of
its target, whether it was the argmax, and KL(full || config). Bytes read at the answer:
kvpress: (context tokens kept + continuation tokens before the answer) / (all of them);
quanto: the quantized tensors' own bytes (codes, scales, shifts) plus the full-precision
tokens, over the same tokens at 16 bits.
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback

import torch

PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
}


def tensor_bytes(t) -> int:
    """Bytes a tensor holds, counting a quanto tensor's inner tensors (codes, scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class Prefill:
    """One context through the model with each attention layer's inputs captured."""

    def __init__(self, model, ids: list[int]) -> None:
        from transformers import DynamicCache
        self.model = model
        self.n = len(ids)
        self.inputs: dict[int, tuple] = {}
        hooks = []
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.self_attn.register_forward_hook(
                self._grab(i), with_kwargs=True))
        self.cache = DynamicCache()
        try:
            model.model(input_ids=torch.tensor([ids]), past_key_values=self.cache)
        finally:
            for h in hooks:
                h.remove()

    def _grab(self, i: int):
        def hook(module, args, kwargs, output):
            self.inputs[i] = (module, kwargs["hidden_states"], kwargs)
        return hook

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.cache.layers[i]
        return layer.keys, layer.values

    def pressed(self, press):
        """A new DynamicCache holding the press's kept keys and values per layer."""
        from transformers import DynamicCache
        cache = DynamicCache()
        # the press's own set-up (post_init_from_model, each layer's rotary_emb); its
        # hooks stay idle: no forward runs inside
        with press(self.model):
            for i in range(len(self.cache.layers)):
                module, hs, kwargs = self.inputs[i]
                k, v = self.layer_kv(i)
                k2, v2 = press.compress(module, hs, k.clone(), v.clone(), None, kwargs)
                cache.update(k2, v2, i)
        return cache

    def full(self):
        from transformers import DynamicCache
        cache = DynamicCache()
        for i in range(len(self.cache.layers)):
            k, v = self.layer_kv(i)
            cache.update(k.clone(), v.clone(), i)
        return cache

    def quantized(self, nbits: int):
        from transformers import QuantizedCache
        cache = QuantizedCache(backend="quanto", config=self.model.config, nbits=nbits)
        for i in range(len(self.cache.layers)):
            k, v = self.layer_kv(i)
            cache.update(k.clone(), v.clone(), i)
        return cache


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += tensor_bytes(t)
    return total


def continuation_logits(model, cache, n_ctx: int, cont: list[int]) -> torch.Tensor:
    """Logits [len(cont), V]: row j predicts cont[j + 1]."""
    pos = torch.arange(n_ctx, n_ctx + len(cont)).unsqueeze(0)
    out = model(input_ids=torch.tensor([cont]), past_key_values=cache, position_ids=pos)
    return out.logits[0].float()


def run(req: dict) -> dict:
    import kvpress
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(int(req.get("threads", 1)))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16}[req.get("dtype", "bfloat16")]
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=dtype)
    model.eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tok_bytes16 = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
    records, errors = [], {}
    t_start = time.time()
    for s in req["samples"]:
        ctx, cont, scored = s["context_ids"], s["continuation_ids"], s["scored"]
        first = min(scored)
        with torch.inference_mode():
            t0 = time.perf_counter()
            pre = Prefill(model, ctx)
            prefill_s = time.perf_counter() - t0
            ref = None
            full = {"name": "peers full", "family": "peers full", "peer": "full",
                    "budget": 1.0}       # transformers' own cache: the peers' reference
            for c in [full] + req["configs"]:
                name = c["name"]
                if name in errors:
                    continue
                t0 = time.perf_counter()
                try:
                    if c["peer"] == "full":
                        cache = pre.full()
                    elif c["peer"] == "kvpress":
                        press = getattr(kvpress, PRESSES[c["method"]])(
                            compression_ratio=1.0 - c["budget"])
                        cache = pre.pressed(press)
                    elif c["peer"] == "quanto":
                        cache = pre.quantized(int(c["nbits"]))
                    else:
                        raise ValueError(f"unknown peer {c['peer']!r}")
                    if c["peer"] == "quanto":
                        ctx_bytes = cache_bytes(cache)
                    else:
                        kept = sum(layer.keys.shape[-2] for layer in cache.layers)
                        ctx_bytes = kept / len(cache.layers) * tok_bytes16
                    read = (ctx_bytes + first * tok_bytes16) / ((len(ctx) + first) * tok_bytes16)
                    logits = continuation_logits(model, cache, len(ctx), cont)
                except Exception as e:      # a peer that cannot run says why, once
                    errors[name] = f"{type(e).__name__}: {e}"
                    print(f"[peers] {name} failed: {errors[name]}\n{traceback.format_exc()}",
                          file=sys.stderr, flush=True)
                    continue
                lp = torch.log_softmax(logits, -1)
                rows = [p - 1 for p in scored]
                targets = torch.tensor([cont[p] for p in scored])
                sel = lp[rows]
                if ref is None:
                    ref = sel
                nll = (-sel.gather(1, targets[:, None])[:, 0]).tolist()
                correct = (sel.argmax(-1) == targets).tolist()
                kl = (ref.exp() * (ref - sel)).sum(-1).tolist()
                records.append(dict(sample=s["id"], task=s["task"], length=s["length"],
                                    config=name, family=c.get("family", name), side="peer",
                                    kind=c["peer"], strategy=c.get("method", ""),
                                    budget=c["budget"], host=False, read=read, gpu=read,
                                    groups=s["groups"], scored=scored, nll=nll,
                                    correct=correct, kl=kl, prefill_s=prefill_s,
                                    decode_s=time.perf_counter() - t0, error=""))
            del pre
        print(f"[peers {time.time() - t_start:.0f}s] {s['id']} done", file=sys.stderr,
              flush=True)
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("torch", "transformers", "kvpress", "optimum-quanto")}
    return dict(records=records, errors=errors, versions=versions,
                seconds=time.time() - t_start)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: peer_runner.py REQUEST.json RESULT.json")
    with open(argv[0]) as f:
        req = json.load(f)
    out = run(req)
    with open(argv[1], "w") as f:
        json.dump(out, f)
    assert all(math.isfinite(x) for r in out["records"] for x in r["nll"])


if __name__ == "__main__":
    main(sys.argv[1:])
