"""A real Orthanc server for tests: temporary config, free ports, REST helpers.

``Orthanc(workdir).start()`` runs ``/usr/sbin/Orthanc`` (Debian ``orthanc``) with a JSON config
written under ``workdir``: REST on a free loopback port (``RemoteAccessAllowed`` false, no
authentication, no plugins), DICOM on a free port with AE title ``ORTHANC`` that accepts echo and
store from any calling AE, storage and index in ``workdir``. Orthanc's own log goes to
``workdir/orthanc.log`` (see :meth:`Orthanc.log_tail`). ``stop()`` ends it (``graceful=False``:
SIGKILL, for teardown); ``start()`` again brings it back on the same ports with the same storage
(for destination-down tests), as does ``restart()``.

Orthanc 1.10 has no bind-address option: its DICOM port listens on all interfaces (the REST API
refuses remote clients). Orthanc's DICOM layer is DCMTK, so it runs with ``TCP_NODELAY=1``.

As a query/retrieve source (prefetch tests): ``Orthanc(workdir, modalities={"NODE": peer})``
lists ``peer`` in ``DicomModalities`` with every DIMSE service allowed (C-FIND, C-MOVE, C-GET,
C-STORE, C-ECHO), so Orthanc answers the node's queries and accepts it as a C-MOVE destination;
:meth:`Orthanc.upload` loads files through the REST API (``POST /instances``).

The REST helpers use only ``urllib``. Use :attr:`Orthanc.destination` wherever a destination
(``ae_title``, ``host``, ``port``) is expected.

DICOM TLS: ``Orthanc(workdir, tls=OrthancTls(...))`` turns its DICOM port into a TLS port
(``DicomTlsEnabled``; Orthanc >= 1.9 uses DCMTK's TLS layer) with the given certificate, key
and trusted CA certificates, and by default requires a client certificate
(``DicomTlsRemoteCertificateRequired``). :func:`tls_modality` describes a peer that Orthanc
itself calls over TLS (``UseDicomTls`` in ``DicomModalities``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.peers import free_port, port_open

ORTHANC_BIN = os.environ.get("ORTHANC_BIN") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"

UNCOMPRESSED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
)


@dataclass(frozen=True)
class Peer:
    """A DICOM peer as the SCU sees it (same fields as the config's Destination)."""

    ae_title: str
    host: str
    port: int


def require_orthanc() -> str:
    """Path of the Orthanc binary, or skip the test (apt-get install orthanc)."""
    if not Path(ORTHANC_BIN).exists():
        pytest.skip(f"Orthanc not installed at {ORTHANC_BIN} (apt-get install orthanc)")
    return ORTHANC_BIN


@dataclass(frozen=True)
class OrthancTls:
    """DICOM TLS settings of a test Orthanc (PEM files)."""

    certificate: Path
    private_key: Path
    trusted_certificates: Path
    remote_certificate_required: bool = True

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration entries."""
        return {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.certificate),
            "DicomTlsPrivateKey": str(self.private_key),
            "DicomTlsTrustedCertificates": str(self.trusted_certificates),
            "DicomTlsRemoteCertificateRequired": self.remote_certificate_required,
        }


def tls_modality(ae_title: str, host: str, port: int) -> dict[str, Any]:
    """A ``DicomModalities`` entry that Orthanc calls over DICOM TLS (with its own
    certificate, so it suits a peer that requires client certificates)."""
    return {"AET": ae_title, "Host": host, "Port": port, "UseDicomTls": True}


def _modalities_config(modalities: Mapping[str, Peer]) -> dict[str, Any]:
    """``DicomModalities`` entries with every DIMSE service allowed (C-GET included)."""
    return {
        name: {
            "AET": peer.ae_title,
            "Host": peer.host,
            "Port": peer.port,
            "AllowEcho": True,
            "AllowFind": True,
            "AllowGet": True,
            "AllowMove": True,
            "AllowStore": True,
        }
        for name, peer in modalities.items()
    }


class OrthancError(RuntimeError):
    """Orthanc did not start, died, or a REST call failed."""


class Orthanc:
    """One Orthanc process with a temporary configuration (see module docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        http_port: int | None = None,
        dicom_port: int | None = None,
        config: Mapping[str, Any] | None = None,
        lua: str | None = None,
        tls: OrthancTls | None = None,
        modalities: Mapping[str, Peer] | None = None,
    ) -> None:
        """Prepare (not start) an Orthanc in ``workdir``.

        ``config`` entries override the defaults (e.g. ``AcceptedTransferSyntaxes``);
        ``lua`` is the text of a Lua script loaded at start (e.g. a ``ReceivedInstanceFilter``);
        ``modalities`` are the DICOM peers Orthanc knows (``DicomModalities``; every service
        allowed: they may query, retrieve with C-GET and be C-MOVE destinations).
        """
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self._pinned_ports = http_port is not None or dicom_port is not None
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.extra_config = {**(tls.config() if tls else {}), **(config or {})}
        self.tls = tls
        self.lua = lua
        self.modalities = dict(modalities or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> Peer:
        """This Orthanc as a DICOM destination."""
        return Peer(ae_title=self.aet, host="127.0.0.1", port=self.dicom_port)

    @property
    def running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        cfg: dict[str, Any] = {
            "Name": f"test-orthanc-{self.dicom_port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 10,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": _modalities_config(self.modalities),
            "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": False,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StableAge": 3600,
            "OverwriteInstances": False,
            "LuaScripts": [],
        }
        if self.lua is not None:
            script = self.workdir / "filter.lua"
            script.write_text(self.lua)
            cfg["LuaScripts"] = [str(script)]
        cfg.update(self.extra_config)
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def start(self, timeout: float = 60.0) -> Orthanc:
        """Start Orthanc and wait until ``/system`` answers; returns ``self``."""
        require_orthanc()
        if self.running:
            return self
        for attempt in range(3):
            self._write_config()
            log = self.log_path.open("ab")
            try:
                self._proc = subprocess.Popen(
                    [ORTHANC_BIN, str(self.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    # Orthanc's DICOM layer is DCMTK: without this it stalls ~40 ms per C-STORE.
                    env={**os.environ, "TCP_NODELAY": "1"},
                    start_new_session=True,
                )
            finally:
                log.close()
            try:
                self._wait_ready(timeout)
                return self
            except OrthancError:
                self.stop(graceful=False)
                in_use = "address already in use" in self.log_tail(4000).lower()
                if self._pinned_ports or not in_use or attempt == 2:
                    raise
                # A free port was taken between free_port() and Orthanc's bind: pick new ones.
                self.http_port, self.dicom_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                rc = None if self._proc is None else self._proc.returncode
                raise OrthancError(f"Orthanc exited with {rc} at start:\n{self.log_tail()}")
            try:
                if self.get_json("/system").get("DicomAet") and port_open(self.dicom_port):
                    return
            except (OSError, OrthancError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise OrthancError(f"Orthanc not ready after {timeout:.0f}s ({last!r}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0, *, graceful: bool = True) -> None:
        """Stop Orthanc; storage is kept.

        ``graceful``: SIGTERM and wait (a few seconds; SIGKILL after ``timeout``), so a later
        :meth:`start` finds a clean index. Otherwise SIGKILL at once (test teardown).
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not graceful:
            proc.kill()
            proc.wait(timeout)
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self, timeout: float = 60.0) -> Orthanc:
        """Stop and start again on the same ports and storage."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of Orthanc's console log (for failure messages)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST
    def _request(
        self, method: str, path: str, body: bytes | None = None, accept: str | None = None
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if accept:
            req.add_header("Accept", accept)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                data: bytes = rsp.read()
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc

    def get_bytes(self, path: str, accept: str | None = None) -> bytes:
        """GET ``path`` (e.g. ``/instances/<id>/file``) and return the body."""
        return self._request("GET", path, accept=accept)

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode the JSON body."""
        return json.loads(self._request("GET", path))

    def post_json(self, path: str, body: Any) -> Any:
        """POST a JSON body to ``path`` and decode the JSON answer."""
        return json.loads(self._request("POST", path, json.dumps(body).encode()))

    def post_bytes(self, path: str, body: bytes) -> Any:
        """POST raw bytes (e.g. a DICOM file to ``/instances``) and decode the JSON answer."""
        return json.loads(self._request("POST", path, body))

    def delete(self, path: str) -> None:
        """DELETE a resource (e.g. ``/instances/<id>``)."""
        self._request("DELETE", path)

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return list(self.get_json("/instances"))

    def series(self) -> list[str]:
        """Orthanc ids of all stored series."""
        return list(self.get_json("/series"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``/instances/<id>/simplified-tags`` (keyword -> value)."""
        return dict(self.get_json(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of an instance, as Orthanc keeps it."""
        return self.get_bytes(f"/instances/{orthanc_id}/file")

    def instance_dataset(self, orthanc_id: str) -> pydicom.Dataset:
        """The stored DICOM file of an instance, parsed with pydicom."""
        return pydicom.dcmread(io.BytesIO(self.instance_file(orthanc_id)))

    def raw_frame(self, orthanc_id: str, frame: int = 0) -> bytes:
        """``/instances/<id>/frames/<n>/raw``: the frame's bytes as stored (maybe compressed)."""
        return self.get_bytes(f"/instances/{orthanc_id}/frames/{frame}/raw")

    def find(self, level: str, query: Mapping[str, str], expand: bool = False) -> list[Any]:
        """``/tools/find`` at ``level`` (Patient/Study/Series/Instance) with a tag query."""
        body = {"Level": level, "Query": dict(query), "Expand": expand}
        return list(self.post_json("/tools/find", body))

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOPInstanceUID, or None."""
        found = self.find("Instance", {"SOPInstanceUID": sop_instance_uid})
        return str(found[0]) if found else None

    def datasets_by_sop_uid(self) -> dict[str, pydicom.Dataset]:
        """Every stored instance parsed with pydicom, keyed by SOPInstanceUID."""
        out: dict[str, pydicom.Dataset] = {}
        for oid in self.instances():
            ds = self.instance_dataset(oid)
            out[str(ds.SOPInstanceUID)] = ds
        return out

    def sop_instance_uids(self) -> set[str]:
        """SOPInstanceUIDs of all stored instances."""
        uids = set()
        for item in self.get_json("/instances?expand"):
            uids.add(str(item["MainDicomTags"]["SOPInstanceUID"]))
        return uids

    def upload(self, *files: Path) -> list[str]:
        """Load DICOM files through the REST API (``POST /instances``); their Orthanc ids."""
        ids = []
        for path in files:
            req = urllib.request.Request(
                self.url + "/instances", data=Path(path).read_bytes(), method="POST"
            )
            req.add_header("Content-Type", "application/dicom")
            try:
                with urllib.request.urlopen(req, timeout=30) as rsp:
                    answer = json.loads(rsp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode(errors="replace")
                raise OrthancError(f"upload {path} -> HTTP {exc.code}: {detail}") from exc
            ids.append(str(answer["ID"]))
        return ids

    def upload_folder(self, folder: Path) -> list[str]:
        """Load every ``*.dcm`` file of ``folder`` (sorted) through the REST API."""
        return self.upload(*sorted(Path(folder).glob("*.dcm")))

    def statistics(self) -> dict[str, Any]:
        """``/statistics`` (counts and sizes)."""
        return dict(self.get_json("/statistics"))
