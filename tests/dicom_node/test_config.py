"""Config loading, validation messages, path resolution, overrides and live reload."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ENV_VAR, NodeConfig, load_config, read_config_file
from dicom_node.errors import EXIT_CONFIG, ConfigError
from tests.peers import REPO
from tests.support.config_files import write

REPO_DEFAULT_CONFIG = REPO / "config" / "node.yaml"


def test_embedded_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    cfg, path = load_config()
    assert path == tmp_path / "config" / "node.yaml"
    assert cfg.node.ae_title == "FUSIONNODE"
    assert cfg.node.port == 11112
    assert cfg.node.allowed_calling_aets == []
    assert cfg.node.accepts_any_caller and cfg.node.calling_aets == ()
    assert cfg.node.accept_any_called_aet is False
    assert cfg.storage.max_instance_mb == 2048
    assert cfg.storage.max_rows_columns == 8192
    assert cfg.storage.root == tmp_path / "dicom-node-data"
    assert cfg.database.url == f"sqlite:///{tmp_path / 'dicom-node-data' / 'index.sqlite3'}"
    assert cfg.routing.send_to == []
    assert cfg.pairing.series_quiet_seconds == 30
    assert cfg.pairing.min_slices == 20
    assert cfg.jobs.max_attempts == 3
    assert cfg.worker.device == "auto"
    assert cfg.fusion.strategy == "learned-fusion"
    assert cfg.retention.enabled is False


def test_shipped_config_matches_embedded_defaults(tmp_path: Path) -> None:
    """config/node.yaml documents the defaults: loading it changes nothing but paths."""
    shipped = read_config_file(REPO_DEFAULT_CONFIG)
    defaults = NodeConfig()
    for section in NodeConfig.model_fields:
        if section in ("storage", "database", "logging"):
            continue
        assert getattr(shipped, section) == getattr(defaults, section), section
    assert shipped.storage.root == REPO_DEFAULT_CONFIG.parent.parent / "dicom-node-data"


def test_precedence_flag_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "config" / "node.yaml", {"node": {"ae_title": "FROMDEFAULT"}})
    env_file = write(tmp_path / "env.yaml", {"node": {"ae_title": "FROMENV"}})
    flag_file = write(tmp_path / "flag.yaml", {"node": {"ae_title": "FROMFLAG"}})
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert load_config()[0].node.ae_title == "FROMDEFAULT"
    monkeypatch.setenv(ENV_VAR, str(env_file))
    assert load_config()[0].node.ae_title == "FROMENV"
    assert load_config(flag_file)[0].node.ae_title == "FROMFLAG"


def test_named_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="file not found") as err:
        load_config(tmp_path / "missing.yaml")
    assert err.value.exit_code == EXIT_CONFIG
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "also-missing.yaml"))
    with pytest.raises(ConfigError, match=r"also-missing\.yaml"):
        load_config()


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "etc" / "node.yaml",
        {"storage": {"root": "../data"}, "logging": {"file": "logs/node.log"}},
    )
    cfg, _ = load_config(cfg_file)
    assert cfg.storage.root == tmp_path / "data"
    assert cfg.database.url == f"sqlite:///{tmp_path / 'data' / 'index.sqlite3'}"
    assert cfg.logging.file == tmp_path / "etc" / "logs" / "node.log"
    cfg2, _ = load_config(
        write(tmp_path / "etc" / "db.yaml", {"database": {"url": "sqlite:///idx.db"}})
    )
    assert cfg2.database.url == f"sqlite:///{tmp_path / 'etc' / 'idx.db'}"
    url = "postgresql+psycopg://node@db/fusion"
    cfg3, _ = load_config(write(tmp_path / "etc" / "pg.yaml", {"database": {"url": url}}))
    assert cfg3.database.url == url


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"node": {"port": 70000}}, "node.port", "less than or equal to 65535"),
        ({"node": {"port": "abc"}}, "node.port", "valid integer"),
        ({"node": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, "node.ae_title", "at most 16"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title", "not a valid AE title"),
        (
            {"node": {"allowed_calling_aets": ["OK", ""]}},
            "node.allowed_calling_aets.1",
            "at least 1",
        ),
        ({"node": {"aetitle": "X"}}, "node.aetitle", "unknown key"),
        ({"nodes": {}}, "nodes", "unknown key"),
        (
            {"destinations": {"PACS": {"ae_title": "P", "host": "h"}}},
            "destinations.PACS.port",
            "Field required",
        ),
        (
            {
                "destinations": {
                    "PACS": {"ae_title": "P", "host": "h", "port": 104, "send": ["fused", "ct"]}
                }
            },
            "destinations.PACS.send.1",
            "'fused', 'registered_mr', 'reg' or 'qa'",
        ),
        ({"routing": {"send_to": ["NOWHERE"]}}, "(top level)", "unknown destination(s) NOWHERE"),
        (
            {"pairing": {"mr_rules": [{"series_description_regex": "t1("}]}},
            "pairing.mr_rules.0.series_description_regex",
            "invalid regular expression",
        ),
        ({"worker": {"device": "tpu"}}, "worker.device", "'auto', 'cpu' or 'cuda'"),
        ({"derive": {"uid_root": "1.2.x"}}, "derive.uid_root", "not a valid UID root"),
        (
            {"node": {"allowed_calling_aets": "SOME"}},
            "node.allowed_calling_aets",
            "list of AE titles, or ANY",
        ),
        (
            {"node": {"calling_aet_hosts": {"CT": ["not a host!"]}}},
            "node.calling_aet_hosts",
            "not an IP address, a network",
        ),
        (
            {"node": {"allowed_calling_aets": ["MR"], "calling_aet_hosts": {"CT": ["10.0.0.1"]}}},
            "node",
            "not in allowed_calling_aets: CT",
        ),
        ({"node": {"calling_aet_hosts": {"CT": []}}}, "node.calling_aet_hosts", "at least one"),
        ({"storage": {"max_instance_mb": 0}}, "storage.max_instance_mb", "greater than or equal"),
        ({"storage": {"max_rows_columns": 70000}}, "storage.max_rows_columns", "less than"),
        (
            {"node": {"association_request_timeout_seconds": 0}},
            "node.association_request_timeout_seconds",
            "greater than 0",
        ),
    ],
)
def test_errors_name_file_key_and_problem(
    tmp_path: Path, data: dict[str, object], key: str, problem: str
) -> None:
    cfg_file = write(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    message = str(err.value)
    assert message.startswith(f"{cfg_file}: {key}: "), message
    assert problem in message


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "broken.yaml", "node:\n  port: 1\n   ae_title: [x\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_destinations_and_routing(tmp_path: Path) -> None:
    cfg, _ = load_config(
        write(
            tmp_path / "n.yaml",
            {
                "destinations": {
                    "TPS": {"ae_title": "TPS", "host": "10.0.0.5", "port": 104},
                    "PACS": {"ae_title": "PACS", "host": "pacs", "port": 11112, "send": ["reg"]},
                },
                "routing": {"send_to": ["TPS", "PACS"]},
            },
        )
    )
    assert cfg.destinations["TPS"].send == ["fused", "registered_mr", "reg"]
    assert cfg.destinations["PACS"].send == ["reg"]
    assert cfg.routing.send_to == ["TPS", "PACS"]


def test_overrides_win_over_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "n.yaml", {"node": {"port": 1234, "ae_title": "FILE"}})
    cfg, _ = load_config(
        cfg_file, {"node.port": 4321, "node.ae_title": None, "storage.root": str(tmp_path / "s")}
    )
    assert cfg.node.port == 4321
    assert cfg.node.ae_title == "FILE"
    assert cfg.storage.root == tmp_path / "s"
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(cfg_file, {"node.port": 0})


def test_access_keys(tmp_path: Path) -> None:
    cfg, _ = load_config(
        write(
            tmp_path / "n.yaml",
            {
                "node": {
                    "allowed_calling_aets": ["CT_SIM", "PACS"],
                    "calling_aet_hosts": {"CT_SIM": ["10.1.2.3", "10.9.0.0/16", "ct.example"]},
                    "accept_any_called_aet": True,
                }
            },
        )
    )
    assert cfg.node.calling_aets == ("CT_SIM", "PACS") and not cfg.node.accepts_any_caller
    assert cfg.node.calling_aet_hosts == {"CT_SIM": ["10.1.2.3", "10.9.0.0/16", "ct.example"]}
    assert cfg.node.accept_any_called_aet is True
    # the old spelling of "anyone" still means anyone (a reload guards against it, see
    # test_config_watcher.py)
    empty, _ = load_config(write(tmp_path / "e.yaml", {"node": {"allowed_calling_aets": []}}))
    assert empty.node.accepts_any_caller


def test_config_is_immutable() -> None:
    cfg = NodeConfig()
    with pytest.raises(ValueError):
        cfg.node.port = 1


def test_prefetch_section(tmp_path: Path) -> None:
    """prefetch: off by default; source must name a destination; method is move or get."""
    defaults = NodeConfig().prefetch
    assert (defaults.enabled, defaults.source, defaults.method, defaults.max_series) == (
        False,
        None,
        "move",
        1,
    )
    pacs = {"ae_title": "PACS", "host": "10.0.0.1", "port": 104}
    ok = read_config_file(
        write(
            tmp_path / "ok.yaml",
            {
                "destinations": {"pacs": pacs},
                "prefetch": {"enabled": True, "source": "pacs", "method": "get", "max_series": 2},
            },
        )
    )
    assert ok.prefetch.method == "get" and ok.prefetch.source == "pacs"
    bad = {
        "unknown.yaml": ({"prefetch": {"source": "nope"}}, "prefetch.source names unknown"),
        "nosource.yaml": ({"prefetch": {"enabled": True}}, "needs prefetch.source"),
        "method.yaml": ({"prefetch": {"method": "push"}}, "prefetch.method"),
        "series.yaml": ({"prefetch": {"max_series": 0}}, "prefetch.max_series"),
    }
    for name, (data, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            read_config_file(write(tmp_path / name, data))
