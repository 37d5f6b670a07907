"""A data scientist's connection to a coordinator: the token and the channel.

Shared by the analytics client (``fedcore.connect``, ``fed-query``) and the jobs client
(``fed-job``), so neither package imports the other's command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from fedcore.errors import ConfigError
from fedcore.tls import ClientTLS, require_tls_or_loopback

__all__ = ["TOKEN_ENV", "open_channel", "read_token"]

#: The environment variable a scientist's token may come from.
TOKEN_ENV = "FEDCORE_SCIENTIST_TOKEN"


def read_token(token: str | None, token_file: str | Path | None) -> str:
    """The token given, or read from ``token_file``, or from ``$FEDCORE_SCIENTIST_TOKEN``."""
    if token:
        return token
    if token_file is not None:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc.strerror}") from None
        if not text:
            raise ConfigError(f"the token file {token_file} is empty")
        return text
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    raise ConfigError(
        f"a data scientist's token is needed: --token-file (or ${TOKEN_ENV}); "
        "get one with `fed-certs add-scientist`"
    )


def open_channel(
    server: str,
    *,
    tls_ca: str | Path | None = None,
    tls_server_name: str | None = None,
    insecure: bool = False,
) -> grpc.Channel:
    """A channel to the coordinator at ``server`` (``HOST:PORT``). Plaintext is refused to any
    other machine than this one unless ``insecure``; give ``tls_ca`` (the CA that signed the
    coordinator's certificate) instead."""
    if tls_ca is None:
        require_tls_or_loopback(server, tls=False, insecure=insecure, role="data scientist")
        return grpc.insecure_channel(server)
    tls = ClientTLS(Path(tls_ca), server_name=tls_server_name)
    return grpc.secure_channel(server, tls.credentials(), options=tls.channel_options())
