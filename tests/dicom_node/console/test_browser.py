"""The console in Debian's Chromium against a real ``dicom-node serve`` (one browser session).

What the README's "Adding an AE title, destinations, routing" section asks, from the browser:
log in; allow a new calling AE (a real DCMTK storescu from it is refused before, accepted
after); add a destination, first with an invalid port (the error shows next to the field and
nothing is saved), then right; route to it; echo it; and see the job that the new AE's images
made: its preview picture and its send to the new destination (a real Orthanc).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from dicom_node.states import JobState, SendState
from tests.peers.console import chromium, http_section, login, set_password, wait_console
from tests.peers.node import FAST_ORCHESTRATION, IndexView, NodeProcess
from tests.peers.orthanc import Orthanc
from tests.support.data import SMALL_CT, SMALL_MR, fixture_files, require_small_fixtures

pytestmark = [pytest.mark.peers, pytest.mark.slow, pytest.mark.timeout(400)]

pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
from playwright.sync_api import Page, expect  # noqa: E402


def _allow_calling_ae(page: Page, url: str, aet: str) -> None:
    page.goto(url + "/config")
    page.click("#node >> text=edit")
    page.locator('[data-field="allowed_calling_aets"] input[placeholder="add one"]').fill(aet)
    page.click("button:text('Save')")
    expect(page.locator(".flash.ok")).to_contain_text("Saved and applied")
    expect(page.locator("#allowed-aets")).to_contain_text(aet)


def _add_destination(page: Page, url: str, name: str, peer: Orthanc, node: NodeProcess) -> None:
    page.goto(url + "/config")
    page.click("text=add a destination")
    page.fill("#f-name", name)
    page.fill("#f-ae_title", peer.aet)
    page.fill("#f-host", "127.0.0.1")
    page.fill("#f-port", "70000")
    before = node.config_path.read_text()
    page.click("button:text('Save')")
    error = page.locator('[data-field="port"] .error')
    expect(error).to_have_text("Input should be less than or equal to 65535")
    expect(page.locator('[data-field="host"] .error')).to_have_count(0)
    assert node.config_path.read_text() == before  # nothing saved
    page.fill("#f-port", str(peer.dicom_port))
    page.click("button:text('Save')")
    expect(page.locator(f'tr[data-destination="{name}"]')).to_be_visible()
    page.check(f'#routing input[value="{name}"]')
    page.click("text=Save routing")
    expect(page.locator(".flash.ok")).to_contain_text("routing.send_to")
    page.click(f'tr[data-destination="{name}"] button.echo')
    expect(page.locator(".flash.ok")).to_contain_text(f"{name}: C-ECHO FUSIONNODE -> ")


def _check_job_page(page: Page, url: str, job_id: int, dest: str) -> None:
    page.goto(f"{url}/jobs/{job_id}")
    expect(page.locator("h1")).to_contain_text(f"Job {job_id}")
    expect(page.locator("h1 .badge")).to_have_text("done")
    preview = page.locator("img.preview")
    expect(preview).to_be_visible()
    width = preview.evaluate("img => img.complete ? img.naturalWidth : 0")
    assert width > 500  # the real 4 x 3 preview, not a broken image
    expect(page.locator("#sends")).to_contain_text(dest)
    expect(page.locator("#sends .badge")).to_have_text("done")
    expect(page.locator("#quality")).to_contain_text("Head mask overlap (Dice)")
    page.goto(url + "/")
    expect(page.locator(f'a[href="/jobs/{job_id}"]').first).to_be_visible()


def test_admin_adds_calling_ae_and_destination_from_the_browser(
    node_factory: Callable[..., NodeProcess], orthanc_factory: Callable[..., Orthanc]
) -> None:
    require_small_fixtures()
    pacs = orthanc_factory(aet="PACS")
    node = node_factory(
        **FAST_ORCHESTRATION, node={"allowed_calling_aets": ["CT_SIM"]}, http=http_section()
    )
    set_password(node.config_path)
    url = wait_console(node)
    ct_files = fixture_files(SMALL_CT)
    refused = node.storescu(ct_files[0], calling="NEWCT")
    assert refused.returncode != 0, "NEWCT must be refused before the admin allows it"

    with chromium() as browser:
        page = browser.new_page()
        response = page.goto(url + "/jobs")
        assert response is not None and response.status == 401  # the login form
        login(page, url)
        _allow_calling_ae(page, url, "NEWCT")
        _add_destination(page, url, "PACS", pacs, node)
        saved = yaml.safe_load(node.config_path.read_text())
        assert saved["node"]["allowed_calling_aets"] == ["CT_SIM", "NEWCT"]
        assert saved["routing"] == {"send_to": ["PACS"]}

        for folder in (SMALL_CT, SMALL_MR):
            sent = node.storescu(folder, calling="NEWCT", extra=("+sd", "+r"))
            assert sent.returncode == 0, sent.stdout + sent.stderr
        index = IndexView(node)
        try:
            (job,) = index.wait_jobs(1, (JobState.DONE,))
        finally:
            index.close()
        assert [(s.destination, s.state) for s in job.sends] == [("PACS", SendState.DONE)]
        _check_job_page(page, url, job.id, "PACS")
    assert len(pacs.datasets_by_sop_uid()) == 2 * len(ct_files) + 1  # fused, registered MR, REG
