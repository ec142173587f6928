"""``dicom-node admin set-password``: the admin console's password.

The password is read from standard input when that is not a terminal (the first line, for
scripts: ``printf '%s\\n' "$PW" | dicom-node admin set-password``), else asked twice without
echo. Only its Argon2 hash is stored, in the console's owner-only password file
(``http.password_file``, default ``<storage.root>/console/users.json``); a running console
takes the new password at its next login, without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any, TextIO

from dicom_node.cli.common import load
from dicom_node.errors import EXIT_OK, UsageError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``admin set-password``."""
    p = sub.add_parser("admin", parents=[common], help="admin console users")
    asub = p.add_subparsers(dest="admin_cmd", required=True, metavar="ACTION")
    a = asub.add_parser(
        "set-password",
        parents=[common],
        help="set the password of the console's user 'admin' (stdin when not a terminal)",
    )
    a.set_defaults(func=cmd_set_password)


def read_password(stream: TextIO) -> str:
    """The new password: the first line of a pipe, or typed twice at a terminal."""
    if not stream.isatty():
        line = stream.readline()
        if not line:
            raise UsageError("no password on standard input")
        return line.rstrip("\r\n")
    first = getpass.getpass("New password for admin: ")
    if getpass.getpass("Again: ") != first:
        raise UsageError("the two passwords differ; nothing changed")
    return first


def cmd_set_password(args: argparse.Namespace) -> int:
    """Hash and store the admin password."""
    from dicom_node.console.auth import ADMIN_USER, PasswordStore, check_new_password

    cfg, _ = load(args)
    password = read_password(sys.stdin)
    check_new_password(password)
    PasswordStore(cfg.password_file).set_password(ADMIN_USER, password)
    print(f"password of {ADMIN_USER!r} set (Argon2 hash in {cfg.password_file})")
    return EXIT_OK
