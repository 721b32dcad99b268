"""The bridge to the peers' environment: set it up (peers_env.sh), hand it the samples as
token ids and the budgets as compression ratios, read its records back.

Both environments read the same weights: the HF directory kvctl's engine loads
(``engine.models.default_model_dir()``: the default model's GGUF converted once to
safetensors by the main environment), so no hub and no second conversion.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KVPRESS = ("streaming_llm", "snapkv", "tova", "expected_attention", "knorm")
QUANTO = ("quanto_int4", "quanto_int2")
PEERS = KVPRESS + QUANTO


def family(peer: str) -> str:
    return f"kvpress {peer}" if peer in KVPRESS else f"transformers {peer}"


def configs(peers: list[str], budgets: list[float]) -> list[dict]:
    """kvpress presses at each budget; quanto caches once (their bytes are their own)."""
    out = []
    for p in peers:
        if p in KVPRESS:
            for b in budgets:
                out.append(dict(name=f"{family(p)} @{b:.1%}", family=family(p),
                                peer="kvpress", method=p, budget=b))
        elif p in QUANTO:
            out.append(dict(name=family(p), family=family(p), peer="quanto",
                            nbits=int(p[-1]), budget=1.0))
        else:
            raise ValueError(f"unknown peer {p!r}; one of {', '.join(PEERS)}")
    return out


def model_dir(model: str) -> Path | None:
    """The HF directory both environments load, or None (random weights: no peers)."""
    if model.startswith("random:"):
        return None
    if model == "default":
        from engine.models import default_model_dir
        return default_model_dir()
    return Path(model).expanduser()


def setup(venv: Path, log) -> str:
    """Create the peers' venv if needed; '' when ready, else why not."""
    try:
        r = subprocess.run(["bash", str(HERE / "peers_env.sh"), str(venv)], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"peers environment not set up: {e}"
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        return f"peers environment not set up (peers_env.sh exit {r.returncode}): {tail}"
    log(f"peers environment ready: {venv}")
    return ""


def run(samples, cfgs: list[dict], model: str, dtype: str, threads: int, venv: Path,
        out_dir: Path, log) -> tuple[list[dict], dict[str, str], dict]:
    """(records, why each config that did not run did not, versions)."""
    venv = (ROOT / venv) if not venv.is_absolute() else venv
    mdir = model_dir(model)
    if mdir is None:
        why = "random-weight model: the peers need the same weights on disk"
        return [], {c["name"]: why for c in cfgs}, {}
    why = setup(venv, log)
    if why:
        return [], {c["name"]: why for c in cfgs}, {}
    req = dict(model_dir=str(mdir), dtype=dtype, threads=threads, configs=cfgs,
               samples=[s.to_json() for s in samples])
    req_path, res_path = out_dir / "peers_request.json", out_dir / "peers_result.json"
    req_path.write_text(json.dumps(req))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)          # nothing of kvctl's environment leaks in
    log(f"peers: {len(cfgs)} configs x {len(samples)} samples in {venv}")
    r = subprocess.run([str(venv / "bin" / "python"), str(HERE / "peer_runner.py"),
                        str(req_path), str(res_path)], cwd=out_dir, env=env,
                       stderr=sys.stderr)
    if r.returncode != 0 or not res_path.exists():
        why = f"peer runner failed (exit {r.returncode}; its stderr is in the run's log)"
        return [], {c["name"]: why for c in cfgs}, {}
    res = json.loads(res_path.read_text())
    return res["records"], res["errors"], res.get("versions", {})
