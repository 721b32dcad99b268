"""Benchmark: GetStatus latency while N clients stream generations (goal p99 <= 5 ms).

    python -m benchmarks.status_latency --clients 64 --seconds 20 --model random:tiny

Starts `kvctl serve` as a subprocess on a temporary Unix socket (real engine), runs the
streaming clients in a second process, and calls GetStatus every ``--period-ms`` from
this one. Prints latency percentiles idle and under load. Not a test.

``--load threads`` (the first harness): one thread and one blocking stub per client,
a shared counter bumped under a process-shared lock per token. ``--load aio`` (default):
the same clients, each on its own channel and stream, as coroutines of one asyncio loop,
token counts published every 50 ms. On a 2-core box the load generator shares the
daemon's cores, so what it spends per token is taken from the daemon: the threads
harness spends more per token than the daemon does (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import multiprocessing as mp
import threading
import time
from pathlib import Path

import grpc

from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p / 100 * len(xs)))]  # noqa: E731
    return {"n": len(xs), "p50_ms": q(50) * 1e3, "p90_ms": q(90) * 1e3, "p99_ms": q(99) * 1e3,
            "max_ms": xs[-1] * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


def measure(stub, seconds: float, period_s: float, fresh: bool = False) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        stub.GetStatus(pb.GetStatusRequest(fresh=fresh), timeout=10)
        out.append(time.perf_counter() - t0)
        time.sleep(period_s)
    return out


def prompt_ids(i: int, n: int) -> list[int]:
    """Client ``i``'s prompt: ``n`` distinct token ids (a long ``n``: long prefill steps)."""
    return [(i + 1 + 7 * j) % 40000 + 1 for j in range(n)]


def run_clients(sock: str, n: int, max_tokens: int, stop, ready, tokens, errors,
                prompt_tokens: int = 32) -> None:
    """n threads, each streaming generations back to back over its own connection."""
    def client(i: int) -> None:
        ch = grpc.insecure_channel(f"unix:{sock}", options=[("grpc.use_local_subchannel_pool", 1)])
        s = kvctl_pb2_grpc.KvctlStub(ch)
        req = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=prompt_ids(i, prompt_tokens)),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        first = True
        while not stop.is_set():
            try:
                stream = s.Generate(req)
                for ev in stream:
                    if ev.WhichOneof("event") == "token":
                        with tokens.get_lock():
                            tokens.value += 1
                        if first:
                            first = False
                            with ready.get_lock():
                                ready.value += 1
                    if stop.is_set():
                        stream.cancel()
                        break
            except grpc.RpcError as e:
                if not stop.is_set():
                    errors.append(f"{e.code().name}: {e.details()}")
                break
        ch.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_clients_aio(sock: str, n: int, max_tokens: int, stop, ready, tokens, errors,
                    prompt_tokens: int = 32) -> None:
    """n streaming clients (own channel, generations back to back) on one asyncio loop."""
    import asyncio

    from controller.aio import new_event_loop      # uvloop's when installed, as the daemon's

    counts = {"tokens": 0, "ready": 0}
    done = asyncio.Event()            # binds to the loop it is first used on

    async def client(i: int) -> None:
        ch = grpc.aio.insecure_channel(f"unix:{sock}",
                                       options=[("grpc.use_local_subchannel_pool", 1)])
        s = kvctl_pb2_grpc.KvctlStub(ch)
        req = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=prompt_ids(i, prompt_tokens)),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        first = True
        try:
            while not done.is_set():
                call = s.Generate(req)
                async for ev in call:
                    if ev.WhichOneof("event") == "token":
                        counts["tokens"] += 1
                        if first:
                            first = False
                            counts["ready"] += 1
                    if done.is_set():
                        call.cancel()
                        break
        except grpc.aio.AioRpcError as e:
            if not done.is_set():
                errors.append(f"{e.code().name}: {e.details()}")
        finally:
            await ch.close()

    async def publish() -> None:
        while not stop.is_set():
            tokens.value, ready.value = counts["tokens"], counts["ready"]
            await asyncio.sleep(0.05)
        tokens.value, ready.value = counts["tokens"], counts["ready"]
        done.set()

    async def main_() -> None:
        tasks = [asyncio.create_task(client(i)) for i in range(n)]
        await publish()
        await asyncio.wait(tasks, timeout=20)

    loop = new_event_loop()
    try:
        loop.run_until_complete(main_())
    finally:
        loop.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--period-ms", type=float, default=10)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32,
                    help="each client's prompt length (long prompts: long prefill steps)")
    ap.add_argument("--fresh", action="store_true",
                    help="measure GetStatus(fresh=True): new readings, not the cached sample")
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads")
    ap.add_argument("--socket", help="measure this running daemon instead of starting one")
    ap.add_argument("--load", choices=("aio", "threads"), default="aio",
                    help="load generator: coroutines of one loop, or a thread per client")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for the daemon (e.g. engine.device=cuda)")
    args = ap.parse_args()

    if args.socket:
        sock, daemon = Path(args.socket), None
    else:
        sock = Path(tempfile.mkdtemp(prefix="kvbench-")) / "kvctl.sock"
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "--socket", str(sock), "--model",
             args.model, "--set", f"engine.num_threads={args.threads}", "--set",
             "log.level=warning", "--set", "server.drain_grace_s=2"]
            + [x for kv in args.sets for x in ("--set", kv)], env=env)
    try:
        while not sock.exists():
            if daemon is None or daemon.poll() is not None:
                sys.exit("the daemon exited before it was ready")
            time.sleep(0.1)
        channel = grpc.insecure_channel(f"unix:{sock}")
        stub = kvctl_pb2_grpc.KvctlStub(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        measure(stub, 1.0, args.period_ms / 1e3, args.fresh)   # warm-up
        idle = measure(stub, min(5.0, args.seconds), args.period_ms / 1e3, args.fresh)

        # the streaming clients live in their own process, so that their GIL is not the
        # measuring thread's: what is measured is the daemon
        ctx = mp.get_context("spawn")
        stop, ready = ctx.Event(), ctx.Value("i", 0)
        tokens = ctx.Value("q", 0)
        errors = ctx.Manager().list()
        load = run_clients_aio if args.load == "aio" else run_clients
        proc = ctx.Process(target=load, args=(str(sock), args.clients, args.max_tokens,
                                              stop, ready, tokens, errors, args.prompt_tokens))
        proc.start()
        t_wait = time.monotonic()
        while ready.value < args.clients and time.monotonic() - t_wait < 60 and proc.is_alive():
            time.sleep(0.1)
        if ready.value < args.clients:
            print(f"warning: only {ready.value} of {args.clients} clients streaming", file=sys.stderr)
        st = stub.GetStatus(pb.GetStatusRequest(fresh=True))
        tok0, t0 = tokens.value, time.monotonic()
        loaded = measure(stub, args.seconds, args.period_ms / 1e3, args.fresh)
        tok_rate = (tokens.value - tok0) / (time.monotonic() - t0)
        streaming = ready.value
        stop.set()
        proc.join(30)
        errors = list(errors)
        if proc.exitcode not in (0, None):
            errors.append(f"client process exited with code {proc.exitcode}")
        result = {
            "clients": args.clients, "load": args.load, "clients_streaming": streaming,
            "model": st.model or args.model, "device": st.device, "daemon_sets": args.sets,
            "seconds": args.seconds, "period_ms": args.period_ms, "cpus": os.cpu_count(),
            "prompt_tokens": args.prompt_tokens, "fresh": args.fresh,
            "live_sequences_at_start": st.counts.total, "streamed_tokens_per_s": round(tok_rate, 1),
            "client_errors": errors[:5], "idle": percentiles(idle), "under_load": percentiles(loaded),
        }
        print(json.dumps(result, indent=2))
        print(f"\nGetStatus idle p50 {result['idle']['p50_ms']:.2f} ms, p99 {result['idle']['p99_ms']:.2f} ms; "
              f"with {streaming} streaming clients p50 {result['under_load']['p50_ms']:.2f} ms, "
              f"p99 {result['under_load']['p99_ms']:.2f} ms, max {result['under_load']['max_ms']:.2f} ms "
              f"({result['under_load']['n']} calls; {tok_rate:.0f} tokens/s streamed)")
    finally:
        if daemon is None:
            return
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    main()
