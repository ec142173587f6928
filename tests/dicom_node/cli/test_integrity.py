"""``dicom-node verify`` and ``dicom-node reindex`` on a real index and storage folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

from dicom_node.cli import main
from dicom_node.errors import EXIT_DATA, EXIT_IO, EXIT_OK
from dicom_node.models import Instance, Patient, Series, SeriesProgress, Study
from dicom_node.states import SeriesState
from dicom_node.storage.reindex import storage_lock
from tests.support.indexed import IndexedNode


def config_file(node: IndexedNode) -> str:
    return str(node.config.storage.root.parent / "node.yaml")


def wipe_index(node: IndexedNode) -> None:
    with node.sessions() as s, s.begin():
        for table in (Instance, Series, Study, Patient):
            s.execute(delete(table))


def test_verify_exit_codes(
    indexed_node: IndexedNode, ct_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    indexed_node.ingest(ct_files[0].parent)
    assert main(["verify", "--config", config_file(indexed_node)]) == EXIT_OK
    assert f"{len(ct_files)} indexed instances checked: 0 with problems" in capsys.readouterr().out
    victim = sorted(indexed_node.store.root.rglob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:-7])
    assert main(["verify", "--config", config_file(indexed_node)]) == EXIT_DATA
    out = capsys.readouterr().out
    assert f"PROBLEM  {victim.relative_to(indexed_node.store.root)}" in out
    assert "unreadable" in out


@pytest.mark.parametrize("pair", [False, True], ids=["recorded-complete", "pair-again"])
def test_reindex_rebuilds_a_lost_index(
    indexed_node: IndexedNode, ct_files: list[Path], pair: bool
) -> None:
    indexed_node.ingest(ct_files[0].parent)
    wipe_index(indexed_node)
    args = ["reindex", "--config", config_file(indexed_node)] + (["--pair"] if pair else [])
    assert main(args) == EXIT_OK
    with indexed_node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == len(ct_files)
        series = s.scalars(select(Series)).one()
        assert series.number_of_instances == len(ct_files)
        progress = s.get(SeriesProgress, series.series_instance_uid)
        if pair:  # left to completion and pairing, like a newly received series
            assert series.state == SeriesState.RECEIVING and progress is None
        else:  # recorded complete: nothing is fused or sent again
            assert series.state == SeriesState.COMPLETE
            assert progress is not None and progress.revision == 1
            assert progress.last_received_at == series.last_received_at
    assert main(["verify", "--config", config_file(indexed_node)]) == EXIT_OK


def test_reindex_refused_while_the_node_runs(
    indexed_node: IndexedNode, capsys: pytest.CaptureFixture[str]
) -> None:
    with storage_lock(indexed_node.store.root, exclusive=False):  # what serve holds
        assert main(["reindex", "--config", config_file(indexed_node)]) == EXIT_IO
    assert "stop it first" in capsys.readouterr().err
