"""The layering of DESIGN.md §5, checked from the source with `ast`: each rule is a table row.

Every import counts, including those inside functions and `if TYPE_CHECKING:` blocks: a
dependency hidden from the import graph at runtime is still a dependency of the design.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "gpuctl"
GENERATED = "gpuctl.api._pb"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Modules under `scope` (minus `exempt`) may import only what the allow-lists name.

    Names match as prefixes on dotted paths: `gpuctl.core` covers `gpuctl.core.model`. An
    allow-list of None allows anything; `forbidden` third-party packages are refused even then.
    """

    id: str
    scope: str
    why: str
    exempt: tuple[str, ...] = ()
    gpuctl: tuple[str, ...] | None = None
    third_party: tuple[str, ...] | None = None
    forbidden: tuple[str, ...] = ()


RULES = (
    Rule(
        id="core-is-pure",
        scope="gpuctl.core",
        why="the scheduling core is pure: standard library, numpy and gpuctl.core only",
        gpuctl=("gpuctl.core",),
        third_party=("numpy",),
    ),
    Rule(
        id="engine-serves-the-policy",
        scope="gpuctl.core.engine",
        why="the engine (the core's caches and every rule for keeping them) answers what the "
        "plugins, the placers and the cycle ask; it never reaches back into the placers, the "
        "cycle or the planners",
        gpuctl=(
            "gpuctl.core.engine",
            "gpuctl.core.model",
            "gpuctl.core.framework",
            "gpuctl.core.plugins",
            "gpuctl.core.snapshot",
            "gpuctl.core.topology",
            "gpuctl.core.leasing",
            "gpuctl.core.preempt",
        ),
        third_party=("numpy",),
    ),
    Rule(
        id="providers-stand-on-the-core",
        scope="gpuctl.providers",
        why="lease providers are pure of the daemon: the standard library and gpuctl.core only",
        gpuctl=("gpuctl.providers", "gpuctl.core"),
        third_party=(),
    ),
    Rule(
        id="sim-drives-the-core",
        scope="gpuctl.sim",
        why="the simulator replays traces through the pure core: standard library, numpy, "
        "gpuctl.sim and gpuctl.core only",
        gpuctl=("gpuctl.sim", "gpuctl.core"),
        third_party=("numpy",),
    ),
    Rule(
        id="cli-uses-the-sdk",
        scope="gpuctl.cli",
        exempt=(
            "gpuctl.cli.simulate",
            "gpuctl.cli.simulate_gang",
            "gpuctl.cli.simulate_cost",
            "gpuctl.cli.simulate_scale",
        ),  # see the rules below
        why="the CLI reaches the daemon through the SDK and shares only core's model/errors/validation",
        gpuctl=(
            "gpuctl.cli",
            "gpuctl.api.client",
            "gpuctl.api.jobfile",
            "gpuctl.client",
            "gpuctl.core.model",
            "gpuctl.core.errors",
            "gpuctl.core.validation",
            "gpuctl.core.text",
        ),
        forbidden=("sqlmodel", "sqlalchemy"),
    ),
    Rule(
        id="cli-simulate-runs-the-core",
        scope="gpuctl.cli.simulate",
        why="`gpuctl simulate` runs the scheduling core on this machine, without a daemon, so it "
        "may use gpuctl.sim and gpuctl.core (and still not the SDK's server side or the store)",
        gpuctl=("gpuctl.cli", "gpuctl.sim", "gpuctl.core"),
        forbidden=("sqlmodel", "sqlalchemy"),
    ),
    Rule(
        id="cli-simulate-gang-runs-the-core",
        scope="gpuctl.cli.simulate_gang",
        why="`gpuctl simulate gang`, like the rest of `gpuctl simulate`, runs the core locally",
        gpuctl=("gpuctl.cli", "gpuctl.sim", "gpuctl.core"),
        forbidden=("sqlmodel", "sqlalchemy"),
    ),
    Rule(
        id="cli-simulate-scale-runs-the-core",
        scope="gpuctl.cli.simulate_scale",
        why="`gpuctl simulate scale` (benchmark B2) times the core locally, like the rest of "
        "`gpuctl simulate`",
        gpuctl=("gpuctl.cli", "gpuctl.sim", "gpuctl.core"),
        forbidden=("sqlmodel", "sqlalchemy"),
    ),
    Rule(
        id="cli-simulate-cost-runs-the-core",
        scope="gpuctl.cli.simulate_cost",
        why="`gpuctl simulate cost` runs the core locally, like the rest of `gpuctl simulate`, "
        "and reads the provider catalog (SKUs and prices) with the catalog provider's parser",
        gpuctl=(
            "gpuctl.cli",
            "gpuctl.sim",
            "gpuctl.core",
            "gpuctl.providers.base",
            "gpuctl.providers.catalog",
        ),
        forbidden=("sqlmodel", "sqlalchemy"),
    ),
    Rule(
        id="agent-stays-off-the-daemon",
        scope="gpuctl.agent",
        why="the agent speaks the agent API (generated code, conversion) and shares the core, "
        "sd_notify, the private-file modes, the log format and the metrics endpoint; it never "
        "reaches into the daemon's store, controller or servicers",
        gpuctl=(
            "gpuctl.agent",
            "gpuctl.core",
            "gpuctl.api._pb",
            "gpuctl.api.convert",
            "gpuctl.api.client",
            "gpuctl.api.auth",
            "gpuctl.api.pki",
            "gpuctl.runtime.sdnotify",
            "gpuctl.runtime.clock",
            "gpuctl.runtime.private",
            "gpuctl.runtime.logfmt",
            "gpuctl.runtime.exposition",
        ),
        forbidden=("sqlmodel", "sqlalchemy", "apscheduler"),
    ),
    Rule(
        id="store-stands-on-the-core",
        scope="gpuctl.store",
        why="the store maps the core's model to rows: gpuctl.core and the SQL stack only, never "
        "the daemon, the API or the agent",
        gpuctl=("gpuctl.store", "gpuctl.core"),
        third_party=("sqlalchemy", "sqlmodel", "alembic"),
    ),
    Rule(
        id="api-is-a-thin-edge",
        scope="gpuctl.api",
        why="the API converts and checks calls and hands them to the controller: it sees the "
        "store only as its protocol (store.base), never the SQL store, the scheduler loop or "
        "the lease keeper",
        gpuctl=("gpuctl.api", "gpuctl.core", "gpuctl.runtime.controller", "gpuctl.store.base"),
        forbidden=("sqlmodel", "sqlalchemy", "apscheduler"),
    ),
    Rule(
        id="runtime-never-reaches-the-clients",
        scope="gpuctl.runtime",
        why="the daemon's runtime wires the core, store, API and providers; the CLI, the agent "
        "and the simulator are other programs",
        gpuctl=(
            "gpuctl.runtime",
            "gpuctl.core",
            "gpuctl.store",
            "gpuctl.api",
            "gpuctl.providers",
        ),
    ),
    Rule(
        id="only-the-daemon-wires-the-api",
        scope="gpuctl.runtime",
        exempt=("gpuctl.runtime.daemon", "gpuctl.runtime.apiworkers"),
        why="the runtime's parts (controller, leases, cycles) know nothing of gRPC: the daemon "
        "module and its API workers' alone put the API in front of them",
        gpuctl=("gpuctl.runtime", "gpuctl.core", "gpuctl.store", "gpuctl.providers"),
        forbidden=("grpc",),
    ),
    Rule(
        id="only-store-uses-the-orm",
        scope="gpuctl",
        exempt=("gpuctl.store",),
        why="ORM rows stay in gpuctl.store; everything else sees domain models",
        forbidden=("sqlmodel", "sqlalchemy"),
    ),
)


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # absolute dotted name imported


def _covers(prefixes: tuple[str, ...], name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_gpuctl(name: str) -> bool:
    return _covers((ROOT_PACKAGE,), name)


def _is_module(name: str, src: Path) -> bool:
    path = src.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(module: str, source: str, *, is_package: bool, src: Path = SRC) -> Iterator[Import]:
    """Every import in `source`, resolved to absolute names.

    `from gpuctl.core import model` resolves to `gpuctl.core.model` when that is a module, so a
    rule can tell it from `from gpuctl.core import schedule` (the package itself).
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_gpuctl(target) and alias.name != "*" and _is_module(sub, src):
                    yield Import(module, node.lineno, sub)
                else:
                    yield Import(module, node.lineno, target)


def violation(rule: Rule, imp: Import) -> str | None:
    """Why `imp` breaks `rule`, or None if it does not apply or is allowed."""
    if not _covers((rule.scope,), imp.module) or _covers(rule.exempt, imp.module):
        return None
    top = imp.target.partition(".")[0]
    if top == ROOT_PACKAGE:
        allowed = rule.gpuctl is None or _covers(rule.gpuctl, imp.target)
    elif top in sys.stdlib_module_names:
        allowed = True
    else:
        allowed = (
            rule.third_party is None or top in rule.third_party
        ) and top not in rule.forbidden
    if allowed:
        return None
    return f"{imp.module} (line {imp.line}) imports {imp.target}"


def source_modules(src: Path = SRC) -> Iterator[tuple[str, Path, bool]]:
    """(dotted name, path, is package) for every hand-written module under src/gpuctl."""
    for path in sorted((src / ROOT_PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        if not _covers((GENERATED,), name):
            yield name, path, is_package


@functools.cache
def all_imports() -> tuple[Import, ...]:
    """Every import of the tree, parsed once for all the rules."""
    return tuple(
        imp
        for name, path, is_package in source_modules()
        for imp in imports_of(name, path.read_text(), is_package=is_package)
    )


@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_layering(rule: Rule) -> None:
    found = [v for imp in all_imports() if (v := violation(rule, imp))]
    assert not found, f"{rule.why}; these imports break it:\n  " + "\n  ".join(found)


def test_the_core_has_modules_to_check() -> None:
    """Guards the rules against passing vacuously because the source moved."""
    assert any(_covers(("gpuctl.core",), name) for name, _, _ in source_modules())


RULE = {r.id: r for r in RULES}
# The modules of a made-up tree, so that the checker's own tests do not depend on the real one.
FAKE_TREE = (
    "gpuctl/__init__.py",
    "gpuctl/core/__init__.py",
    "gpuctl/core/model.py",
    "gpuctl/core/errors.py",
    "gpuctl/core/cycle.py",
    "gpuctl/runtime/__init__.py",
    "gpuctl/runtime/clock.py",
    "gpuctl/runtime/config.py",
    "gpuctl/api/__init__.py",
    "gpuctl/api/client.py",
    "gpuctl/api/_pb/__init__.py",
    "gpuctl/api/_pb/v1/__init__.py",
    "gpuctl/api/_pb/v1/jobs_pb2.py",
    "gpuctl/store/__init__.py",
)

# fmt: off
CASES = [
    # id,                  rule,                      importing file,             source,                                   caught
    ("core-stdlib-numpy",  "core-is-pure",            "gpuctl/core/cycle.py",     "import heapq\nimport numpy as np",       []),
    ("core-future",        "core-is-pure",            "gpuctl/core/cycle.py",     "from __future__ import annotations",     []),
    ("core-core",          "core-is-pure",            "gpuctl/core/cycle.py",     "from gpuctl.core.model import Job",      []),
    ("core-relative",      "core-is-pure",            "gpuctl/core/cycle.py",     "from .model import Job",                 []),
    ("core-init-relative", "core-is-pure",            "gpuctl/core/__init__.py",  "from .cycle import schedule",            []),
    ("core-grpc",          "core-is-pure",            "gpuctl/core/cycle.py",     "import grpc",                            ["grpc"]),
    ("core-lazy-import",   "core-is-pure",            "gpuctl/core/cycle.py",     "def f():\n    import psutil",            ["psutil"]),
    ("core-type-checking", "core-is-pure",            "gpuctl/core/cycle.py",     "if TYPE_CHECKING:\n    import sqlmodel", ["sqlmodel"]),
    ("core-store",         "core-is-pure",            "gpuctl/core/cycle.py",     "from gpuctl.store import Store",         ["gpuctl.store"]),
    ("core-relative-up",   "core-is-pure",            "gpuctl/core/cycle.py",     "from ..runtime import clock",            ["gpuctl.runtime.clock"]),
    ("engine-plugins",     "engine-serves-the-policy", "gpuctl/core/engine/verdicts.py", "from gpuctl.core.plugins import Policy", []),
    ("engine-cycle",       "engine-serves-the-policy", "gpuctl/core/engine/memos.py", "from gpuctl.core.cycle import Mode",   ["gpuctl.core.cycle"]),
    ("core-rule-scope",    "core-is-pure",            "gpuctl/store/sql.py",      "import sqlmodel",                        []),
    ("cli-third-party",    "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "import click, yaml, grpc",               []),
    ("cli-sdk",            "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from gpuctl.api.client import Client",   []),
    ("cli-sdk-from-api",   "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from gpuctl.api import client",          []),
    ("cli-core-model",     "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from gpuctl.core import model, errors",  []),
    ("cli-own",            "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from .render import table",              []),
    ("cli-core-package",   "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from gpuctl.core import schedule",       ["gpuctl.core"]),
    ("cli-core-cycle",     "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from gpuctl.core import cycle",          ["gpuctl.core.cycle"]),
    ("cli-protobuf",       "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "from gpuctl.api._pb.v1 import jobs_pb2", ["gpuctl.api._pb.v1.jobs_pb2"]),
    ("cli-runtime",        "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "import gpuctl.runtime.config",           ["gpuctl.runtime.config"]),
    ("cli-orm",            "cli-uses-the-sdk",        "gpuctl/cli/main.py",       "import sqlalchemy",                      ["sqlalchemy"]),
    ("orm-in-store",       "only-store-uses-the-orm", "gpuctl/store/tables.py",   "from sqlmodel import SQLModel",          []),
    ("orm-in-runtime",     "only-store-uses-the-orm", "gpuctl/runtime/daemon.py", "import sqlalchemy.exc",                  ["sqlalchemy.exc"]),
    ("orm-in-api",         "only-store-uses-the-orm", "gpuctl/api/servicers.py",  "from sqlmodel import select",            ["sqlmodel"]),
]
# fmt: on


@pytest.fixture(scope="module")
def fake_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in FAKE_TREE:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).touch()
    return src


@pytest.mark.parametrize(
    ("rule", "file", "source", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rules_catch(
    fake_src: Path, rule: str, file: str, source: str, expected: list[str]
) -> None:
    """The checker itself, on made-up modules: a rule that catches nothing proves nothing."""
    parts = Path(file).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_package else parts)
    found = [
        imp.target
        for imp in imports_of(module, source, is_package=is_package, src=fake_src)
        if violation(RULE[rule], imp)
    ]
    assert found == expected
