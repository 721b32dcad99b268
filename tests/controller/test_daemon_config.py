from dataclasses import dataclass

import pytest

from controller.config import LogLevel, load_config


@dataclass
class Case:
    reason: str
    overrides: dict
    want: str | None          # substring of the ValueError, None = valid


CASES = [
    Case("defaults are valid", {}, None),
    Case("random model", {"engine.model": "random:tiny"}, None),
    Case("unknown model path", {"engine.model": "/nope/model"}, "engine.model"),
    Case("relative socket", {"server.socket": "kv.sock"}, "absolute"),
    Case("socket path too long", {"server.socket": "/" + "x" * 120}, "too long"),
    Case("tcp without tls and token", {"server.tcp_address": "127.0.0.1:7000"}, "needs TLS and a token"),
    Case("tcp address without port", {"server.tcp_address": "localhost"}, "HOST:PORT"),
    Case("bad device", {"engine.device": "tpu"}, "engine.device"),
    Case("bad dtype", {"engine.dtype": "int8"}, "engine.dtype"),
    Case("block size not a power of two", {"engine.block_size": "24"}, "power of two"),
    Case("budget fraction above 1", {"engine.kv_budget_fraction": "1.5"}, "kv_budget_fraction"),
    Case("negative budget", {"engine.kv_budget_bytes": "-1"}, "kv_budget_bytes"),
    Case("low above high", {"policy.low_watermark": "0.95"}, "low watermark"),
    Case("high above 1", {"policy.high_watermark": "1.2"}, "high watermark"),
    Case("unknown profile", {"policy.profile": "fast"}, "policy.profile"),
    Case("admission ceiling", {"policy.admission_ceiling": "0.01"}, None),
    Case("negative admission ceiling", {"policy.admission_ceiling": "-0.1"},
         "policy.admission_ceiling"),
    Case("infinite admission ceiling", {"policy.admission_ceiling": "inf"},
         "policy.admission_ceiling"),
    Case("metrics port out of range", {"metrics.port": "70000"}, "metrics.port"),
    Case("bad log level", {"log.level": "loud"}, "log.level"),
    Case("engine thread nice above 19", {"engine.thread_nice": "25"}, "engine.thread_nice"),
    Case("negative engine thread nice", {"engine.thread_nice": "-5"}, "engine.thread_nice"),
    Case("not a number", {"engine.block_size": "big"}, "integer"),
    Case("not a bool", {"log.log_prompts": "maybe"}, "true or false"),
    Case("unknown key", {"engine.modle": "x"}, "unknown key"),
    Case("unknown section", {"gpu.x": "1"}, "unknown config key"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
def test_config_validation(case):
    if case.want is None:
        load_config(overrides=case.overrides, env={})
    else:
        with pytest.raises(ValueError, match=case.want):
            load_config(overrides=case.overrides, env={})


def test_file_then_env_then_cli(tmp_path):
    f = tmp_path / "kvctl.toml"
    f.write_text('[engine]\nmodel = "random:tiny"\nblock_size = 16\n'
                 '[policy]\nprofile = "streaming"\nhigh_watermark = 0.8\n[log]\nlevel = "debug"\n')
    cfg = load_config(f, env={})
    assert (cfg.engine.model, cfg.engine.block_size, cfg.policy.profile) == ("random:tiny", 16, "streaming")
    assert cfg.log.level is LogLevel.debug and cfg.log.log_prompts is False
    cfg = load_config(f, env={"KVCTL_ENGINE_BLOCK_SIZE": "64", "KVCTL_POLICY_PROFILE": "throughput"})
    assert (cfg.engine.block_size, cfg.policy.profile) == (64, "throughput")
    cfg = load_config(f, {"engine.block_size": 8}, env={"KVCTL_ENGINE_BLOCK_SIZE": "64"})
    assert cfg.engine.block_size == 8


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[engine\nmodel=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(f, env={})
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})


def test_toml_type_errors(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('[engine]\nblock_size = "32"\n')
    with pytest.raises(ValueError, match="engine.block_size"):
        load_config(f, env={})


def test_tcp_with_tls_and_token_files(tmp_path):
    for n in ("c.pem", "k.pem", "tok"):
        (tmp_path / n).write_text("x")
    cfg = load_config(overrides={"server.tcp_address": "127.0.0.1:7443",
                                 "server.tls_cert": str(tmp_path / "c.pem"),
                                 "server.tls_key": str(tmp_path / "k.pem"),
                                 "server.token_file": str(tmp_path / "tok")}, env={})
    assert cfg.server.tcp_address == "127.0.0.1:7443"
    with pytest.raises(ValueError, match="tls_cert"):
        load_config(overrides={"server.tcp_address": "127.0.0.1:7443",
                               "server.tls_cert": str(tmp_path / "missing.pem"),
                               "server.tls_key": str(tmp_path / "k.pem"),
                               "server.token_file": str(tmp_path / "tok")}, env={})


@pytest.mark.parametrize("content", ["", "  \n"], ids=["empty", "blank"])
def test_empty_token_file_is_a_config_error(tmp_path, content):
    for n in ("c.pem", "k.pem"):
        (tmp_path / n).write_text("x")
    (tmp_path / "tok").write_text(content)
    with pytest.raises(ValueError, match=r"server.token_file .*tok is empty"):
        load_config(overrides={"server.tcp_address": "127.0.0.1:7443",
                               "server.tls_cert": str(tmp_path / "c.pem"),
                               "server.tls_key": str(tmp_path / "k.pem"),
                               "server.token_file": str(tmp_path / "tok")}, env={})


def test_shipped_example_config_and_unit():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "deploy/kvctl.toml", env={})
    assert cfg.engine.model == "default" and cfg.log.log_prompts is False and not cfg.metrics.enabled
    unit = (root / "deploy/systemd/kvctl.service").read_text()
    for line in ("Type=notify", "User=kvctl", "RuntimeDirectory=kvctl", "Restart=on-failure",
                 "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "--socket /run/kvctl/kvctl.sock"):
        assert line in unit, line


def test_shipped_config_lists_every_key_with_its_default():
    """deploy/kvctl.toml shows every key of every section (commented out where the default
    depends on the machine or the key turns a feature on), with its default."""
    import dataclasses
    import re
    from pathlib import Path

    from controller.config import _sections

    text = (Path(__file__).resolve().parents[2] / "deploy/kvctl.toml").read_text()
    listed: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if m := re.match(r"\[(\w+)\]\s*(#.*)?$", line):
            section = m.group(1)
            listed[section] = set()
        elif section and (m := re.match(r"#?\s*(\w+)\s*=", line)):
            listed[section].add(m.group(1))
    for name, cls in _sections().items():
        want = {f.name for f in dataclasses.fields(cls)}
        assert want <= listed.get(name, set()), (name, sorted(want - listed.get(name, set())))
    assert load_config(Path(__file__).resolve().parents[2] / "deploy/kvctl.toml", env={}) == \
        load_config(env={})


def test_the_daemon_sets_the_admission_ceiling_from_its_config():
    from controller.server import Daemon
    from tests.controller.fakes import FakeEngine

    cfg = load_config(overrides={"policy.admission_ceiling": "0.01"}, env={})
    assert cfg.policy.admission_ceiling == 0.01
    dm = Daemon(cfg, engine=FakeEngine())
    assert dm.service.controller.loop.admission_ceiling == 0.01
    dm2 = Daemon(load_config(env={}), engine=FakeEngine())
    assert dm2.service.controller.loop.admission_ceiling is None      # off by default
