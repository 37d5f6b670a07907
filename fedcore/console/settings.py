"""The console's settings and their command-line flags (one declaration for both CLIs)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.errors import ConfigError
from fedcore.flags import add_flags, flag_values, setting, setting_metadata
from fedcore.tls import host_of, is_loopback

__all__ = [
    "ConsoleSettings",
    "add_console_flags",
    "allowed_hosts",
    "console_settings_from_args",
    "read_password",
]

#: The shortest sign-in secret accepted: a console is a door to the silo's decisions.
MIN_PASSWORD_CHARS = 12


@dataclass(frozen=True)
class ConsoleSettings:
    """Where the console listens and how it is protected.

    Attributes:
        listen: ``HOST:PORT`` (port 0 picks a free one).
        password: the secret that signs a person in (read from ``--console-password-file``).
        tls_cert / tls_key: served over HTTPS with these (PEM); required off loopback.
    """

    listen: str = field(
        metadata=setting_metadata(
            "serve the web console here, e.g. 127.0.0.1:8080 (default: off); off loopback "
            "it needs --console-tls-cert and --console-tls-key",
            flag="--console",
            metavar="HOST:PORT",
        )
    )
    #: Read from ``--console-password-file``: the flag names a file, not the secret.
    password: str
    tls_cert: Path | None = setting(
        None, "the console's HTTPS certificate (PEM)", flag="--console-tls-cert"
    )
    tls_key: Path | None = setting(
        None, "the private key of --console-tls-cert", flag="--console-tls-key"
    )

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--console-tls-cert and --console-tls-key go together")
        if self.tls_cert is None and not is_loopback(host_of(self.listen)):
            # No --insecure escape: a password and session cookies never cross a network
            # in clear text.
            raise ConfigError(
                f"refusing to serve the console on {self.listen!r}, which other machines can "
                "reach, without TLS: give --console-tls-cert and --console-tls-key (fed-certs "
                "init makes them) or listen on 127.0.0.1"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def host(self) -> str:
        return host_of(self.listen)

    @property
    def port(self) -> int:
        _, sep, port = self.listen.rpartition(":")
        try:
            if not sep:
                raise ValueError
            return int(port)
        except ValueError:
            raise ConfigError(f"--console {self.listen!r} is not HOST:PORT") from None


#: Host names a loopback console answers to: a page of another site whose name was re-bound
#: to 127.0.0.1 (DNS rebinding) is refused before any route runs.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def allowed_hosts(settings: ConsoleSettings) -> tuple[str, ...] | None:
    """The ``Host`` names the console accepts (None: any, for a console served with TLS on a
    public name)."""
    return LOOPBACK_HOSTS if is_loopback(settings.host) else None


def read_password(path: Path) -> str:
    """The sign-in secret in ``path`` (surrounding whitespace dropped)."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --console-password-file {path}: {exc}") from None
    if len(secret) < MIN_PASSWORD_CHARS:
        raise ConfigError(
            f"--console-password-file {path} holds fewer than {MIN_PASSWORD_CHARS} characters; "
            "write a longer secret (e.g. `openssl rand -hex 16 > FILE`)"
        )
    return secret


def add_console_flags(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--console HOST:PORT`` and its sign-in and TLS flags (from :class:`ConsoleSettings`)."""
    g = parser.add_argument_group(f"web console ({what}; docs/consoles.md)")
    add_flags(g, ConsoleSettings, only=("listen",))
    g.add_argument(
        "--console-password-file",
        type=Path,
        metavar="FILE",
        help="file holding the secret that signs a person in to the console (required with "
        f"--console; at least {MIN_PASSWORD_CHARS} characters)",
    )
    add_flags(g, ConsoleSettings, only=("tls_cert", "tls_key"))


def console_settings_from_args(args: argparse.Namespace) -> ConsoleSettings | None:
    """The settings the flags ask for; None without ``--console``."""
    if args.console is None:
        if args.console_password_file is not None or args.console_tls_cert is not None:
            raise ConfigError("--console-password-file and --console-tls-* need --console")
        return None
    if args.console_password_file is None:
        raise ConfigError(
            "--console needs --console-password-file: nothing is shown without signing in"
        )
    settings = ConsoleSettings(
        password=read_password(args.console_password_file),
        **flag_values(ConsoleSettings, args),
    )
    _ = settings.port  # a malformed address fails at start, not when serving
    return settings
