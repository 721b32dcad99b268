"""Between kvctl_proto messages and the engine's / controller's plain dataclasses."""
from __future__ import annotations

import re
import socket

from engine.actions import parse_fill_format
from engine.api import FinishEvent, Request, SamplingParams, TokenEvent
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 16
# a client-chosen seq_id is logged, listed and typed back into the CLI: short and plain
SEQ_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
ASSIGNED_SEQ_ID = re.compile(r"seq-[0-9]+")    # engine.Engine.submit's form for unnamed requests
# the keys of EngineSnapshot.prefix, as NodeStatus.prefix names them
PREFIX_FIELDS = tuple(f.name for f in pb.PrefixCache.DESCRIPTOR.fields)


def _check_plain_id(field: str, value: str) -> None:
    if not SEQ_ID.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(f"{field} must be at most 64 characters of A-Z a-z 0-9 . _ : - "
                         f"(got {len(value)} characters: {shown!r})")


def check_session_id(session_id: str) -> None:
    """Raises ValueError unless ``session_id`` is a session id a client may use (the
    rule of seq_id: it is listed and typed back into the CLI too)."""
    _check_plain_id("session_id", session_id)


def check_seq_id(seq_id: str) -> None:
    """Raises ValueError unless ``seq_id`` may be chosen by a client."""
    _check_plain_id("seq_id", seq_id)
    if ASSIGNED_SEQ_ID.fullmatch(seq_id):
        raise ValueError(f"seq_id {seq_id!r}: the form seq-<number> is reserved for ids the "
                         "daemon assigns; choose another id or leave seq_id empty")


def request_from_proto(r: pb.GenerateRequest) -> Request:
    """Raises ValueError with a message naming the bad field."""
    s = r.sampling
    if len(s.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"sampling.stop has {len(s.stop)} strings, at most {MAX_STOP_STRINGS}")
    sampling = SamplingParams(
        temperature=s.temperature, top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
        stop=tuple(s.stop), ignore_eos=s.ignore_eos)
    which = r.WhichOneof("input")
    if which is None:
        raise ValueError("give one of prompt, messages or prompt_ids")
    kw: dict = {}
    if which == "prompt":
        if not r.prompt:
            raise ValueError("prompt is empty")
        kw["prompt"] = r.prompt
    elif which == "messages":
        if not r.messages.messages:
            raise ValueError("messages is empty")
        msgs = [{"role": m.role, "content": m.content} for m in r.messages.messages]
        for i, m in enumerate(msgs):
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool, "
                                 f"got {m['role']!r}")
        kw["messages"] = msgs
    else:
        if not r.prompt_ids.ids:
            raise ValueError("prompt_ids is empty")
        kw["prompt_ids"] = list(r.prompt_ids.ids)
    if r.seq_id:
        check_seq_id(r.seq_id)
    if r.session_id:
        check_session_id(r.session_id)
    if r.strategy:
        from controller.policy import check_strategy_name
        from controller.strategies import fill_format_of
        check_strategy_name(r.strategy)
        kw["kv_format"] = fill_format_of(r.strategy)
    if r.kv_format:
        parse_fill_format(r.kv_format)      # ValueError naming the field and the formats
        kw["kv_format"] = r.kv_format
    return Request(sampling=sampling, priority=r.priority, seq_id=r.seq_id or None,
                   strategy=r.strategy or None, session_id=r.session_id or None, **kw)


def token_to_proto(ev: TokenEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(token=pb.TokenDelta(
        seq_id=ev.seq_id, token_id=ev.token_id, text=ev.text, index=ev.index))


class TokenEncoder:
    """TokenEvent -> the serialized GenerateResponse, the bytes ``token_to_proto(ev)``
    serializes to. One per stream: it refills one message instead of building two new
    ones per token (0.5 us instead of 1.5 us a token, measured), on the event loop's
    path of every streamed token."""

    __slots__ = ("_msg", "_delta")

    def __init__(self) -> None:
        self._msg = pb.GenerateResponse()
        self._delta = self._msg.token        # setting a field selects ``token`` in the oneof

    def __call__(self, ev: TokenEvent) -> bytes:
        d = self._delta
        d.seq_id = ev.seq_id
        d.token_id = ev.token_id
        d.text = ev.text
        d.index = ev.index
        return self._msg.SerializeToString()


def started_to_proto(seq_id: str, num_prompt_tokens: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(started=pb.Started(seq_id=seq_id,
                                                  num_prompt_tokens=num_prompt_tokens))


def finish_to_proto(ev: FinishEvent, seconds: float) -> pb.GenerateResponse:
    return pb.GenerateResponse(finished=pb.Finished(
        seq_id=ev.seq_id, reason=FINISH_REASONS.get(ev.reason, pb.FINISH_REASON_UNSPECIFIED),
        text=ev.text, token_ids=ev.token_ids,
        usage=pb.Usage(prompt_tokens=ev.num_prompt_tokens, completion_tokens=ev.num_generated,
                       total_tokens=ev.num_prompt_tokens + ev.num_generated,
                       cached_tokens=ev.cached_tokens),
        kv_bytes_by_tier=ev.kv_bytes_by_tier, kv_bytes_by_format=ev.kv_bytes_by_format,
        strategy_changes=ev.moves, error=ev.error, seconds=seconds))


def strategy_of(view) -> str:
    """What a sequence's KV looks like now: formats present, then where it lives."""
    fmts = [f for f, b in sorted(view.bytes_by_format.items()) if b > 0]
    if "full" in fmts:                       # full first: it is the usual majority
        fmts.remove("full")
        fmts.insert(0, "full")
    parts = fmts or ["empty"]
    if view.bytes_by_tier.get("host", 0) > 0:
        parts.append("offload")
    if any(b.tier in ("evicted", "parked") for b in view.blocks):
        parts.append("evict")
    if getattr(view, "decode_mode", "exact") == "topk":
        parts.append(f"topk{view.top_k}")
    return "+".join(parts)


def sequence_to_proto(v, pinned: str | None, with_blocks: bool = False) -> pb.Sequence:
    out = pb.Sequence(
        seq_id=v.seq_id, state=v.state, num_prompt_tokens=v.num_prompt_tokens,
        num_tokens=v.num_tokens, num_generated=v.num_generated, priority=v.priority,
        decode_mode=v.decode_mode, top_k=v.top_k,
        bytes_by_tier={k: max(0, int(b)) for k, b in v.bytes_by_tier.items()},
        bytes_by_format={k: max(0, int(b)) for k, b in v.bytes_by_format.items()},
        entropy=v.entropy, sink_mass=v.sink_mass, recent_mass=v.recent_mass,
        pinned_strategy=pinned or "", strategy=strategy_of(v),
        num_blocks=len(v.blocks))
    if with_blocks:
        out.blocks.extend(pb.Block(index=b.index, num_tokens=b.num_tokens, format=b.fmt,
                                   tier=b.tier, nbytes=b.nbytes, mass=b.mass) for b in v.blocks)
    return out


def session_to_proto(d: dict, since_s: float = 0.0) -> pb.Session:
    """One of the engine snapshot's session records (EngineSnapshot.sessions).
    ``since_s``: seconds since that snapshot was taken (an idle engine publishes none
    for a while), added to its ages."""
    return pb.Session(
        session_id=d["session_id"], turns=d["turns"], idle_s=d["idle_s"] + since_s,
        age_s=d["age_s"] + since_s, active=d["active"], num_tokens=d["num_tokens"],
        reused_tokens=d["reused_tokens"],
        bytes_by_tier={k: max(0, int(b)) for k, b in d["bytes_by_tier"].items()},
        bytes_by_format={k: max(0, int(b)) for k, b in d["bytes_by_format"].items()},
        seq_id=d.get("seq_id", ""))


def prefix_to_proto(p: dict) -> pb.PrefixCache:
    """The engine snapshot's prefix counters (EngineSnapshot.prefix; empty: all 0)."""
    return pb.PrefixCache(**{f: max(0, int(p.get(f, 0))) for f in PREFIX_FIELDS})


def policy_to_proto(p) -> pb.Policy:
    return pb.Policy(profile=p.profile, budget_bytes=p.budget_bytes,
                     high_watermark=p.high_watermark, low_watermark=p.low_watermark,
                     pins=[pb.PinEntry(seq_id=s, strategy=st) for s, st in sorted(p.pins.items())])


def decision_to_proto(d) -> pb.Decision:
    return pb.Decision(id=d.id, time=d.time, kind=d.kind, seq_id=d.seq_id, action=d.action,
                       reason=d.reason, predicted_cost=d.predicted_cost,
                       freed_bytes=d.freed_bytes, profile=d.profile)


def status_to_proto(sample, policy, effective_budget: int, mode: str, uptime_s: float,
                    draining: bool, version: str, model: str,
                    predictor=None) -> pb.NodeStatus:
    """``predictor``: the policy loop's (its ``info()``: kind, detail, priced, fallbacks)."""
    g, h, snap = sample.gpu, sample.host, sample.snapshot
    st = pb.NodeStatus(
        hostname=socket.gethostname(), version=version, model=model, mode=mode,
        uptime_s=uptime_s, draining=draining, sampled_at=sample.time,
        gpu=pb.GpuInfo(available=g.available, reason=g.reason, name=g.name,
                       memory_used_bytes=g.memory_used_bytes, memory_total_bytes=g.memory_total_bytes,
                       utilization_pct=g.utilization_pct, pcie_tx_bytes_per_s=g.pcie_tx_bytes_per_s,
                       pcie_rx_bytes_per_s=g.pcie_rx_bytes_per_s,
                       pcie_generation=g.pcie_generation, pcie_width=g.pcie_width),
        host=pb.HostInfo(memory_total_bytes=h.memory_total_bytes,
                         memory_available_bytes=h.memory_available_bytes,
                         process_rss_bytes=h.process_rss_bytes, num_cpus=h.num_cpus),
        policy=policy_to_proto(policy))
    st.policy.budget_bytes = effective_budget
    if predictor is not None:
        kind, detail, priced, fallbacks = predictor.info()
        st.predictor.CopyFrom(pb.PredictorInfo(kind=kind, detail=detail, priced=priced,
                                               fallbacks=fallbacks))
    if snap is None:
        return st
    st.device = snap.device
    st.step = snap.step
    st.block_size = snap.block_size
    st.pressure_bytes = max(0, int(snap.pressure_bytes))
    st.tokens_per_s = snap.tokens_per_s
    for t in snap.tiers.values():
        st.tiers.add(name=t.name, device=t.device, capacity_bytes=max(0, t.capacity_bytes),
                     used_bytes=max(0, t.used_bytes), block_bytes=max(0, t.block_bytes),
                     free_bytes=max(0, t.free_bytes), cached_bytes=max(0, t.cached_bytes))
    live = [v for v in snap.sequences if v.state != "finished"]
    st.counts.CopyFrom(pb.SequenceCounts(waiting=snap.num_waiting, running=snap.num_running,
                                         stalled=snap.num_stalled, total=len(live),
                                         preempted=sum(v.state == "preempted" for v in live)))
    g = snap.graphs
    st.engine.CopyFrom(pb.EngineCounters(
        preemptions=snap.num_preemptions, step_failures=snap.num_step_failures,
        cuda_graphs=g.get("num_graphs", 0), graph_replays=g.get("num_replays", 0),
        eager_decode_steps=g.get("num_eager", 0),
        graph_capture_seconds=g.get("capture_seconds", 0.0),
        graph_capture_bytes=g.get("capture_bytes", 0),
        overlapped_steps=g.get("num_overlapped", 0),
        step_times={k: float(v) for k, v in snap.step_times.items()},
        paused=snap.num_paused))
    st.prefix.CopyFrom(prefix_to_proto(snap.prefix))
    st.sessions = len(snap.sessions)
    st.sequences.extend(sequence_to_proto(v, policy.pins.get(v.seq_id)) for v in live)
    gpu = snap.tiers.get("gpu")
    if gpu is not None and effective_budget:
        # the controller's measure: the blocks' exact bytes (controller/policy.py)
        st.budget_used_fraction = gpu.block_bytes / effective_budget
    return st
