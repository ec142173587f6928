"""Backup and restore as docs/deployment.md describes them: the database first (``pg_dump``,
or SQLite's online backup), then the storage root; after losing both, restoring both gives a
node whose index and files agree."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from dicom_node.models import Job, Patient
from dicom_node.states import JobState
from dicom_node.storage.source import series_source
from tests.peers.postgres import PostgresCluster
from tests.support.indexed import IndexedNode, make_indexed_node
from tests.support.jobs import make_jobs


def _back_up_database(url: str, dest: Path, request: pytest.FixtureRequest) -> None:
    parsed = make_url(url)
    assert parsed.database is not None
    if parsed.get_backend_name() == "sqlite":  # what `sqlite3 index.sqlite3 ".backup FILE"` does
        with sqlite3.connect(parsed.database) as src, sqlite3.connect(dest) as dst:
            src.backup(dst)
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    cluster.client("pg_dump", "--format=custom", f"--file={dest}", parsed.database)


def _restore_database(url: str, backup: Path, request: pytest.FixtureRequest) -> str:
    """Restore into a new database (the old one is gone); the URL to use from now on."""
    parsed = make_url(url)
    assert parsed.database is not None
    if parsed.get_backend_name() == "sqlite":
        shutil.copy(backup, parsed.database)
        return url
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    cluster.drop_database(parsed.database)
    restored = cluster.create_database()
    cluster.client("pg_restore", "--no-owner", f"--dbname={restored}", str(backup))
    return cluster.url(restored)


def test_database_then_storage_backup_restores_a_working_node(
    indexed_node: IndexedNode,
    database_url: str,
    ct_files: list[Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    node = indexed_node
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for f in ct_files[:5]:
        shutil.copy(f, incoming / f.name)
    node.ingest(incoming)
    (job_id,) = make_jobs(node, 1)
    root = node.config.storage.root
    stored = {p.name: p.read_bytes() for p in root.rglob("*.dcm")}
    assert len(stored) == 5

    backup = tmp_path / "backup"
    backup.mkdir()
    _back_up_database(database_url, backup / "index.dump", request)  # 1. the database
    subprocess.run(["cp", "-a", str(root), str(backup / "storage")], check=True)  # 2. files
    node.close()
    shutil.rmtree(root)  # the machine is lost

    url = _restore_database(database_url, backup / "index.dump", request)
    subprocess.run(["cp", "-a", str(backup / "storage"), str(root)], check=True)
    (tmp_path / "restored").mkdir()
    restored = make_indexed_node(
        tmp_path / "restored", database={"url": url}, storage={"root": str(root)}
    )
    try:
        with restored.sessions() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.state is JobState.QUEUED
            assert len(s.scalars(select(Patient)).all()) == 1
        uid = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID)
        with series_source(restored.config, restored.sessions).open_series(uid) as paths:
            assert {p.name: p.read_bytes() for p in paths} == stored
    finally:
        restored.close()
