"""The import graph (issue 11): the controller reaches the engine only through its handle
and that handle's vocabulary; product packages never import benchmarks; the CLI and the
config never load torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the engine's door (handle) and what crosses it: actions/views/formats, requests/events/
# errors, the config record
ENGINE_SURFACE = {"engine.handle", "engine.actions", "engine.api", "engine.config"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def modules(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_controller_imports_only_the_engine_surface():
    bad = {}
    for f in modules("controller"):
        eng = {m for m in imports(f) if m == "engine" or m.startswith("engine.")}
        # "from engine.handle import open_engine" lists engine.handle.open_engine too
        outside = {m for m in eng if not any(m == s or m.startswith(s + ".")
                                             for s in ENGINE_SURFACE)}
        if outside:
            bad[str(f.relative_to(ROOT))] = sorted(outside)
    assert not bad, bad


def test_product_packages_never_import_benchmarks():
    for pkg in ("engine", "controller", "kvctl_proto"):
        for f in modules(pkg):
            assert not any(m == "benchmarks" or m.startswith("benchmarks.")
                           for m in imports(f)), f


def test_cli_config_strategies_and_predictors_load_without_torch():
    code = ("import sys; import controller.cli, controller.config, controller.strategies, "
            "controller.predictors.heuristic, controller.profiles; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_profile_names_live_in_one_record():
    from controller import cli, config, policy, profiles
    names = profiles.PROFILE_NAMES
    assert policy.PROFILES == names
    assert tuple(p.value for p in cli.Profile) == names
    for n in names:       # the config accepts exactly these
        config.PolicySection(profile=n)
