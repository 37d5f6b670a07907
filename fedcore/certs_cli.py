"""``fed-certs``: a development CA, certificates and tokens for a TLS federation in one minute.

See :mod:`fedcore.certs` for the directory it lays out.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcore.atomic import write_atomically
from fedcore.certs import CertificateAuthority
from fedcore.enrollment import Enrollment, EnrollmentEntry, hash_token, new_token
from fedcore.errors import ConfigError, FedcoreError
from fedcore.secagg.identity import (
    Roster,
    fingerprint,
    generate_signing_key,
    raw_public,
    signing_key_pem,
)

__all__ = ["build_parser", "main", "server_sans"]

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

_EPILOG = """\
examples:
  fed-certs init --dir certs --server-name coord.example.org --workers hospital-a,hospital-b
  fed-certs add-worker --dir certs hospital-c
  fed-certs revoke --dir certs hospital-b
  fed-certs add-scientist --dir certs alice      # a data scientist's token (fed-query)
  fed-certs revoke-scientist --dir certs alice

then:
  fed-server --listen 0.0.0.0:50051 --tls-cert certs/server.pem --tls-key certs/server.key \\
             --tls-client-ca certs/ca.pem --enrolled certs/enrolled.json ...
  fed-worker --server coord.example.org:50051 --tls-ca certs/ca.pem --name hospital-a \\
             --tls-cert certs/workers/hospital-a.pem --tls-key certs/workers/hospital-a.key \\
             --token-file certs/workers/hospital-a.token ...
  # signed secure aggregation (fed-server --secagg --secagg-signed): every silo gets a copy
  # of certs/roster.json, agreed out of band, and its own signing key
  fed-worker ... --signing-key certs/workers/hospital-a.signing.pem --roster certs/roster.json
  fed-server ... --scientists certs/scientists.json
  fed-query --server coord.example.org:50051 --tls-ca certs/ca.pem \\
            --token-file certs/scientists/alice.token "mean(bmi)" --epsilon 0.5
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fed-certs",
        description="Create a development CA, the coordinator's certificate, and a client "
        "certificate and token per worker (for fed-server --tls-* --enrolled and "
        "fed-worker --tls-* --token-file).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the CA, the server certificate and workers")
    init.add_argument("--dir", type=Path, required=True, help="output directory")
    init.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name workers use to reach the coordinator (repeatable); the certificate "
        "also names localhost, and this host's name when no --server-name is given",
    )
    init.add_argument(
        "--server-ip",
        action="append",
        default=[],
        help="IP address workers use to reach the coordinator (repeatable); the certificate "
        "also names 127.0.0.1",
    )
    init.add_argument("--workers", default="", help="comma-separated worker names to enroll")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    add = sub.add_parser("add-worker", help="enroll a worker: certificate, key and token")
    add.add_argument("--dir", type=Path, required=True)
    add.add_argument("name")
    add.add_argument("--no-token", action="store_true", help="identify it by certificate only")
    rev = sub.add_parser(
        "revoke",
        help="revoke a worker: the coordinator re-reads --enrolled and refuses its next connection",
    )
    rev.add_argument("--dir", type=Path, required=True)
    rev.add_argument("name")
    sci = sub.add_parser(
        "add-scientist",
        help="enroll a data scientist: a token for fed-query / fedcore.connect, listed in "
        "DIR/scientists.json (fed-server --scientists); no CA needed",
    )
    sci.add_argument("--dir", type=Path, required=True)
    sci.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="NAME",
        help="a study the scientist works in (repeatable): on a standing network "
        "(fed-server --serve) they submit, see and stop that study's jobs only",
    )
    sci.add_argument("name")
    rsci = sub.add_parser("revoke-scientist", help="revoke a data scientist's token")
    rsci.add_argument("--dir", type=Path, required=True)
    rsci.add_argument("name")
    return p


def _scientists(directory: Path) -> Enrollment:
    path = directory / "scientists.json"
    if path.exists():
        return Enrollment(path, section="scientists")
    return Enrollment.empty(path, section="scientists")


def _add_scientist(directory: Path, name: str, studies: Sequence[str] = ()) -> None:
    """A data scientist is a role of its own: a token in DIR/scientists/NAME.token, its hash
    in DIR/scientists.json; it can never join as a worker, nor a worker query."""
    _check_name(name)
    secret = new_token()
    token_path = directory / "scientists" / f"{name}.token"
    write_atomically(token_path, (secret + "\n").encode(), mode=0o600)
    enrollment = _scientists(directory)
    for study in studies:
        _check_name(study)
    enrollment.set(
        name,
        EnrollmentEntry(token_sha256=hash_token(secret), revoked=False, studies=tuple(studies)),
    )
    enrollment.save()
    print(f"enrolled data scientist {name!r}: {token_path}")


def _check_name(name: str) -> str:
    if not name or len(name) > 128 or not set(name) <= _NAME_CHARS or name[0] in "._-":
        raise ConfigError(
            f"worker name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return name


def _enroll(directory: Path, ca: CertificateAuthority, name: str, *, token: bool) -> None:
    _check_name(name)
    issued = ca.issue_worker(name)
    workers = directory / "workers"
    issued.write(workers / f"{name}.pem", workers / f"{name}.key")
    digest = None
    if token:
        secret = new_token()
        write_atomically(workers / f"{name}.token", (secret + "\n").encode(), mode=0o600)
        digest = hash_token(secret)
    path = directory / "enrolled.json"
    enrollment = Enrollment(path) if path.exists() else Enrollment.empty(path)
    enrollment.set(
        name, EnrollmentEntry(token_sha256=digest, revoked=False, cert_sha256=issued.fingerprint)
    )
    enrollment.save()
    _add_signing_key(directory, name)
    print(
        f"enrolled worker {name!r}: {workers / name}.pem/.key/.signing.pem"
        + (", .token" if token else "")
    )


def _add_signing_key(directory: Path, name: str) -> None:
    """The silo's Ed25519 signing key (workers/NAME.signing.pem, mode 0600) and its
    fingerprint in DIR/roster.json, the list the data owners agree on for signed secure
    aggregation."""
    key = generate_signing_key()
    write_atomically(
        directory / "workers" / f"{name}.signing.pem", signing_key_pem(key), mode=0o600
    )
    path = directory / "roster.json"
    silos = dict(Roster.load(path).fingerprints) if path.exists() else {}
    silos[name] = fingerprint(raw_public(key))
    write_atomically(path, Roster(silos).to_json())


def server_sans(names: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses the coordinator's certificate names: every one given,
    plus loopback (a worker on the coordinator's machine), plus this host's name when no name
    is given; the first given name stays first (it becomes the subject)."""
    default_names = [] if names else [socket.gethostname()]
    all_names = list(dict.fromkeys([*names, *default_names, "localhost"]))
    all_ips = list(dict.fromkeys([*ips, "127.0.0.1"]))
    return all_names, all_ips


def _init(args: argparse.Namespace) -> None:
    d: Path = args.dir
    if (d / "ca.key").exists() and not args.force:
        raise ConfigError(f"{d / 'ca.key'} exists; pass --force to replace the CA")
    ca = CertificateAuthority.create()
    ca.issued.write(d / "ca.pem", d / "ca.key")
    names, ips = server_sans(args.server_name, args.server_ip)
    ca.issue_server(names, ips).write(d / "server.pem", d / "server.key")
    print(f"created CA {d / 'ca.pem'} and server certificate for {', '.join(names + ips)}")
    (d / "enrolled.json").unlink(missing_ok=True)
    (d / "roster.json").unlink(missing_ok=True)
    Enrollment.empty(d / "enrolled.json").save()
    for name in filter(None, (n.strip() for n in args.workers.split(","))):
        _enroll(d, ca, name, token=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            _init(args)
        else:
            d: Path = args.dir
            if args.command == "add-scientist":
                _add_scientist(d, args.name, args.study)
            elif args.command == "revoke-scientist":
                scientists = _scientists(d)
                found = scientists.entries.get(args.name)
                if found is None:
                    raise ConfigError(f"data scientist {args.name!r} is not enrolled in {d}")
                scientists.set(args.name, dataclasses.replace(found, revoked=True))
                scientists.save()
                print(f"revoked data scientist {args.name!r}")
            elif args.command == "add-worker":
                ca = CertificateAuthority.load(d / "ca.pem", d / "ca.key")
                _enroll(d, ca, args.name, token=not args.no_token)
            else:
                enrollment = Enrollment(d / "enrolled.json")
                entry = enrollment.entries.get(args.name)
                if entry is None:
                    raise ConfigError(f"worker {args.name!r} is not enrolled in {d}")
                enrollment.set(args.name, dataclasses.replace(entry, revoked=True))
                enrollment.save()
                roster = d / "roster.json"
                if roster.exists():  # its peers must stop accepting its signatures too
                    silos = dict(Roster.load(roster).fingerprints)
                    silos.pop(args.name, None)
                    write_atomically(roster, Roster(silos).to_json())
                print(f"revoked worker {args.name!r} (redistribute {roster} to the silos)")
    except FedcoreError as exc:
        print(f"fed-certs: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
