"""The [leases] settings of gpuctld.toml and the providers file they name: what is accepted,
what is refused by name, and that the shipped providers.toml builds every provider."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpuctl.core.errors import InvalidArgument
from gpuctl.runtime.config import DaemonConfig, load_config, load_providers
from gpuctl.runtime.leases import build_providers

CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_lease_settings_and_a_providers_file_relative_to_the_config(tmp_path):
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "gpuctld.toml"
    cfg.write_text(
        "[leases]\n"
        'providers_file = "providers.toml"\n'
        "idle_grace_s = 60\n"
        "warm_nodes = 3\n"
        "service_grace_s = 600\n"
        "service_headroom = 2\n"
        'unknown = "adopt"\n'
        "budgets = { research = { dollars_per_hour = 200, dollars = 10000.0 } }\n"
    )
    config = load_config(cfg)
    assert config.providers_file == str(tmp_path / "etc" / "providers.toml")
    assert (config.lease_idle_grace_s, config.lease_unknown) == (60.0, "adopt")
    assert (config.lease_warm_nodes, config.lease_service_grace_s) == (3, 600.0)
    assert config.lease_service_headroom == 2
    assert config.lease_budgets == {"research": {"dollars_per_hour": 200, "dollars": 10000.0}}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('unknown = "keep"', "leases.unknown"),
        ("budgets = { q = { dollars_per_day = 5 } }", "leases.budgets.q.dollars_per_day"),
        ("budgets = { q = { dollars = -1 } }", "leases.budgets.q.dollars"),
        ("budgets = { q = 5 }", "leases.budgets.q"),
        ("boot_timeout_s = -1", "leases.boot_timeout_s"),
        ("warm_nodes = -2", "leases.warm_nodes"),
        ("warm_nodes = 1.5", "leases.warm_nodes"),
        ("service_grace_s = -1", "leases.service_grace_s"),
        ('service_grace_s = "1h"', "leases.service_grace_s"),
        ("service_headroom = -1", "leases.service_headroom"),
        ("service_headroom = 65", "leases.service_headroom"),
    ],
    ids=[
        "unknown",
        "budget-key",
        "budget-negative",
        "budget-shape",
        "negative",
        "warm",
        "warm-int",
        "service-grace",
        "service-grace-type",
        "headroom",
        "headroom-bound",
    ],
)
def test_bad_lease_settings_are_refused_by_name(tmp_path, text, field):
    cfg = tmp_path / "gpuctld.toml"
    cfg.write_text(f"[leases]\n{text}\n")
    with pytest.raises(InvalidArgument) as e:
        load_config(cfg)
    assert field in [v.field for v in e.value.violations]


def test_the_shipped_providers_file_builds_every_kind():
    tables, base = load_providers(DaemonConfig(providers_file=str(CONFIG / "providers.toml")))
    providers = build_providers(tables, base_dir=base)
    assert [p.name for p in providers] == ["lab", "burst", "sim"]
    assert load_providers(DaemonConfig()) == ((), Path("."))


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("[[provider]]\nname = 'a'\nkind = 'cloud'\n", "provider[0].kind"),
        ("[other]\nx = 1\n", "unknown; only [[provider]] tables"),
        (
            "[[provider]]\nname = 'a'\nkind = 'static'\n[[provider.node]]\nname = 'n'\n"
            "address = 'x'\nsku = 's'\nprice_per_hr = 1\n",
            "provider[0].node[0].price_per_hr",
        ),
    ],
    ids=["kind", "other-table", "typo"],
)
def test_a_bad_providers_file_is_refused_by_name(tmp_path, text, expect):
    path = tmp_path / "providers.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as e:
        tables, base = load_providers(DaemonConfig(providers_file=str(path)))
        build_providers(tables, base_dir=base)
    assert expect in str(e.value)


def test_a_missing_providers_file_is_named():
    with pytest.raises(InvalidArgument) as e:
        load_providers(DaemonConfig(providers_file="/nowhere.toml"))
    assert str(e.value) == "leases.providers_file: /nowhere.toml not found"


def test_gpuctld_refuses_a_bad_providers_file_as_a_bad_config(tmp_path):
    (tmp_path / "providers.toml").write_text("[[provider]]\nname = 'a'\nkind = 'static'\n")
    cfg = tmp_path / "gpuctld.toml"
    cfg.write_text('[leases]\nproviders_file = "providers.toml"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gpuctl.runtime.daemon", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "gpuctld: bad config: provider[0].node: must list at least one [[provider.node]]"
    )


def test_replica_ports_must_lie_in_the_unprivileged_port_range(tmp_path):
    cfg = tmp_path / "gpuctld.toml"
    cfg.write_text("[jobs]\nreplica_port_base = 60000\nreplica_port_range = 9000\n")
    with pytest.raises(InvalidArgument) as e:
        load_config(cfg)
    assert [v.field for v in e.value.violations] == ["jobs.replica_port_range"]
    cfg.write_text("[jobs]\nreplica_port_base = 40000\nreplica_port_range = 100\n")
    assert load_config(cfg).replica_port_base == 40000
