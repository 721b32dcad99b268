"""`kvctl`: the daemon's command line. Speaks only gRPC; `serve` imports the server (and
with it torch) lazily, so every other command starts fast and needs no engine."""
from __future__ import annotations

import json
import sys
import time
from enum import Enum
from typing import List, Optional

import grpc
import typer

from controller.client import Client, DaemonUnreachable, Target, explain, pb
from controller.config import client_socket_path
from controller.profiles import PROFILE_NAMES
from rich.markup import escape
from rich.text import Text

from controller.render import (SEQ_COLUMNS, SESSION_COLUMNS, console, emit, human_bytes,
                               sequence_rows, session_rows, status_screen, to_dict)

app = typer.Typer(help="kvctl: KV-cache runtime daemon and its client.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
_target: Target | None = None     # what the command line pointed at (for error messages)
policy_app = typer.Typer(help="Show or change the node's policy.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


# choices for --profile: the names of controller/profiles.py, the one record of them
Profile = Enum("Profile", {n.replace("-", "_"): n for n in PROFILE_NAMES}, type=str)


@app.callback()
def _global(ctx: typer.Context,
            socket: Optional[str] = typer.Option(None, envvar="KVCTL_SOCKET",
                                                 help="daemon's Unix socket [default: per-user path]"),
            address: Optional[str] = typer.Option(None, envvar="KVCTL_ADDRESS",
                                                  help="HOST:PORT of a TCP+TLS daemon"),
            token_file: Optional[str] = typer.Option(None, envvar="KVCTL_TOKEN_FILE",
                                                     help="bearer token for mutating calls over TCP"),
            tls_ca: Optional[str] = typer.Option(None, envvar="KVCTL_TLS_CA",
                                                 help="CA bundle (PEM) to verify the daemon"),
            tls_server_name: Optional[str] = typer.Option(None, help="expected name in the cert"),
            timeout: float = typer.Option(10.0, help="seconds per unary call")) -> None:
    global _target
    ctx.obj = _target = Target(socket=socket or str(client_socket_path()), address=address,
                               token_file=token_file, tls_ca=tls_ca,
                               tls_server_name=tls_server_name, timeout_s=timeout)


def _client(ctx: typer.Context) -> Client:
    return Client(ctx.obj)


# ---------------------------------------------------------------- serve
@app.command()
def serve(config: Optional[str] = typer.Option(None, "--config", "-c", envvar="KVCTL_CONFIG",
                                               help="TOML config [default: /etc/kvctl/kvctl.toml if present]"),
          socket: Optional[str] = typer.Option(None, help="Unix socket path"),
          tcp: Optional[str] = typer.Option(None, help="also listen on HOST:PORT (needs TLS + token)"),
          model: Optional[str] = typer.Option(None, help="'default', a local HF dir, 'random:tiny'"),
          device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
          metrics_port: Optional[int] = typer.Option(None, help="enable Prometheus on this port"),
          set_: List[str] = typer.Option([], "--set", help="any config key: section.key=value")) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from controller.config import load_config

    overrides: dict[str, object] = {}
    for kv in set_:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--set wants section.key=value, got {kv!r}")
        overrides[key.strip()] = value.strip()
    for key, value in (("server.socket", socket), ("server.tcp_address", tcp),
                       ("engine.model", model), ("engine.device", device)):
        if value is not None:
            overrides[key] = value
    if metrics_port is not None:
        overrides.update({"metrics.enabled": True, "metrics.port": metrics_port})
    cfg = load_config(config, overrides)
    from controller.server import serve as run_server   # torch + engine load here only

    run_server(cfg)


# ---------------------------------------------------------------- status
@app.command()
def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"),
           watch: bool = typer.Option(False, "--watch", "-w", help="refresh until Ctrl-C"),
           interval: float = typer.Option(1.0, help="seconds between refreshes with --watch")) -> None:
    """The node at a glance: memory by tier, PCIe, policy, sequences."""
    c = _client(ctx)
    if as_json and not watch:
        print(json.dumps(to_dict(c.call("GetStatus", pb.GetStatusRequest())), indent=2))
        return
    if not watch:
        console.print(status_screen(c.call("GetStatus", pb.GetStatusRequest())))
        return
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        while True:
            st = c.call("GetStatus", pb.GetStatusRequest())
            if as_json:
                print(json.dumps(to_dict(st)), flush=True)
            else:
                live.update(status_screen(st), refresh=True)
            time.sleep(interval)


@app.command()
def sequences(ctx: typer.Context, state: str = typer.Option("", help="only this state"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Live sequences with their current strategy."""
    r = _client(ctx).call("ListSequences", pb.ListSequencesRequest(state=state))
    emit(sequence_rows(r.sequences), SEQ_COLUMNS, as_json, "Sequences",
         raw=[to_dict(s) for s in r.sequences])


@app.command()
def sessions(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Multi-turn sessions and the KV each keeps between turns."""
    r = _client(ctx).call("ListSessions", pb.ListSessionsRequest())
    emit(session_rows(r.sessions), SESSION_COLUMNS, as_json, "Sessions",
         raw=[to_dict(s) for s in r.sessions])


@app.command("drop-session")
def drop_session(ctx: typer.Context, session_id: str) -> None:
    """Forget a session and free the KV it keeps."""
    r = _client(ctx).call("DropSession", pb.DropSessionRequest(session_id=session_id))
    console.print(f"dropped session {r.session_id}", markup=False)


def _print_policy(p, as_json: bool) -> None:
    rows = [{"key": "profile", "value": p.profile},
            {"key": "budget_bytes", "value": f"{p.budget_bytes} ({human_bytes(p.budget_bytes)})"},
            {"key": "high_watermark", "value": p.high_watermark},
            {"key": "low_watermark", "value": p.low_watermark}] + \
           [{"key": f"pin {x.seq_id}", "value": x.strategy} for x in p.pins]
    emit(rows, (("key", "SETTING"), ("value", "VALUE")), as_json, "Policy", raw=to_dict(p))


@policy_app.command("get")
def policy_get(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show the policy."""
    _print_policy(_client(ctx).call("GetPolicy", pb.GetPolicyRequest()), as_json)


@policy_app.command("set")
def policy_set(ctx: typer.Context, profile: Optional[Profile] = typer.Option(None),
               budget: Optional[int] = typer.Option(None, help="KV budget in bytes"),
               high: Optional[float] = typer.Option(None, help="high watermark (0, 1]"),
               low: Optional[float] = typer.Option(None, help="low watermark [0, high)"),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Change the profile, budget or watermarks (only what you pass)."""
    req = pb.SetPolicyRequest()
    if profile is not None:
        req.profile = profile.value
    if budget is not None:
        req.budget_bytes = budget
    if high is not None:
        req.high_watermark = high
    if low is not None:
        req.low_watermark = low
    _print_policy(_client(ctx).call("SetPolicy", req), as_json)


@app.command()
def pin(ctx: typer.Context, seq_id: str, strategy: str) -> None:
    """Pin a sequence to a strategy."""
    r = _client(ctx).call("Pin", pb.PinRequest(seq_id=seq_id, strategy=strategy))
    console.print(f"pinned {r.seq_id} to {r.strategy}" + (f" (was {r.previous})" if r.previous else ""),
                  markup=False)


@app.command()
def unpin(ctx: typer.Context, seq_id: str) -> None:
    """Remove a sequence's pin."""
    r = _client(ctx).call("Unpin", pb.UnpinRequest(seq_id=seq_id))
    console.print(f"unpinned {r.seq_id} (was {r.previous})", markup=False)


@app.command()
def watch(ctx: typer.Context, history: int = typer.Option(20, help="past decisions to show first"),
          as_json: bool = typer.Option(False, "--json", help="one JSON object per line")) -> None:
    """Stream the controller's decisions until Ctrl-C."""
    for d in _client(ctx).stream("WatchDecisions", pb.WatchDecisionsRequest(history=history)):
        if as_json:
            print(json.dumps(to_dict(d)), flush=True)
        else:
            when = time.strftime("%H:%M:%S", time.localtime(d.time))
            seq = f" {d.seq_id}" if d.seq_id else ""
            act = f" {d.action}" if d.action else ""
            console.print(Text.assemble(f"{when} ", (d.kind, "bold"), f"{seq}{act}: {d.reason}"))


def _parse_ids(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{option} wants comma-separated integers, got {text!r}") from None


@app.command()
def capacity(ctx: typer.Context, num_tokens: int, fmt: str = typer.Option("full", "--format"),
             ids: Optional[str] = typer.Option(
                 None, help="the prompt's comma-separated token ids: blocks this node holds "
                            "already are not counted"),
             session: str = typer.Option("", help="with --ids: the session it continues"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Could this node admit a request of NUM_TOKENS tokens (prompt + new) now?"""
    req = pb.EstimateCapacityRequest(num_tokens=num_tokens, format=fmt, session_id=session)
    if ids is not None:
        req.prompt_ids.ids.extend(_parse_ids(ids, "--ids"))
    r = _client(ctx).call("EstimateCapacity", req)
    if as_json:
        print(json.dumps(to_dict(r), indent=2))
    else:
        console.print(("[green]yes[/]: " if r.can_admit else "[red]no[/]: ") + escape(r.reason))
    raise typer.Exit(0 if r.can_admit else 3)


@app.command()
def generate(ctx: typer.Context,
             prompt: str = typer.Argument(..., help="prompt text ('-' reads stdin)"),
             chat: bool = typer.Option(False, help="send as one user chat message"),
             ids: bool = typer.Option(False, help="PROMPT is comma-separated token ids"),
             max_tokens: int = typer.Option(128), temperature: float = typer.Option(0.0),
             top_k: int = typer.Option(0), top_p: float = typer.Option(1.0),
             seed: Optional[int] = typer.Option(None), stop: List[str] = typer.Option([]),
             priority: int = typer.Option(0), strategy: str = typer.Option(""),
             session: str = typer.Option("", help="a turn of this multi-turn session: its KV "
                                                  "is kept for the next turn"),
             kv_format: str = typer.Option("", help="write its KV in this format as it fills, "
                                                    "prompt included (int8, int4, fp8, k4v2)"),
             as_json: bool = typer.Option(False, "--json", help="print events as JSON lines")) -> None:
    """Generate: the text streams to stdout, a summary goes to stderr."""
    if prompt == "-":
        prompt = sys.stdin.read()
    sp = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                           stop=stop)
    if seed is not None:
        sp.seed = seed
    req = pb.GenerateRequest(sampling=sp, priority=priority, strategy=strategy,
                             session_id=session, kv_format=kv_format)
    if ids:
        req.prompt_ids.ids.extend(_parse_ids(prompt, "--ids"))
    elif chat:
        req.messages.messages.add(role="user", content=prompt)
    else:
        req.prompt = prompt
    c = _client(ctx)
    seq_id = ""
    try:
        for ev in c.stream("Generate", req):
            kind = ev.WhichOneof("event")
            if as_json:
                print(json.dumps(to_dict(ev)), flush=True)
            if kind == "started":
                seq_id = ev.started.seq_id
            elif kind == "token" and not as_json:
                sys.stdout.write(ev.token.text)
                sys.stdout.flush()
            elif kind == "finished":
                f = ev.finished
                if not as_json:
                    reason = pb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_").lower()
                    sys.stdout.write("\n")
                    reused = f" ({f.usage.cached_tokens} reused)" if f.usage.cached_tokens else ""
                    print(f"[{f.seq_id}: {reason}, {f.usage.prompt_tokens} prompt{reused} + "
                          f"{f.usage.completion_tokens} generated tokens in {f.seconds:.2f}s]"
                          + (f" error: {f.error}" if f.error else ""), file=sys.stderr)
                if f.reason == pb.FINISH_REASON_ERROR:
                    print(f"kvctl: generation {f.seq_id} failed: {f.error or 'no detail given'}",
                          file=sys.stderr)
                    raise typer.Exit(1)
    except KeyboardInterrupt:
        if seq_id:
            c.call("Cancel", pb.CancelRequest(seq_id=seq_id))
            print(f"\n[cancelled {seq_id}]", file=sys.stderr)
        raise typer.Exit(130)


BENCHMARKS = {
    "engine": ("benchmarks.engine_speed", "decode tok/s vs transformers generate"),
    "accuracy": ("benchmarks.evaluate", "KV quantization: perplexity, passkey, bytes"),
    "compression": ("benchmarks.compression", "eviction / top-k offload accuracy"),
    "offload": ("benchmarks.offload", "exact vs top-k offload (CUDA)"),
    "kernel": ("benchmarks.decode_kernel", "paged decode kernel vs SDPA (CUDA)"),
    "status": ("benchmarks.status_latency", "GetStatus latency under 64 streams"),
    "headline": ("benchmarks.headline", "adaptive vs every fixed strategy and the peers: "
                 "accuracy per byte read (CPU)"),
    "headline-gpu": ("benchmarks.headline.gpu", "adaptive vs fixed strategies under 4x KV "
                     "demand: speed, preemptions, OOMs (GPU)"),
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument(
        ..., help="one of: " + ", ".join(f"{k} ({v[1]})" for k, v in BENCHMARKS.items()))
          ) -> None:
    """Run one of the project's benchmarks; extra arguments go to it (try --help)."""
    import subprocess
    if name not in BENCHMARKS:
        print(f"kvctl: unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        raise typer.Exit(2)
    from pathlib import Path
    # benchmarks live beside the product packages in the source tree, never imported by
    # them: a child process from the checkout's root (they import torch; the CLI never does)
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__init__.py").is_file():
        print("kvctl: the benchmarks ship with the source tree (benchmarks/), not with this "
              "installation; run them from a checkout: make bench", file=sys.stderr)
        raise typer.Exit(2)
    rc = subprocess.call([sys.executable, "-m", BENCHMARKS[name][0], *ctx.args], cwd=root)
    raise typer.Exit(rc)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def train(ctx: typer.Context) -> None:
    """Learned cost predictor: `train record --out T.jsonl` records traces on the engine,
    `train fit --traces T.jsonl --out P.skops` fits and saves it (try `train --help`)."""
    import subprocess
    # a child process: recording imports torch, the CLI never does
    rc = subprocess.call([sys.executable, "-m", "controller.train", *ctx.args])
    raise typer.Exit(rc)


def main() -> None:
    try:
        rc = app(standalone_mode=False)   # click returns Exit codes instead of exiting
        sys.exit(rc if isinstance(rc, int) else 0)
    except DaemonUnreachable as e:
        print(f"kvctl: {e}", file=sys.stderr)
        sys.exit(1)
    except grpc.RpcError as e:
        print(f"kvctl: {explain(e, _target or Target())}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, OSError) as e:
        print(f"kvctl: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # usage errors (typer's click) show themselves, with their code
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
