"""Rich rendering for the CLI: one listing helper (table or JSON) and the status screen.

Every string from the daemon (sequence ids, model and host names, reasons) is shown as
plain text, never parsed as rich markup: an id such as ``[/x]`` would otherwise raise
MarkupError, and ``[bold]`` would vanish into a style."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from google.protobuf.json_format import MessageToDict
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

console = Console()


def to_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = max(0, int(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def bytes_by(d) -> str:
    """A bytes map ("gpu" -> n) in one cell, largest first: "gpu 1.2 MiB, host 256 B"."""
    parts = [f"{k} {human_bytes(v)}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v]
    return ", ".join(parts) or "-"


def bar(frac: float, width: int = 24) -> Text:
    frac = max(0.0, min(1.0, frac))
    full = round(frac * width)
    style = "green" if frac < 0.75 else "yellow" if frac < 0.9 else "red"
    return Text("█" * full, style=style) + Text("░" * (width - full), style="dim")


def cell(value: Any) -> Text:
    """A table cell shown as it is (no markup)."""
    return value if isinstance(value, Text) else Text(str(value))


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], as_json: bool,
         title: str | None = None, raw: Any = None) -> None:
    """Print a listing: a rich table of ``columns`` ((key, header) pairs), or with
    ``as_json`` the full records (``raw`` if given, else ``rows``) as JSON."""
    if as_json:
        sys.stdout.write(json.dumps(raw if raw is not None else list(rows), indent=2) + "\n")
        return
    t = Table(title=title, header_style="bold")
    for _, header in columns:
        t.add_column(header)
    for r in rows:
        t.add_row(*(cell(r.get(k, "")) for k, _ in columns))
    if not rows:
        t.caption = "(none)"
    console.print(t)


SEQ_COLUMNS = (("seq_id", "SEQUENCE"), ("state", "STATE"), ("tokens", "TOKENS"),
               ("kv", "KV"), ("strategy", "STRATEGY"), ("pinned", "PINNED"),
               ("priority", "PRIO"))


def sequence_rows(seqs: Iterable) -> list[dict]:
    return [{"seq_id": s.seq_id, "state": s.state,
             "tokens": f"{s.num_prompt_tokens}+{s.num_generated}",
             "kv": human_bytes(sum(s.bytes_by_tier.values())), "strategy": s.strategy,
             "pinned": s.pinned_strategy or "-", "priority": s.priority} for s in seqs]


SESSION_COLUMNS = (("session_id", "SESSION"), ("turns", "TURNS"), ("age", "AGE"),
                   ("idle", "IDLE"), ("tokens", "TOKENS"), ("reused", "REUSED"),
                   ("tiers", "KV BY TIER"), ("formats", "KV BY FORMAT"), ("active", "RUNNING"))


def session_rows(sessions: Iterable) -> list[dict]:
    return [{"session_id": s.session_id, "turns": s.turns, "age": human_seconds(s.age_s),
             "idle": "-" if s.active else human_seconds(s.idle_s), "tokens": s.num_tokens,
             "reused": s.reused_tokens, "tiers": bytes_by(s.bytes_by_tier),
             "formats": bytes_by(s.bytes_by_format), "active": s.active or "-"}
            for s in sessions]


def prefix_line(st) -> str:
    """The prefix cache and sessions in one line of `kvctl status`."""
    p = st.prefix
    rate = f"{p.hit_tokens / p.queried_tokens:.0%}" if p.queried_tokens else "-"
    cached = sum(t.cached_bytes for t in st.tiers)
    return (f"hit rate {rate} ({p.hit_tokens} of {p.queried_tokens} prompt tokens reused), "
            f"{p.cached_blocks} cached blocks ({human_bytes(cached)}), {p.shared_slots} shared; "
            f"{st.sessions} session{'' if st.sessions == 1 else 's'}")


def engine_line(e) -> str:
    """The engine's steps and where their time went, in one line of `kvctl status`."""
    t = dict(e.step_times)
    kinds = [(k, int(t.get(f"{k}_steps", 0)), t.get(f"{k}_s", 0.0))
             for k in ("prefill", "decode", "idle")]
    total = sum(s for _, _, s in kinds)
    parts = sorted(((k, v) for k, v in t.items() if not k.endswith(("_steps", "_s"))),
                   key=lambda kv: -kv[1])
    split = ", ".join(f"{k} {v / total:.0%}" for k, v in parts[:4]) if total else "-"
    graphs = (f"; graphs {e.cuda_graphs} ({e.graph_capture_seconds:.1f} s capturing), "
              f"{e.graph_replays} replays, {e.eager_decode_steps} eager"
              if e.cuda_graphs else "")
    steps = ", ".join(f"{n} {k} steps ({s:.1f}s)" for k, n, s in kinds if n)
    paused = f", {e.paused} paused by the controller" if e.paused else ""
    return (f"{steps or 'no steps yet'}; time in {split}{graphs}; {e.preemptions} "
            f"preemptions{paused}, {e.step_failures} failed steps")


def predictor_line(pr) -> str:
    """What prices the controller's moves, and how often the learned model could not."""
    if not pr.kind:
        return "-"
    head = f"{pr.kind} ({pr.detail})" if pr.detail else pr.kind
    if pr.kind != "learned":
        return f"{head}; {pr.priced} moves priced"
    share = f" ({pr.fallbacks / pr.priced:.1%})" if pr.priced else ""
    return f"{head}; {pr.fallbacks} of {pr.priced} priced moves left to the heuristic{share}"


def status_screen(st) -> Group:
    """Everything `kvctl status` shows, readable at a glance."""
    node = Table.grid(padding=(0, 2))
    node.add_row("node", f"[bold]{escape(st.hostname)}[/]  kvctl {escape(st.version)}  up {st.uptime_s:.0f}s"
                 + ("  [red bold]DRAINING[/]" if st.draining else ""))
    node.add_row("model", f"{escape(st.model or '?')} on {escape(st.device or '?')} "
                 f"(block {st.block_size} tokens, step {st.step}, {st.tokens_per_s:.1f} tok/s)")
    g = st.gpu
    if g.available:
        frac = g.memory_used_bytes / g.memory_total_bytes if g.memory_total_bytes else 0
        node.add_row("gpu", Text.assemble(f"{g.name}  ", bar(frac),
                                          f" {human_bytes(g.memory_used_bytes)} / "
                                          f"{human_bytes(g.memory_total_bytes)}  util {g.utilization_pct}%"))
        node.add_row("pcie", f"gen{g.pcie_generation} x{g.pcie_width}  "
                     f"tx {human_bytes(g.pcie_tx_bytes_per_s)}/s  rx {human_bytes(g.pcie_rx_bytes_per_s)}/s")
    else:
        node.add_row("gpu", f"[yellow]cpu mode[/] — {escape(g.reason.removesuffix(' (cpu mode)'))}")
        node.add_row("pcie", "[dim]n/a (no GPU)[/]")
    node.add_row("steps", engine_line(st.engine))
    h = st.host
    hfrac = 1 - h.memory_available_bytes / h.memory_total_bytes if h.memory_total_bytes else 0
    node.add_row("host", Text.assemble(bar(hfrac), f" {human_bytes(h.memory_total_bytes - h.memory_available_bytes)}"
                                       f" / {human_bytes(h.memory_total_bytes)}  "
                                       f"kvctl RSS {human_bytes(h.process_rss_bytes)}  {h.num_cpus} CPUs"))

    tiers = Table(title="KV memory by tier", header_style="bold", title_justify="left")
    for c in ("TIER", "DEVICE", "USED", "", "CAPACITY", "LIVE BLOCKS", "CACHED"):
        tiers.add_column(c)
    for t in st.tiers:
        frac = t.used_bytes / t.capacity_bytes if t.capacity_bytes else 0
        tiers.add_row(cell(t.name), cell(t.device), human_bytes(t.used_bytes), bar(frac),
                      human_bytes(t.capacity_bytes), human_bytes(t.block_bytes),
                      human_bytes(t.cached_bytes))

    p = st.policy
    pol = Table.grid(padding=(0, 2))
    pol.add_row("profile", Text(p.profile, style="bold"))
    pol.add_row("budget", Text.assemble(bar(st.budget_used_fraction),
                                        f" {st.budget_used_fraction:.0%} of {human_bytes(p.budget_bytes)}"
                                        f"  (high {p.high_watermark:.0%}, low {p.low_watermark:.0%})"))
    pol.add_row("sequences", f"{st.counts.running} running, {st.counts.waiting} waiting, "
                 f"{st.counts.stalled} stalled; pressure {human_bytes(st.pressure_bytes)}")
    pol.add_row("prefix", prefix_line(st))
    pol.add_row("pins", cell(", ".join(f"{x.seq_id}→{x.strategy}" for x in p.pins) or "-"))
    pol.add_row("predictor", cell(predictor_line(st.predictor)))

    seqs = Table(title="Sequences", header_style="bold", title_justify="left")
    for _, header in SEQ_COLUMNS:
        seqs.add_column(header)
    for r in sequence_rows(st.sequences):
        seqs.add_row(*(cell(r[k]) for k, _ in SEQ_COLUMNS))
    if not st.sequences:
        seqs.caption = "(no live sequences)"
    return Group(Panel(node, title="kvctl", title_align="left"), tiers,
                 Panel(pol, title="policy", title_align="left"), seqs)
