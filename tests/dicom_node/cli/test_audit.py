"""``dicom-node audit verify|tail``, the audit records of ``jobs retry|cancel``, and the
certificate part of ``config check`` (real certificates from openssl)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from dicom_node import audit
from dicom_node.cli import main
from dicom_node.errors import EXIT_CONFIG, EXIT_DATA, EXIT_OK, EXIT_USAGE
from tests.peers.certs import TlsWorld, destination_tls_section, make_world, node_tls_section
from tests.support.indexed import make_indexed_node
from tests.support.jobs import make_jobs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TlsWorld:
    """Test certificates (openssl, made now)."""
    return make_world(tmp_path_factory.mktemp("certs"))


def test_job_actions_are_audited_and_the_log_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = make_indexed_node(tmp_path)
    try:
        (job_id,) = make_jobs(node, 1)
    finally:
        node.close()
    config = str(tmp_path / "node.yaml")
    assert main(["--config", config, "jobs", "cancel", str(job_id)]) == EXIT_OK
    assert main(["--config", config, "jobs", "retry", str(job_id)]) == EXIT_OK
    assert main(["--config", config, "jobs", "retry", "999"]) == EXIT_USAGE
    log_file = tmp_path / "storage" / "audit" / "audit.jsonl"
    records = audit.read_log(log_file)
    assert [r["outcome_text"] for r in records] == [
        f"cancel: job {job_id} cancelled",
        f"retry: job {job_id} queued again",
        "retry: no such job",
    ]
    assert [r["outcome"] for r in records] == [0, 0, 4]
    assert records[0]["objects"][1]["id"].startswith("hmac-sha256:")  # job's patient, hashed
    capsys.readouterr()
    assert main(["--config", config, "audit", "verify"]) == EXIT_OK
    assert "3 records, chain intact" in capsys.readouterr().out
    assert main(["--config", config, "audit", "tail", "-n", "1"]) == EXIT_OK
    tail = capsys.readouterr().out.strip().splitlines()
    assert len(tail) == 1 and "job-action outcome=4" in tail[0]
    lines = log_file.read_text().splitlines()
    first = json.loads(lines[0])
    first["detail"] = {"action": "retry"}
    log_file.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    assert main(["audit", "verify", str(log_file)]) == EXIT_DATA
    assert "line 2: chain broken" in capsys.readouterr().out


def write_config(folder: Path, world: TlsWorld, **tls: object) -> str:
    cfg = {
        "node": {"port": None, "tls": node_tls_section(world, **tls)},
        "storage": {"root": str(folder / "storage")},
        "destinations": {
            "TPS": {
                "ae_title": "TPS",
                "host": "localhost",
                "port": 2762,
                "tls": destination_tls_section(world),
            }
        },
    }
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_config_check_validates_certificates(
    tmp_path: Path, world: TlsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", write_config(tmp_path, world)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "plain port off, TLS port" in out and "over TLS" in out
    assert "ok node.tls.certificate:" in out and "ok destinations.TPS.tls.certificate:" in out
    assert "ERROR" not in out and "WARNING" not in out

    now = datetime.now(UTC)
    soon = world.ca.issue("renew-me", not_after=now + timedelta(days=20))
    path = write_config(
        tmp_path, world, certificate=str(soon.certificate), private_key=str(soon.private_key)
    )
    assert main(["config", "check", path]) == EXIT_OK
    assert "WARNING node.tls.certificate: certificate" in capsys.readouterr().out

    gone = world.ca.issue("gone", not_before=now - timedelta(days=9), not_after=now - timedelta(1))
    path = write_config(
        tmp_path, world, certificate=str(gone.certificate), private_key=str(gone.private_key)
    )
    assert main(["config", "check", path]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert "ERROR node.tls.certificate:" in out and "expired on" in out

    path = write_config(tmp_path, world, private_key=str(world.peer.private_key))
    assert main(["config", "check", path]) == EXIT_CONFIG
    assert "does not match" in capsys.readouterr().out
