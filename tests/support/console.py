"""The admin console on an indexed node, in process (FastAPI's TestClient), for API and page tests.

The config file, index and store are real (a temporary folder, SQLite); the config watcher is
the node's own, so a save is applied exactly as ``dicom-node serve`` applies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from dicom_node.config_watcher import ConfigWatcher
from dicom_node.console.app import create_app
from dicom_node.console.auth import LoginLimiter, PasswordStore
from dicom_node.console.configedit import ConfigFile
from dicom_node.console.context import ConsoleContext
from dicom_node.models import Job, JobStage, Send, utcnow
from dicom_node.states import JobState, SendState
from dicom_node.storage.derived import PREVIEW, job_dir, write_manifest
from dicom_node.storage.fsutil import make_dirs
from tests.support.indexed import IndexedNode, make_indexed_node
from tests.support.jobs import make_jobs

PASSWORD = "in-process-console-pw"
AUTH = ("admin", PASSWORD)


@dataclass
class Console:
    """A console app on an indexed node, and a client for it."""

    node: IndexedNode
    ctx: ConsoleContext
    client: TestClient
    watcher: ConfigWatcher

    @property
    def config_path(self) -> Path:
        """The YAML file the console edits."""
        return self.ctx.config_file.path

    def login(self, password: str = PASSWORD) -> Any:
        """Log in through the form (the client keeps the session cookie); the response."""
        page = self.client.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert token is not None, page.text
        return self.client.post(
            "/login",
            data={"username": "admin", "password": password, "login_token": token.group(1)},
            follow_redirects=False,
        )

    def form_tokens(self, path: str) -> dict[str, str]:
        """The CSRF token and file version of the form on page ``path``."""
        page = self.client.get(path)
        assert page.status_code == 200, page.text
        return hidden_fields(page.text)

    def close(self) -> None:
        """Release the client and the node."""
        self.client.close()
        self.node.close()


def hidden_fields(html: str) -> dict[str, str]:
    """The first value of every hidden input of a page, by name."""
    found: dict[str, str] = {}
    for name, value in re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', html):
        found.setdefault(name, value)
    return found


def make_console(
    root: Path,
    *,
    password: str | None = PASSWORD,
    worker_alive: bool | None = True,
    limiter: LoginLimiter | None = None,
    **sections: Any,
) -> Console:
    """A console on a fresh indexed node under ``root`` (``sections`` merged into its config)."""
    node = make_indexed_node(root, **sections)
    path = root / "node.yaml"
    watcher = ConfigWatcher(path, node.config)
    passwords = PasswordStore(node.config.password_file)
    if password is not None:
        passwords.set_password("admin", password)
    ctx = ConsoleContext(
        config_file=ConfigFile(path, watcher, started=node.config),
        sessions=node.sessions,
        passwords=passwords,
        worker_alive=lambda: worker_alive,
        limiter=limiter or LoginLimiter(),
    )
    client = TestClient(create_app(ctx), base_url="http://testserver")
    return Console(node, ctx, client, watcher)


def make_finished_job(
    node: IndexedNode,
    *,
    state: JobState = JobState.DONE,
    error: str | None = None,
    with_outputs: bool = True,
) -> int:
    """A job as a worker leaves it: stages, two sends, manifest (quality, warnings), preview."""
    (job_id,) = make_jobs(node, 1)
    t0 = utcnow() - timedelta(minutes=5)
    with node.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.error, job.attempts = state, error, 1
        job.pairing_reason = "chose MR series 2.0 ('T2', 47 images), acquired 3 days before the CT"
        job.finished_at = job.updated_at = t0 + timedelta(seconds=40)
        for i, (stage, secs) in enumerate(STAGE_SECONDS.items()):
            start = t0 + timedelta(seconds=10 * i)
            s.add(
                JobStage(
                    job_id=job_id,
                    attempt=1,
                    stage=stage,
                    started_at=start,
                    finished_at=start + timedelta(seconds=secs),
                    seconds=secs,
                )
            )
        for dest, send_state in (("PACS", SendState.DONE), ("TPS", SendState.FAILED)):
            s.add(
                Send(
                    job_id=job_id,
                    destination=dest,
                    kinds="fused,reg",
                    state=send_state,
                    attempts=1 if send_state == SendState.DONE else 10,
                    total=70,
                    acked=70 if send_state == SendState.DONE else 3,
                    last_error=None if send_state == SendState.DONE else "association rejected",
                    updated_at=t0 + timedelta(seconds=40),
                )
            )
        s.commit()
    if with_outputs:
        folder = job_dir(node.config, job_id)
        make_dirs(folder)
        write_manifest(
            folder,
            [],
            {"quality": QUALITY, "warnings": [WARNING], "stage_seconds": {"register": 7.1}},
        )
        Image.new("RGB", (40, 30), "gray").save(folder / PREVIEW)
    return job_id


STAGE_SECONDS = {
    JobState.REGISTERING: 7.0,
    JobState.FUSING: 4.5,
    JobState.WRITING: 3.0,
    JobState.SENDING: 1.5,
}
QUALITY = {"metric_value": -0.356, "mask_dice": 0.941, "angle_from_header_deg": 178.0}
WARNING = "MR turned 178 degrees against the headers: verify the fusion before use"
