"""C-STORE access: a site is its calling AE title *and* the peer's address; TLS with client
certificates made here by the test's own CA. Real `sitebench qc serve`, dcmtk's storescu and
pynetdicom's SCU over TLS; real GE T1 slices of the shared data."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
from pathlib import Path

import pytest
from test_qc_queries import wait_for
from test_qc_stow import T1, Service, free_port

STORESCU = Path("/usr/bin/storescu")
pytestmark = [pytest.mark.dicom_net,
              pytest.mark.skipif(not (T1.exists() and STORESCU.exists()), reason="needs shared DICOM and dcmtk")]


@pytest.fixture(scope="module")
def protocols(t1_protocols):
    return t1_protocols


def _dicom_service(tmp: Path, protocols: Path, sites: dict, tls: dict | None = None) -> Service:
    port = free_port()
    svc = Service(tmp, protocols, sites=sites,
                  dicom={"host": "127.0.0.1", "port": port, "ae_title": "SITEBENCH", **({"tls": tls} if tls else {})})
    svc.dicom_port = port
    return svc


def test_an_association_from_an_unregistered_address_is_refused_and_audited(tmp_path, protocols):
    files = sorted(T1.iterdir())[:3]
    svc = _dicom_service(tmp_path, protocols, {
        "S01": {"ae_titles": ["S01_MR1"], "dicom_peers": ["10.9.9.0/24"]},  # not where the test sends from
        "S02": {"ae_titles": ["S02_MR1"], "dicom_peers": ["127.0.0.1/32"]}}).start()
    try:
        refused = subprocess.run([str(STORESCU), "-aet", "S01_MR1", "-aec", "SITEBENCH", "127.0.0.1",
                                  str(svc.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0, refused.stdout + refused.stderr
        rejected = wait_for(lambda: [r for r in svc.audit() if r["what"] == "association rejected"])
        assert rejected and "peer address 127.0.0.1 is not one of site S01's dicom_peers" in rejected[0]["why"]
        assert svc.known() == set()  # nothing stored (C-STORE bytes are kept as received, not as on disk)
        sent = subprocess.run([str(STORESCU), "-aet", "S02_MR1", "-aec", "SITEBENCH", "127.0.0.1",
                               str(svc.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert wait_for(lambda: len(svc.known()) == len(files)), svc.known()
    finally:
        svc.stop()


def test_a_bad_peer_network_in_the_config_is_one_line(tmp_path, protocols):
    from conftest import run_cli

    svc = _dicom_service(tmp_path, protocols, {"S01": {"ae_titles": ["S01_MR1"], "dicom_peers": ["10.0.0.300"]}})
    result = run_cli("qc", "serve", "--config", svc.config)
    assert result.returncode == 2 and "10.0.0.300" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- TLS
def _certificates(folder: Path) -> dict[str, Path]:
    """A trial CA, the gate's certificate (for 127.0.0.1), a site's client certificate, and a
    client certificate from another CA; PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        out[name + "_key"] = folder / f"{name}.key"
        out[name + "_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        out[name] = folder / f"{name}.pem"
        out[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make(name: str, issuer_name, issuer_key, ca: bool = False, server: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                            critical=False)
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        write(name, key, cert)
        return key, cert

    ca_key, ca_cert = make("trial-ca", None, None, ca=True)
    make("gate", ca_cert.subject, ca_key, server=True)
    make("site-s01", ca_cert.subject, ca_key)
    rogue_key, rogue_ca = make("rogue-ca", None, None, ca=True)
    make("rogue-client", rogue_ca.subject, rogue_key)
    return out


def _send_over_tls(port: int, files: list[Path], certs: dict[str, Path], client: str | None) -> list[int] | None:
    """C-STORE the files over TLS with pynetdicom; the statuses, or None when no association was made."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["trial-ca"]))
    if client:
        context.load_cert_chain(str(certs[client]), str(certs[client + "_key"]))
    ae = AE(ae_title="S01_MR1")
    ae.add_requested_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.acse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SITEBENCH", tls_args=(context, "127.0.0.1"))
    except (ssl.SSLError, OSError):
        return None
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def test_tls_with_client_certificates(tmp_path, protocols):
    certs = _certificates(tmp_path)
    files = sorted(T1.iterdir())[3:5]
    svc = _dicom_service(tmp_path, protocols, {"S01": {"ae_titles": ["S01_MR1"]}},
                         tls={"certificate": str(certs["gate"]), "private_key": str(certs["gate_key"]),
                              "client_ca": str(certs["trial-ca"])}).start()
    try:
        assert _send_over_tls(svc.dicom_port, files[:1], certs, client=None) is None  # no client certificate
        assert _send_over_tls(svc.dicom_port, files[:1], certs, client="rogue-client") is None  # another CA
        plain = subprocess.run([str(STORESCU), "-aet", "S01_MR1", "-aec", "SITEBENCH", "127.0.0.1",
                                str(svc.dicom_port), str(files[0])], capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0  # no TLS, no association
        assert svc.known() == set()
        assert _send_over_tls(svc.dicom_port, files, certs, client="site-s01") == [0, 0]
        assert wait_for(lambda: len(svc.known()) == len(files)), svc.known()
    finally:
        svc.stop()
