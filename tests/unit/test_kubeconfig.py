"""lbctl.kube.kubeconfig reads what the kubernetes library reads (compared with the library itself),
and leaves to the library what it does not handle."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from lbctl.kube import kubeconfig
from lbctl.kube.client import KubeClient
from tests.loopcheck import file_work_on_this_thread

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def write(tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "b",
        "clusters": [{"name": "other", "cluster": {"server": "https://wrong:1"}}, {"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "a", "context": {"cluster": "other", "user": "u"}},
                     {"name": "b", "context": {"cluster": "c", "user": "u"}}],
    }))
    return path


def library(path: Path) -> k8s_client.Configuration:
    configuration = k8s_client.Configuration()
    k8s_config.load_kube_config(config_file=str(path), client_configuration=configuration)
    return configuration


def content(path: str | None) -> str | None:
    return Path(path).read_text() if path else None


@pytest.mark.parametrize(("cluster", "user"), [
    ({"server": "https://10.0.0.1:6443", "certificate-authority": "ca.crt"}, {"token": "abc"}),
    ({"server": "https://api.example:443/", "certificate-authority-data": base64.b64encode(PEM.encode()).decode()},
     {"client-certificate-data": base64.b64encode(b"CERT").decode(),
      "client-key-data": base64.b64encode(b"KEY").decode()}),
    ({"server": "https://[2001:db8::1]:6443", "insecure-skip-tls-verify": True}, {"tokenFile": "token"}),
    ({"server": "https://10.0.0.1:6443", "certificate-authority": "ca.crt"},
     {"client-certificate": "client.crt", "client-key": "client.key"}),
])
def test_the_same_server_ca_credentials_and_verification_as_the_library(
        tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> None:
    (tmp_path / "ca.crt").write_text(PEM)
    (tmp_path / "token").write_text("from-file\n")
    (tmp_path / "client.crt").write_text("CERT")
    (tmp_path / "client.key").write_text("KEY")
    path = write(tmp_path, cluster, user)
    ours, theirs = kubeconfig.load(str(path)), library(path)
    assert ours is not None
    assert ours.host == theirs.host
    assert ours.verify_ssl == theirs.verify_ssl
    assert content(ours.ssl_ca_cert) == content(theirs.ssl_ca_cert)
    assert content(ours.cert_file) == content(theirs.cert_file)
    assert content(ours.key_file) == content(theirs.key_file)
    # (the library keeps a token file's trailing newline, which no HTTP header may hold; we strip it)
    theirs_token = theirs.get_api_key_with_prefix("BearerToken", alias="authorization")
    assert ours.get_api_key_with_prefix("BearerToken", alias="authorization") == \
        (theirs_token.strip() if theirs_token else None)


@pytest.mark.parametrize("user", [
    {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}},
    {"auth-provider": {"name": "oidc"}},
    {"username": "a", "password": "b"},
])
def test_what_only_the_library_knows_is_left_to_it(tmp_path: Path, user: dict[str, Any]) -> None:
    assert kubeconfig.load(str(write(tmp_path, {"server": "https://10.0.0.1:6443"}, user))) is None


def test_several_kubeconfig_files_are_left_to_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"server": "https://10.0.0.1:6443"}, {"token": "t"})
    monkeypatch.setenv("KUBECONFIG", f"{path}:{path}")
    assert kubeconfig.load() is None
    monkeypatch.setenv("KUBECONFIG", str(path))
    loaded = kubeconfig.load()
    assert loaded is not None and loaded.host == "https://10.0.0.1:6443"


def test_in_cluster_reads_the_account_and_rereads_its_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("first")
    (tmp_path / "ca.crt").write_text(PEM)
    loaded = kubeconfig.in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    assert loaded is not None and loaded.host == "https://[fd00::1]:443"
    assert loaded.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert loaded.get_api_key_with_prefix("BearerToken") == "Bearer first"
    (tmp_path / "token").write_text("rotated")
    asyncio.run(loaded.refresh())
    assert loaded.get_api_key_with_prefix("BearerToken") == "Bearer first"  # within the minute
    clock = [0.0]
    monkeypatch.setattr(kubeconfig.time, "monotonic", lambda: clock[0])
    loaded._token_read_at = 0.0
    clock[0] = 61.0
    assert loaded.get_api_key_with_prefix("BearerToken") == "Bearer first"  # no I/O here: refresh reads it
    asyncio.run(loaded.refresh())
    assert loaded.get_api_key_with_prefix("BearerToken") == "Bearer rotated"
    assert kubeconfig.in_cluster(tmp_path, {}) is None


def test_the_token_file_is_never_read_on_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request of the forwarder asks for the token: a rotated token file is read again in a
    thread, never on the loop that also sends the heartbeats."""
    (tmp_path / "token").write_text("first")
    (tmp_path / "ca.crt").write_text(PEM)
    loaded = kubeconfig.in_cluster(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert loaded is not None
    loaded.ssl_ca_cert = None  # the system's CAs: the test's PEM is no certificate
    client = KubeClient(loaded)
    (tmp_path / "token").write_text("rotated")
    clock = [kubeconfig.time.monotonic() + 61.0]  # the file is due to be read again
    monkeypatch.setattr(kubeconfig.time, "monotonic", lambda: clock[0])

    async def requests_as_the_forwarder_makes_them() -> list[str]:
        seen = []
        for _ in range(3):
            await client.refresh_credentials()
            seen.append(client.headers()["Authorization"])
            clock[0] += 61.0
        await client.close()
        return seen

    with file_work_on_this_thread() as file_work:
        tokens = asyncio.run(requests_as_the_forwarder_makes_them())
    assert file_work == []
    assert tokens == ["Bearer rotated"] * 3  # read (in a thread) once due


def test_inline_certificates_and_keys_are_removed_when_the_process_exits(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": "https://10.0.0.1:6443",
                            "certificate-authority-data": base64.b64encode(PEM.encode()).decode()},
                 {"client-certificate-data": base64.b64encode(b"CERT").decode(),
                  "client-key-data": base64.b64encode(b"KEY").decode()})
    script = ("import sys\nfrom lbctl.kube import kubeconfig\nc = kubeconfig.load(sys.argv[1])\n"
              "print(c.ssl_ca_cert, c.cert_file, c.key_file)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    files = out.stdout.split()
    assert len(files) == 3 and all(f.startswith(tempfile.gettempdir()) for f in files), out.stdout
    assert not [f for f in files if Path(f).exists()]
