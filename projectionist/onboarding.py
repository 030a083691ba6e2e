"""What a browser needs to start using the proxy: the PAC file, the CA certificate in the formats
operating systems import, and the reserved host that only the proxy answers.

The control plane serves these at `/proxy.pac` and `/ca/*`; the proxy serves the same downloads and
a probe on `SETUP_HOST` (like mitmproxy's mitm.it), so the setup page can tell whether a browser
really goes through the proxy (plain HTTP) and trusts its CA (HTTPS). The certificate only: the
CA's private key is never read here.
"""

from __future__ import annotations

import hashlib
import json
import plistlib
import uuid
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# `.invalid` is reserved (RFC 6761): no DNS answers it, so only our proxy ever can.
SETUP_HOST = "projectionist.invalid"
PROBE_PATH = "/probe"
PAC_CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
CA_BASENAME = "projectionist-ca"
# file name -> content type; every one of them holds the certificate only.
CA_DOWNLOADS = {
    f"{CA_BASENAME}.pem": "application/x-pem-file",
    f"{CA_BASENAME}.crt": "application/x-x509-ca-cert",  # DER: what Windows and Android import
    f"{CA_BASENAME}.mobileconfig": "application/x-apple-aspen-config",  # iOS/macOS profile
}
_PROFILE_NAMESPACE = uuid.UUID("5b0e1c8e-3f0a-4c58-9a0e-6f1f0b7a3e21")


class CertificateMissing(FileNotFoundError):
    """The proxy creates the CA on its first start; until then there is nothing to download."""


def certificate_only(pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM bundle (mitmproxy's CA file holds the certificate only; a
    file that also held a key would still give out nothing but the certificate)."""
    return x509.load_pem_x509_certificate(pem)


def ca_download(pem: bytes, name: str) -> bytes:
    """The body of `/ca/<name>` for the CA certificate in `pem`."""
    cert = certificate_only(pem)
    if name.endswith(".pem"):
        return cert.public_bytes(serialization.Encoding.PEM)
    der = cert.public_bytes(serialization.Encoding.DER)
    if name.endswith(".crt"):
        return der
    if name.endswith(".mobileconfig"):
        return mobileconfig(der)
    raise KeyError(name)


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate, as browsers and `openssl x509 -fingerprint -sha256` show it."""
    der = certificate_only(pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def mobileconfig(der: bytes) -> bytes:
    """An unsigned configuration profile with one root-certificate payload (iOS Settings and
    macOS System Settings install it; the user still turns on full trust on iOS)."""
    digest = hashlib.sha256(der).hexdigest()
    payload = {
        "PayloadType": "com.apple.security.root",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"projectionist.ca.{digest[:16]}",
        "PayloadUUID": str(uuid.uuid5(_PROFILE_NAMESPACE, "cert:" + digest)).upper(),
        "PayloadDisplayName": "Projectionist proxy CA",
        "PayloadContent": der,
        "PayloadCertificateFileName": f"{CA_BASENAME}.cer",
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"projectionist.profile.{digest[:16]}",
        "PayloadUUID": str(uuid.uuid5(_PROFILE_NAMESPACE, "profile:" + digest)).upper(),
        "PayloadDisplayName": "Projectionist",
        "PayloadDescription": "Trusts the Projectionist proxy's certificate authority.",
        "PayloadOrganization": "Projectionist",
        "PayloadContent": [payload],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)


def pac_file(hosts: Iterable[str], proxy: str) -> str:
    """A PAC file sending only `hosts` (exact names or shell patterns such as *.plex.direct) and
    the setup host to `proxy` ("host:port"); everything else goes DIRECT."""
    exact, patterns = [], []
    for host in dict.fromkeys([SETUP_HOST, *(h.lower().rstrip(".") for h in hosts)]):
        (patterns if any(c in host for c in "*?") else exact).append(host)
    lines = [
        "// Projectionist: only the hosts rules.yaml intercepts go through the proxy.",
        "function FindProxyForURL(url, host) {",
        "  host = host.toLowerCase();",
        f"  var exact = {json.dumps(exact)};",
        f"  var patterns = {json.dumps(patterns)};",
        f"  var proxy = {json.dumps('PROXY ' + proxy)};",
        "  for (var i = 0; i < exact.length; i++) { if (host === exact[i]) return proxy; }",
        "  for (var j = 0; j < patterns.length; j++) { if (shExpMatch(host, patterns[j])) return proxy; }",
        '  return "DIRECT";',
        "}",
        "",
    ]
    return "\n".join(lines)


def probe_answer(scheme: str, pem: bytes | None) -> dict:
    """What the probe URL answers: proof that this proxy (and, over HTTPS, its CA) was used."""
    return {"proxy": "projectionist", "scheme": scheme,
            "ca_sha256": fingerprint(pem) if pem is not None else None}
