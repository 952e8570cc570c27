"""TLS verification stays on by default: a self-signed server is refused, not silently trusted."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from capbatch.simulator import SimConfig, SimulatorThread
from conftest import make_cards, write_csv

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture
def tls_sim(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    pairs = make_cards(5)
    sim = SimulatorThread(SimConfig(cards={c: None for c, _ in pairs}), ssl_context=ctx).start()
    yield sim, pairs
    sim.stop()


def test_self_signed_certificate_is_refused_by_default(tmp_path, tls_sim, run_cli):
    sim, pairs = tls_sim
    src = write_csv(tmp_path / "cards.csv", pairs)
    p = run_cli("run", src, "--base-url", sim.url, "--rate", "unlimited", "--run-dir", tmp_path / "r")
    assert p.returncode == 3, p.stderr
    assert "TLS certificate verification failed" in p.stderr
    assert sim.stats()["requests"] == 0          # no request ever reached the untrusted server
    assert sim.card_ids() == {c: None for c, _ in pairs}


def test_no_verify_tls_works_and_warns(tmp_path, tls_sim, run_cli):
    sim, pairs = tls_sim
    src = write_csv(tmp_path / "cards.csv", pairs)
    p = run_cli("run", src, "--base-url", sim.url, "--rate", "unlimited", "--no-verify-tls",
                "--run-dir", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    assert "TLS certificate verification is OFF" in p.stderr
    assert sim.card_ids() == dict(pairs)
