"""The container files in docker/, checked without a container engine (none on the development
machines): the compose file against the node's configuration model, the Dockerfile against
the install script CI runs, and the package the image installs."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from dicom_node.cli import build_parser
from dicom_node.cli.health import cmd_healthcheck
from dicom_node.cli.serve import cmd_serve, cmd_worker
from dicom_node.config import ENV_VAR, NodeConfig, read_config_file
from tests.peers import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
INSTALL_SCRIPT = "scripts/install.sh"
STORAGE_VOLUME = "storage"
DATABASE_SERVICE = "postgres"
SHARED_SECTIONS = ("storage", "database", "destinations", "routing", "jobs", "fusion", "derive")
"""Config sections serve and every worker must agree on (same data, same jobs, same UIDs)."""
ROLE_OF_COMMAND = {cmd_serve: "serve", cmd_worker: "worker"}
IMAGE_SOURCES = ("pyproject.toml", "README.md", "dicom_node", "fusion_engine")
"""What the Dockerfile's build stage copies to install the package."""


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def node_services() -> dict[str, dict[str, Any]]:
    """The compose services that run dicom-node (serve or worker)."""
    found = {}
    for name, svc in compose()["services"].items():
        command = svc.get("command") or []
        if command and command[0] in ("serve", "worker"):
            found[name] = svc
    return found


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or host path) of a service's volumes."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        found[target] = source
    return found


def service_config(service: dict[str, Any]) -> NodeConfig:
    """The config file a service runs on (``DICOM_NODE_CONFIG``, mounted from docker/)."""
    path = service["environment"][ENV_VAR]
    source = mounts(service).get(path)
    assert source is not None and source.startswith("./"), f"{path} is not mounted from docker/"
    return read_config_file(DOCKER / source)


def parse_command(argv: list[str]) -> Any:
    """What the dicom-node command line makes of ``argv`` (fails on an unknown command)."""
    return build_parser().parse_args(argv)


def test_compose_has_the_database_the_node_workers_and_a_pacs() -> None:
    services = compose()["services"]
    assert {DATABASE_SERVICE, "node", "worker", "orthanc"} <= set(services)
    roles = {
        name: ROLE_OF_COMMAND[parse_command(s["command"]).func]
        for name, s in node_services().items()
    }
    assert roles["node"] == "serve" and roles["worker"] == "worker"
    assert list(roles.values()).count("serve") == 1  # one serve per database
    assert STORAGE_VOLUME in compose()["volumes"]


@pytest.mark.parametrize("name", sorted(node_services()))
def test_node_service_config_matches_the_compose_file(name: str) -> None:
    services = compose()["services"]
    svc = services[name]
    cfg = service_config(svc)
    # the shared storage: the one named volume, mounted where the config's storage root is
    assert mounts(svc).get(str(cfg.storage.root)) == STORAGE_VOLUME
    # the database: the compose PostgreSQL, its user and database, no password in the file
    url = make_url(cfg.database_url)
    db_env = services[DATABASE_SERVICE]["environment"]
    assert url.drivername == "postgresql+psycopg" and url.host == DATABASE_SERVICE
    assert (url.username, url.database) == (db_env["POSTGRES_USER"], db_env["POSTGRES_DB"])
    assert url.password is None
    assert svc["environment"]["PGPASSWORD"] == db_env["POSTGRES_PASSWORD"]
    assert svc["depends_on"][DATABASE_SERVICE]["condition"] == "service_healthy"
    # destinations: compose services, with the AE title and port they answer on
    for dest in cfg.destinations.values():
        assert dest.host in services, f"destination host {dest.host} is not a service"
        env = services[dest.host].get("environment", {})
        assert (env.get("ORTHANC__DICOM_AET"), int(env.get("ORTHANC__DICOM_PORT", 0))) == (
            dest.ae_title,
            dest.port,
        )
    # the health check is a dicom-node command of the service's role
    health = parse_command(svc["healthcheck"]["test"][2:])
    assert svc["healthcheck"]["test"][:2] == ["CMD", "dicom-node"]
    assert health.func is cmd_healthcheck
    assert health.role == ROLE_OF_COMMAND[parse_command(svc["command"]).func]


def test_serve_runs_no_worker_and_publishes_its_dicom_port() -> None:
    svc = compose()["services"]["node"]
    cfg = service_config(svc)
    assert cfg.worker.embedded is False
    assert cfg.node.host == "0.0.0.0"
    published = [p.split(":") for p in svc["ports"]]
    assert [int(p[-1]) for p in published] == [cfg.node.port]


def test_workers_scale_and_agree_with_serve() -> None:
    services = node_services()
    serve = service_config(services["node"])
    for name, svc in services.items():
        if name == "node":
            continue
        # scalable: no fixed container name, no published port to collide
        assert "container_name" not in svc and "ports" not in svc, name
        worker = service_config(svc)
        for section in SHARED_SECTIONS:
            assert getattr(worker, section) == getattr(serve, section), f"{name}: {section}"
    assert services["worker"]["deploy"]["replicas"] >= 2


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_dockerfile_installs_with_the_script_ci_runs() -> None:
    steps = dockerfile_instructions()
    runs = [args for word, args in steps if word == "RUN"]
    assert any(f"bash {INSTALL_SCRIPT}" in r for r in runs)
    assert f"bash {INSTALL_SCRIPT}" in (REPO / "scripts" / "test.sh").read_text()
    first_stage, final_stage = [i for i, (w, _) in enumerate(steps) if w == "FROM"]
    build_stage = steps[first_stage:final_stage]
    copied: set[str] = set()
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            if (word, args) in build_stage:
                copied.update(sources)
    assert copied == {*IMAGE_SOURCES, INSTALL_SCRIPT}  # what the package test builds from
    assert [a for w, a in steps if w == "ARG" and a.startswith("TORCH_INDEX_URL=")] == [
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    ]


def test_image_runs_as_a_user_with_its_config_and_entrypoints() -> None:
    steps = dockerfile_instructions()
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(a for w, a in final if w == "ENV")
    config_in_image = re.search(rf"{ENV_VAR}=(\S+)", env)
    assert config_in_image is not None
    copied = {
        shlex.split(a)[-1]: shlex.split(a)[0] for w, a in final if w == "COPY" and "--from" not in a
    }
    cfg = read_config_file(REPO / copied[config_in_image[1]])
    volumes = [v for w, a in final if w == "VOLUME" for v in exec_form(a)]
    assert str(cfg.storage.root) in volumes
    (entrypoint,) = [exec_form(a) for w, a in final if w == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for w, a in final if w == "CMD"]
    assert entrypoint == ["dicom-node"] and parse_command(cmd).func is cmd_serve
    assert parse_command(["worker"]).func is cmd_worker
    (health,) = [a for w, a in final if w == "HEALTHCHECK"]
    probe = exec_form(health.split(" CMD ", 1)[1])
    assert probe[0] == "dicom-node" and parse_command(probe[1:]).func is cmd_healthcheck
    assert str(cfg.node.port) in [a for w, a in final if w == "EXPOSE"]


@pytest.mark.slow
def test_package_holds_the_migrations_weights_and_commands(tmp_path: Path) -> None:
    """What a regular install (the image's) gets: every migration, the intact weights, the
    console scripts; an editable checkout would hide a missing package-data entry."""
    source = tmp_path / "src"  # a copy: building writes build/ beside the sources
    source.mkdir()
    for part in IMAGE_SOURCES:
        if (REPO / part).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / part, source / part, ignore=skip)
        else:
            shutil.copy(REPO / part, source / part)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        revisions = sorted((REPO / "dicom_node" / "migrations" / "versions").glob("*.py"))
        assert revisions
        for rev in revisions:
            assert f"dicom_node/migrations/versions/{rev.name}" in names
        assert "dicom_node/migrations/env.py" in names
        manifest = json.loads(zf.read("fusion_engine/weights/manifest.json"))
        weights = zf.read(f"fusion_engine/weights/{manifest['file']}")
        assert hashlib.sha256(weights).hexdigest() == manifest["sha256"]
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "dicom-node = dicom_node.cli:main" in scripts


def unit(name: str) -> configparser.ConfigParser:
    """A systemd unit file of docker/; ``Environment=NAME=value`` lines become keys
    ``Environment.NAME``."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(
        re.sub(r"^Environment=", "Environment.", (DOCKER / name).read_text(), flags=re.M)
    )
    return parser


@pytest.mark.parametrize(
    ("name", "command"),
    [("dicom-node.service", cmd_serve), ("dicom-node-worker@.service", cmd_worker)],
)
def test_systemd_units_run_the_node_as_its_own_user(name: str, command: object) -> None:
    service = unit(name)["Service"]
    assert service["User"] not in ("root", "0")
    program, *argv = shlex.split(service["ExecStart"])
    assert program.endswith("/bin/dicom-node") and parse_command(argv).func is command
    env = {k.split(".", 1)[1]: v for k, v in service.items() if k.startswith("Environment.")}
    assert env[ENV_VAR].startswith("/etc/dicom-node/")
    assert "PGPASSFILE" in env  # the database password stays out of the config file
    compose_storage = service_config(compose()["services"]["node"]).storage.root
    assert str(compose_storage).startswith(service["ReadWritePaths"])
    assert service["UMask"] == "0027"
