"""Screenshots of the admin console from a real run, for the README (docs/console_*.png).

Starts ``dicom-node serve`` with its console and two real Orthanc peers as destinations, sends
a CT and an MR with DCMTK ``storescu``, waits until the fusion job is done and sent, then logs
in with Debian's Chromium (Playwright) and saves the dashboard, the job's page and the
configuration page.

    nice -n 10 python scripts/console_screenshots.py [--ct DIR --mr DIR] [--out docs]

By default the committed small MRI-DIR fixtures are sent; ``--ct``/``--mr`` take any series
(e.g. the full MRI-DIR pair from ../shared/data/mridir-phantom).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import ViewportSize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.states import JobState  # noqa: E402
from tests.peers.console import (  # noqa: E402
    chromium,
    http_section,
    login,
    set_password,
    wait_console,
)
from tests.peers.dcmtk_tools import storescu_folder  # noqa: E402
from tests.peers.node import (  # noqa: E402
    FAST_ORCHESTRATION,
    NODE_AET,
    IndexView,
    node_config,
    start_node,
    write_config,
)
from tests.peers.orthanc import Orthanc  # noqa: E402
from tests.support.data import SMALL_CT, SMALL_MR  # noqa: E402

VIEWPORT: ViewportSize = {"width": 1360, "height": 900}


def _orthanc(workdir: Path, aet: str) -> Orthanc:
    return Orthanc(workdir / aet.lower(), aet=aet).start()


def main() -> int:
    """Run the node, make a job, take the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=SMALL_CT)
    parser.add_argument("--mr", type=Path, default=SMALL_MR)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs, tps = _orthanc(work, "PACS"), _orthanc(work, "ECLIPSE")
        sections: dict[str, Any] = {
            **FAST_ORCHESTRATION,
            "node": {"allowed_calling_aets": ["CT_SIM", "MR_3T", "PACS"]},
            "destinations": {
                "PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port},
                "TPS": {
                    "ae_title": "ECLIPSE",
                    "host": "127.0.0.1",
                    "port": tps.dicom_port,
                    "send": ["fused", "reg"],
                },
            },
            "routing": {"send_to": ["PACS", "TPS"]},
            "http": http_section(),
        }
        cfg = node_config(work, **sections)
        set_password(write_config(work / "node.yaml", cfg))  # before the start, as an admin would
        node = start_node(work, cfg)
        try:
            url = wait_console(node)
            t0 = time.monotonic()
            storescu_folder(node.port, args.ct, calling="CT_SIM", called=NODE_AET)
            storescu_folder(node.port, args.mr, calling="MR_3T", called=NODE_AET)
            (job,) = IndexView(node).wait_jobs(1, (JobState.DONE,), timeout=900)
            print(f"job {job.id} done {time.monotonic() - t0:.0f} s after the first instance")
            _shoot(url, job.id, args.out)
        finally:
            print(node.log_tail(3000))
            node.stop()
            pacs.stop()
            tps.stop()
    return 0


def _shoot(url: str, job_id: int, out: Path) -> None:
    with chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        login(page, url)
        page.screenshot(path=str(out / "console_dashboard.png"), full_page=True)
        page.goto(f"{url}/jobs/{job_id}")
        page.wait_for_function("document.querySelector('img.preview')?.complete")
        page.screenshot(path=str(out / "console_job.png"), full_page=True)
        page.goto(f"{url}/config")
        page.screenshot(path=str(out / "console_config.png"), full_page=True)
    for name in ("dashboard", "job", "config"):
        print(out / f"console_{name}.png")


if __name__ == "__main__":
    raise SystemExit(main())
