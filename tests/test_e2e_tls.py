"""TLS on gpuctld's TCP listener, with certificates from a test CA (trustme): clients and agents
that pin the CA get through, plain TCP and other CAs do not; a listener other hosts could reach
needs TLS unless the config says insecure, loudly."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest
import trustme

from gpuctl.client import Client, UnavailableError
from gpuctl.testbed import FAST_CONFIG, AgentSpec, LocalCluster
from tests.test_e2e import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, ca):
    root = tmp_path_factory.mktemp("tls") / "cluster"
    root.mkdir(parents=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(root / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    user = pwd.getpwuid(os.geteuid()).pw_name
    (root / "gpuctld.toml").write_text(
        FAST_CONFIG.replace("{user}", user)
        + f'\n[tls]\ncert_file = "{root / "server.crt"}"\nkey_file = "{root / "server.key"}"\n'
    )
    c = LocalCluster(root)
    try:
        c.start_daemon()
        yield c
    finally:
        c.remove()


def test_clients_speak_tls_to_the_tcp_listener_and_plain_tcp_is_refused(tls_cluster, ca):
    secret = tls_cluster.gpuctl("token", "create").stdout.strip()
    ca_file = tls_cluster.root / "ca.crt"
    with Client(tls_cluster.target, token=secret, ca_file=ca_file) as remote:
        assert remote.whoami().via == "token"
    with (
        Client(tls_cluster.target, token=secret, timeout=3) as plain,
        pytest.raises(UnavailableError),
    ):
        plain.whoami()
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tls_cluster.root / "other.crt"))
    other_ca = tls_cluster.root / "other.crt"
    with (
        Client(tls_cluster.target, token=secret, ca_file=other_ca, timeout=3) as fooled,
        pytest.raises(UnavailableError),
    ):
        fooled.whoami()
    cli = tls_cluster.gpuctl(
        "--server", tls_cluster.target, "--ca-file", str(ca_file), "whoami", check=False
    )
    assert cli.returncode == 1 and "no credentials" in cli.stderr  # TLS fine; no token given


def test_an_agent_pinning_the_ca_registers_and_one_pinning_another_does_not(tls_cluster):
    good = AgentSpec(name="tls-a", fake_gpus="l40s:1", fabric="eth/r1/t1", net="ethernet:1x100")
    bad = AgentSpec(name="tls-b", fake_gpus="l40s:1", fabric="eth/r1/t1", net="ethernet:1x100")
    tls_cluster.start_agent(good, extra=["--ca-file", str(tls_cluster.root / "ca.crt")])
    trustme.CA().cert_pem.write_to_path(str(tls_cluster.root / "fake-ca.crt"))
    tls_cluster.start_agent(bad, extra=["--ca-file", str(tls_cluster.root / "fake-ca.crt")])
    with tls_cluster.client() as admin:
        wait_until(lambda: [n.name for n in admin.nodes()] == ["tls-a"], what="tls-a")
        # tls-b tried, and its handshake with a daemon it does not trust failed.
        wait_until(
            lambda: "registering as tls-b" in tls_cluster.log("agent-tls-b"),
            what="tls-b to try and fail",
        )
        assert [n.name for n in admin.nodes()] == ["tls-a"]


@pytest.mark.parametrize(
    "insecure, code, said",
    [
        pytest.param(False, 1, "reachable from other hosts", id="refused-without-tls"),
        pytest.param(True, None, "INSECURE: serving", id="insecure-says-so"),
    ],
)
def test_a_listener_other_hosts_reach_needs_tls_or_an_explicit_insecure(
    tmp_path, insecure, code, said
):
    config = tmp_path / "gpuctld.toml"
    config.write_text(f"[server]\ninsecure = {str(insecure).lower()}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuctl.runtime.daemon", "--config", str(config),
         "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "state"),
         "--socket", str(tmp_path / "s.sock")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if code is not None:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == code
        else:
            err = ""
            while "serving on" not in err:
                line = proc.stderr.readline()
                assert line, f"gpuctld exited: {err}"
                err += line
    finally:
        proc.terminate()
        proc.wait(30)
    assert said in err
    assert "Traceback" not in err
