"""The dicom-node command line: exit codes, config check, serve on defaults, echo/send."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.cli.net import expand_paths
from dicom_node.config import ENV_VAR
from dicom_node.errors import EXIT_CONFIG, EXIT_NETWORK, EXIT_OK, EXIT_USAGE
from tests.peers import REPO, dcmtk, free_port, port_open, wait_until
from tests.peers.node import NODE_AET, node_command
from tests.peers.node import NodeProcess as Node


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run(
        node_command(*args), capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"node": {"ae_title": "GOOD", "port": 4242}}))
    result = run_cli("config", "check", str(good))
    assert result.returncode == EXIT_OK, result.stderr
    assert "OK" in result.stdout and "GOOD" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 99999\n")
    result = run_cli("config", "check", str(bad))
    assert result.returncode == EXIT_CONFIG
    assert f"{bad}: node.port:" in result.stderr

    assert main(["config", "check", str(tmp_path / "missing.yaml")]) == EXIT_CONFIG
    assert main(["--config", str(good), "config", "check"]) == EXIT_OK


def test_shipped_config_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(REPO / "config" / "node.yaml")]) == EXIT_OK


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["no-such-command"])
    assert err.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as err:
        main(["serve", "--port", "not-a-number"])
    assert err.value.code == EXIT_USAGE
    cfg = tmp_path / "n.yaml"
    cfg.write_text("{}\n")
    assert main(["--config", str(cfg), "echo", "NOSUCHDEST"]) == EXIT_USAGE
    assert "unknown destination" in capsys.readouterr().err
    assert (
        main(["--config", str(cfg), "send", "X@127.0.0.1:1", str(tmp_path / "nope")]) == EXIT_USAGE
    )


def test_network_failure_exit_69(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    cfg = tmp_path / "n.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"destinations": {"GONE": {"ae_title": "GONE", "host": "127.0.0.1", "port": port}}}
        )
    )
    assert main(["--config", str(cfg), "echo", "GONE", "--timeout", "2"]) == EXIT_NETWORK


def test_echo_and_send_against_node(
    node_factory: Callable[..., Node], ct_files: list[Path], tmp_path: Path
) -> None:
    node = node_factory(node={"allowed_calling_aets": ["SENDER"]})
    cfg = tmp_path / "client.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "SENDER"},
                "destinations": {
                    "NODE": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": node.port}
                },
            }
        )
    )
    assert main(["--config", str(cfg), "echo", "NODE"]) == EXIT_OK
    # a refused calling AE is a network failure for the caller
    assert main(["--config", str(cfg), "echo", "NODE", "--calling-aet", "STRANGER"]) == EXIT_NETWORK
    folder = tmp_path / "series"
    folder.mkdir()
    for f in ct_files[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    assert main(["--config", str(cfg), "send", "NODE", str(folder)]) == EXIT_OK
    wait_until(lambda: len(list(node.storage.rglob("*.dcm"))) == 3, timeout=10, what="3 stored")
    assert node.stop() == 0


def test_expand_paths(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "2.dcm").write_bytes(b"x")
    (tmp_path / "a" / "1.dcm").write_bytes(b"x")
    (tmp_path / "a" / ".hidden").write_bytes(b"x")
    single = tmp_path / "single.dcm"
    single.write_bytes(b"x")
    assert expand_paths([tmp_path / "a", single]) == [
        tmp_path / "a" / "1.dcm",
        tmp_path / "a" / "b" / "2.dcm",
        single,
    ]


@pytest.mark.peers
def test_serve_starts_on_embedded_defaults(tmp_path: Path) -> None:
    """A fresh machine: no config file anywhere, only a port override."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            node_command("serve", "--port", str(port), "--ae-title", "FRESHNODE"),
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: proc.poll() is None and port_open(port), timeout=30, what="listen")
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aet", "ANYONE", "-aec", "FRESHNODE", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        assert (tmp_path / "dicom-node-data" / "index.sqlite3").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "embedded defaults" in log
    assert "allowed_calling_aets is empty" in log
    assert "listening as AE 'FRESHNODE'" in log


@pytest.mark.peers
def test_serve_storage_override(tmp_path: Path, ct_files: list[Path]) -> None:
    port = free_port()
    cfg = tmp_path / "n.yaml"
    cfg.write_text(
        yaml.safe_dump({"node": {"host": "127.0.0.1", "port": 1}, "storage": {"min_free_mb": 1}})
    )
    elsewhere = tmp_path / "elsewhere"
    proc = subprocess.Popen(
        node_command(
            "serve", "--config", str(cfg), "--port", str(port), "--storage", str(elsewhere)
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: proc.poll() is None and port_open(port), timeout=30, what="listen")
        sent = subprocess.run(
            [
                dcmtk("storescu"),
                "-aet",
                "X",
                "-aec",
                "FUSIONNODE",
                "127.0.0.1",
                str(port),
                str(ct_files[0]),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stderr
        assert len(list(elsewhere.rglob("*.dcm"))) == 1
        assert (elsewhere / "index.sqlite3").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_port_in_use_exits_69(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "n.yaml"
        cfg.write_text(
            yaml.safe_dump({"node": {"host": "127.0.0.1", "port": port}, "storage": {"root": "s"}})
        )
        result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == EXIT_NETWORK, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
