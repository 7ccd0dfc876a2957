"""``ssl.SSLContext`` for the HTTP endpoint, from a :class:`TLSServerConfig`.

TLS 1.2 is the floor whatever the config says; client certificates, when
enabled, are always verified against ``client_ca_file``.
"""

from __future__ import annotations

import ssl

from .webconfig import TLSServerConfig, WebConfigError

__all__ = ["build_ssl_context"]

_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


def build_ssl_context(tls: TLSServerConfig, source: str = "<web config>") -> ssl.SSLContext:
    """A server-side context: cert chain loaded, TLS >= 1.2, client-cert policy applied.

    ``client_auth_type``: ``NoClientCert`` -> no client certificate asked;
    ``VerifyClientCertIfGiven`` -> optional, verified if sent;
    ``RequireAndVerifyClientCert`` -> required and verified.

    Reads the certificate, key and CA files now. Raises :class:`WebConfigError`
    (naming ``source`` and the offending key) when a file is missing or
    unreadable, the key does not match the certificate, or the CA bundle is
    invalid.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = max(_VERSIONS[tls.min_version], ssl.TLSVersion.TLSv1_2)
    if tls.max_version is not None:
        ctx.maximum_version = _VERSIONS[tls.max_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    _check_readable(tls, ("cert_file", "key_file", "client_ca_file"), source)
    try:
        ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except OSError as err:  # includes ssl.SSLError
        raise WebConfigError(source, [
            f"tls_server_config.cert_file/key_file: cannot load {tls.cert_file} with {tls.key_file}: {_reason(err)}",
        ]) from None
    if tls.verifies_clients:
        assert tls.client_ca_file is not None  # enforced by the model
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except OSError as err:
            raise WebConfigError(
                source, [f"tls_server_config.client_ca_file: cannot load {tls.client_ca_file}: {_reason(err)}"]
            ) from None
        verify = tls.client_auth_type == "RequireAndVerifyClientCert"
        ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _check_readable(tls: TLSServerConfig, keys: tuple[str, ...], source: str) -> None:
    """Raise WebConfigError listing every configured TLS file that cannot be read."""
    errors = []
    for key in keys:
        path = getattr(tls, key)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            errors.append(f"tls_server_config.{key}: cannot read {path}: {err.strerror or err}")
    if errors:
        raise WebConfigError(source, errors)


def _reason(err: OSError) -> str:
    if isinstance(err, ssl.SSLError):
        return err.reason or str(err)
    return err.strerror or str(err)
