"""Prefetch: find a waiting planning CT's MR in the PACS and retrieve it.

When a complete, eligible CT waits because no usable MR of its patient is stored (pairing's
"waiting" decision), :func:`request_for_waiting` records a pending :class:`Prefetch` for that CT
revision (once: a PACS without an MR ends in a visible ``not_found``, never a loop), and
:func:`run_due` works it off the scheduler's thread:

1. **query** the source (``prefetch.source``, a ``destinations`` entry) with Study Root C-FIND:
   studies with PatientID and IssuerOfPatientID of the CT, ModalitiesInStudy MR and StudyDate
   within ``pairing.max_days_between`` days of the CT; then the MR series of each study. Only
   studies whose returned PatientID and issuer equal the CT's are used (pairing's same-patient
   rule: another issuer's patient is never fetched);
2. **rank** the series with pairing's own rules (:func:`~.pairing.mr_eligibility`,
   :func:`~.pairing.choose_mr`: rule weight, closeness in time, more images), after leaving out
   the node's own derived series (ImageType DERIVED, the node's Manufacturer, a UID under a
   non-generic ``derive.uid_root``) and series already stored whole;
3. **retrieve** the best (up to ``prefetch.max_series``) by C-MOVE to the node's own AE title or
   by C-GET (``prefetch.method``), one :class:`Retrieval` row per series. A retrieval is
   complete only if the PACS answered Success with no failed or warning sub-operation *and*
   the index holds as many instances as the PACS reported; until then pairing holds the series
   (:mod:`.retrieval_hold`), so a partial MR is never fused;
4. the retrieved series completes like any received one (quiet period) and pairing proceeds
   as for a received MR. A failed attempt (PACS down, partial retrieval) is retried with
   ``jobs.retry_backoff_seconds`` backoff up to ``prefetch.max_attempts`` times.

Every query, candidate, choice, retrieval and outcome is a :class:`PrefetchEvent` with its
reason (shown by ``dicom-node jobs show`` and ``dicom-node prefetch``). Patient identifiers are
stored in the index but never logged at INFO.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.config import Destination, NodeConfig
from dicom_node.errors import QueryRetrieveError, UsageError
from dicom_node.models import Prefetch, PrefetchEvent, Retrieval, utcnow
from dicom_node.net import qr
from dicom_node.orchestration import pairing
from dicom_node.orchestration.jobs import backoff_seconds
from dicom_node.orchestration.prefetch_query import (
    Candidate,
    QueryOutcome,
    audit_query,
    describe,
    query_pacs,
    rank,
    reference_ct,
)
from dicom_node.orchestration.retrieval_hold import stored_count
from dicom_node.states import (
    RUNNING_PREFETCH_STATES,
    PairingOutcome,
    PrefetchEventKind,
    PrefetchMethod,
    PrefetchState,
    PrefetchTrigger,
    RetrievalState,
)
from dicom_node.storage.store import Store

log = logging.getLogger(__name__)

MR_STORAGE_SOP_CLASSES: tuple[str, ...] = (str(MRImageStorage), str(EnhancedMRImageStorage))
"""The storage SOP classes a C-GET accepts: MR only (no other modality is ever fetched)."""
STALE_TIMEOUTS = 3.0
"""A running prefetch without a heartbeat for this many network timeouts is taken back."""
HEARTBEAT_SECONDS = 5.0
"""Least time between two heartbeat writes while a retrieval reports progress."""


@dataclass(frozen=True)
class _Run:
    """One attempt of one prefetch."""

    prefetch_id: int
    attempt: int
    trigger: PrefetchTrigger
    ct_uid: str


# --------------------------------------------------------------------------- records
def _event(
    session: Session, run: _Run, kind: PrefetchEventKind, detail: str, series: str | None = None
) -> None:
    session.add(
        PrefetchEvent(
            prefetch_id=run.prefetch_id,
            attempt=run.attempt,
            kind=kind,
            series_uid=series,
            detail=detail,
            at=utcnow(),
        )
    )


def _finish(
    session: Session, run: _Run, state: PrefetchState, reason: str, *, retry_at: datetime | None
) -> None:
    """Record the outcome of an attempt: final, or ``retry`` at ``retry_at``."""
    row = session.get(Prefetch, run.prefetch_id)
    if row is None:
        return
    now = utcnow()
    row.state, row.reason, row.updated_at, row.not_before = state, reason, now, retry_at
    row.owner, row.heartbeat_at = None, None
    row.finished_at = None if state.is_open else now
    _event(session, run, PrefetchEventKind.OUTCOME, f"{state}: {reason}")
    log.info("prefetch %d for CT %s: %s: %s", run.prefetch_id, run.ct_uid, state, reason)


def _retry_or_fail(
    sessions: sessionmaker[Session], config: NodeConfig, run: _Run, reason: str
) -> PrefetchState:
    """A failed attempt: retry with backoff, or give up after ``prefetch.max_attempts``."""
    if run.trigger == PrefetchTrigger.MANUAL and not config.prefetch.enabled:
        state, retry_at = PrefetchState.FAILED, None
        reason += " (prefetch.enabled is false: not retried; run dicom-node prefetch again)"
    elif run.attempt >= config.prefetch.max_attempts:
        state, retry_at = PrefetchState.FAILED, None
        reason = f"gave up after {run.attempt} attempt(s): {reason}"
    else:
        jobs = config.jobs
        delay = backoff_seconds(run.attempt, jobs.retry_backoff_seconds, jobs.max_backoff_seconds)
        state, retry_at = PrefetchState.RETRY, utcnow() + timedelta(seconds=delay)
        reason = f"attempt {run.attempt} failed, next in {delay:g} s: {reason}"
    with sessions() as session:
        _finish(session, run, state, reason, retry_at=retry_at)
        session.commit()
    return state


# --------------------------------------------------------------------------- creation
def _create(
    session: Session,
    config: NodeConfig,
    ct: pairing.SeriesInfo,
    trigger: PrefetchTrigger,
    owner: str | None = None,
) -> Prefetch:
    """A new prefetch row: pending, or (with ``owner``) already claimed for its first attempt."""
    now = utcnow()
    row = Prefetch(
        ct_series_uid=ct.series_uid,
        ct_revision=ct.revision,
        patient_id=ct.patient_id,
        issuer_of_patient_id=ct.issuer,
        trigger=trigger,
        source=config.prefetch.source or "",
        method=config.prefetch.method,
        state=PrefetchState.QUERYING if owner else PrefetchState.PENDING,
        attempts=1 if owner else 0,
        reason="",
        owner=owner,
        heartbeat_at=now if owner else None,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def request_for_waiting(
    sessions: sessionmaker[Session], config: NodeConfig, only: Iterable[str] | None = None
) -> list[int]:
    """Record a pending prefetch for each waiting CT revision that has none yet.

    ``only`` limits the look to these CT series (the ones a scan just decided); None looks at
    every waiting CT (at start and after a reload). Nothing happens unless prefetch is enabled.
    """
    wanted = None if only is None else set(only)
    if not config.prefetch.enabled or wanted == set():
        return []
    created: list[int] = []
    with sessions() as session:
        for decision in pairing.waiting_cts(session):
            if wanted is not None and decision.ct_series_uid not in wanted:
                continue
            exists = session.scalar(
                select(Prefetch.id).where(
                    Prefetch.ct_series_uid == decision.ct_series_uid,
                    Prefetch.ct_revision == decision.ct_revision,
                )
            )
            ct = pairing.series_info(session, decision.ct_series_uid)
            if exists is not None or ct is None or ct.revision != decision.ct_revision:
                continue
            row = _create(session, config, ct, PrefetchTrigger.AUTO)
            created.append(row.id)
            log.info("prefetch %d requested for waiting CT %s", row.id, ct.series_uid)
        session.commit()
    return created


def default_owner(role: str) -> str:
    """``host:pid:role``: who runs a prefetch (shown while it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


# --------------------------------------------------------------------------- claiming
def _claim(session: Session, prefetch_id: int, owner: str, now: datetime) -> bool:
    """Take a due pending/retry prefetch for one attempt (atomic: one process wins)."""
    result = session.execute(
        update(Prefetch)
        .where(
            Prefetch.id == prefetch_id,
            Prefetch.state.in_([PrefetchState.PENDING, PrefetchState.RETRY]),
        )
        .values(
            state=PrefetchState.QUERYING,
            owner=owner,
            heartbeat_at=now,
            updated_at=now,
            attempts=Prefetch.attempts + 1,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def recover_stale(sessions: sessionmaker[Session], config: NodeConfig) -> list[int]:
    """Put running prefetches whose process stopped heartbeating back to ``retry``."""
    now = utcnow()
    limit = now - timedelta(seconds=STALE_TIMEOUTS * config.node.network_timeout_seconds)
    taken: list[int] = []
    with sessions() as session:
        rows = session.scalars(
            select(Prefetch).where(
                Prefetch.state.in_(list(RUNNING_PREFETCH_STATES)), Prefetch.heartbeat_at < limit
            )
        ).all()
        for row in rows:
            for retrieval in row.retrievals:
                if retrieval.state == RetrievalState.RETRIEVING:
                    retrieval.state, retrieval.finished_at = RetrievalState.FAILED, now
            row.reason = f"interrupted: no heartbeat from {row.owner} since {row.heartbeat_at}"
            row.state, row.owner, row.heartbeat_at = PrefetchState.RETRY, None, None
            row.not_before, row.updated_at = now, now
            taken.append(row.id)
            log.warning("prefetch %d: %s", row.id, row.reason)
        session.commit()
    return taken


def _why_not_run(
    session: Session, config: NodeConfig, row: Prefetch, ct: pairing.SeriesInfo | None
) -> tuple[PrefetchState, str] | None:
    """Why this prefetch ends before it queries (final state and reason), or None."""
    source = config.prefetch.source
    if source is None or source not in config.destinations:
        return PrefetchState.FAILED, "prefetch.source is not set to a destinations entry"
    if ct is None:
        return PrefetchState.FAILED, "the CT series is no longer in the index"
    if row.trigger == PrefetchTrigger.AUTO:
        latest = pairing.latest_decision(session, ct.series_uid)
        if latest is None or latest.outcome != PairingOutcome.WAITING:
            outcome = latest.outcome if latest is not None else "undecided"
            return PrefetchState.SKIPPED, f"the CT no longer waits for an MR (pairing {outcome})"
        if ct.revision != row.ct_revision:
            return PrefetchState.SKIPPED, f"the CT changed since (revision {ct.revision})"
    if ct.acquired_at is None:
        return PrefetchState.FAILED, "the CT has no date: the time window cannot be applied"
    return None


def _start(
    sessions: sessionmaker[Session], config: NodeConfig, prefetch_id: int
) -> tuple[_Run, pairing.SeriesInfo, Destination] | PrefetchState:
    """A claimed prefetch's run, CT and PACS; or the state it ended in at once."""
    with sessions() as session:
        row = session.get(Prefetch, prefetch_id)
        if row is None:
            raise UsageError(f"no prefetch {prefetch_id}")
        run = _Run(row.id, row.attempts, row.trigger, row.ct_series_uid)
        ct = pairing.series_info(session, row.ct_series_uid)
        row.source, row.method = config.prefetch.source or "", config.prefetch.method
        why_not = _why_not_run(session, config, row, ct)
        if why_not is not None:
            _finish(session, run, why_not[0], why_not[1], retry_at=None)
            session.commit()
            return why_not[0]
        session.commit()
    assert ct is not None and config.prefetch.source is not None  # see _why_not_run
    return run, ct, config.destinations[config.prefetch.source]


def _record_query(
    session: Session, config: NodeConfig, run: _Run, ct: pairing.SeriesInfo, found: QueryOutcome
) -> list[tuple[Candidate, str]]:
    """Rank the candidates and record the query, every candidate and the choice."""
    peer = config.prefetch.source
    text = (
        f"C-FIND (Study Root) at {peer}: MR studies of the CT's patient dated {found.window}: "
        f"{found.studies} study(ies), {len(found.candidates)} MR series"
    )
    if found.skipped:
        text += f"; left out: {'; '.join(found.skipped)}"
    _event(session, run, PrefetchEventKind.QUERY, text)
    chosen, rejected = rank(session, config, ct, found.candidates)
    picked = {c.info.series_uid for c, _ in chosen}
    for cand in found.candidates:
        uid = cand.info.series_uid
        verdict = "chosen" if uid in picked else f"rejected: {rejected.get(uid, 'ranked lower')}"
        _event(session, run, PrefetchEventKind.CANDIDATE, f"{describe(cand)}: {verdict}", uid)
    for cand, reason in chosen:
        _event(session, run, PrefetchEventKind.CHOICE, reason, cand.info.series_uid)
    return chosen


def _not_found_reason(found: QueryOutcome) -> str:
    """The "no MR found" outcome in words (the candidates' events say why each was left)."""
    if not found.candidates:
        return f"no MR series of this patient in the PACS dated {found.window}"
    return f"no usable MR among the PACS's {len(found.candidates)} MR series (see candidates)"


# --------------------------------------------------------------------------- retrieval
class _Heartbeat:
    """Progress callback of a retrieval: marks the prefetch alive (at most every few s)."""

    def __init__(self, sessions: sessionmaker[Session], prefetch_id: int) -> None:
        self.sessions = sessions
        self.prefetch_id = prefetch_id
        self.last = time.monotonic()

    def __call__(self, _result: qr.RetrieveResult) -> None:
        if time.monotonic() - self.last < HEARTBEAT_SECONDS:
            return
        self.last = time.monotonic()
        with self.sessions() as session:
            session.execute(
                update(Prefetch)
                .where(Prefetch.id == self.prefetch_id)
                .values(heartbeat_at=utcnow())
            )
            session.commit()


def _begin_retrieval(sessions: sessionmaker[Session], run: _Run, cand: Candidate) -> int:
    with sessions() as session:
        row = Retrieval(
            prefetch_id=run.prefetch_id,
            series_uid=cand.info.series_uid,
            study_uid=cand.info.study_uid,
            state=RetrievalState.RETRIEVING,
            expected=cand.expected,
            started_at=utcnow(),
        )
        session.add(row)
        session.execute(
            update(Prefetch)
            .where(Prefetch.id == run.prefetch_id)
            .values(state=PrefetchState.RETRIEVING, heartbeat_at=utcnow(), updated_at=utcnow())
        )
        session.commit()
        return row.id


def _call_retrieve(
    config: NodeConfig, peer: Destination, cand: Candidate, store: Store | None, beat: _Heartbeat
) -> qr.RetrieveResult:
    options = qr.QROptions(config.node.ae_title, config.node.network_timeout_seconds)
    study_uid, series_uid = cand.info.study_uid, cand.info.series_uid
    if config.prefetch.method == PrefetchMethod.MOVE:
        return qr.move_series(
            peer,
            study_uid=study_uid,
            series_uid=series_uid,
            destination_aet=config.node.ae_title,
            options=options,
            progress=beat,
        )
    if store is None:
        raise QueryRetrieveError("C-GET needs the node's store (run inside dicom-node serve)")
    result = qr.get_series(
        peer,
        study_uid=study_uid,
        series_uid=series_uid,
        store=store,
        sop_classes=MR_STORAGE_SOP_CLASSES,
        options=options,
        progress=beat,
    )
    audit.trail(config).instances_retrieved(
        source_aet=peer.ae_title,
        peer=f"{peer.host}:{peer.port}",
        destination_aet=config.node.ae_title,
        transfers=result.transfers,
    )
    return result


def _retrieve(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    run: _Run,
    peer: Destination,
    cand: Candidate,
    store: Store | None,
) -> tuple[bool, str]:
    """Retrieve one series and record it; (complete?, what happened in words)."""
    retrieval_id = _begin_retrieval(sessions, run, cand)
    how = (
        f"C-MOVE to {config.node.ae_title}"
        if config.prefetch.method == PrefetchMethod.MOVE
        else "C-GET"
    )
    result: qr.RetrieveResult | None = None
    try:
        result = _call_retrieve(config, peer, cand, store, _Heartbeat(sessions, run.prefetch_id))
        answer = result.describe()
    except QueryRetrieveError as exc:
        answer = f"failed: {exc}"
    uid = cand.info.series_uid
    with sessions() as session:
        row = session.get(Retrieval, retrieval_id)
        assert row is not None
        stored = stored_count(session, uid)
        if result is not None:
            row.expected = max(row.expected, result.total)
            row.completed, row.failed, row.warning = result.completed, result.failed, result.warning
        complete = result is not None and result.complete and stored >= max(row.expected, 1)
        row.state = (
            RetrievalState.COMPLETE
            if complete
            else (RetrievalState.PARTIAL if stored else RetrievalState.FAILED)
        )
        row.finished_at = utcnow()
        detail = (
            f"{how} of {describe(cand)}: {answer}; {stored} of {row.expected or '?'} "
            f"instances stored: {row.state}"
        )
        if stored == 0 and result is not None and config.prefetch.method == PrefetchMethod.MOVE:
            detail += (
                f" (is AE {config.node.ae_title} with this node's host and port "
                f"{config.node.port} a move destination in the PACS?)"
            )
        _event(session, run, PrefetchEventKind.RETRIEVE, detail, uid)
        session.commit()
    return complete, detail


def pair_retrieved(
    sessions: sessionmaker[Session], config: NodeConfig, since: datetime | None
) -> list[int]:
    """Pair the waiting CTs whose prefetch ended ``retrieved`` since ``since`` (all when None).

    Normally the retrieved MR completes after its retrieval was recorded complete and the
    completion scan pairs it; this covers the other order (the PACS paused longer than the quiet
    period before its final answer). The scheduler calls it in the scan's thread, so pairing
    never runs twice at once; :func:`~.pairing.pair_ct` is idempotent. Returns new job ids.
    """
    now = utcnow()
    made: list[int] = []
    with sessions() as session:
        query = select(Prefetch).where(Prefetch.state == PrefetchState.RETRIEVED)
        if since is not None:
            query = query.where(Prefetch.finished_at >= since)
        for row in session.scalars(query).all():
            latest = pairing.latest_decision(session, row.ct_series_uid)
            ct = pairing.series_info(session, row.ct_series_uid)
            if latest is None or latest.outcome != PairingOutcome.WAITING or ct is None:
                continue
            decision = pairing.pair_ct(session, config, ct, now)
            if decision.job_id is not None and decision.outcome == PairingOutcome.PAIRED:
                made.append(decision.job_id)
        session.commit()
    return made


# --------------------------------------------------------------------------- running
def run_attempt(
    sessions: sessionmaker[Session], config: NodeConfig, prefetch_id: int, store: Store | None
) -> PrefetchState:
    """Run one claimed attempt of a prefetch: query, rank, retrieve, record; its new state."""
    started = _start(sessions, config, prefetch_id)
    if isinstance(started, PrefetchState):
        return started
    run, ct, peer = started
    try:
        return _query_and_retrieve(sessions, config, run, ct, peer, store)
    except Exception as exc:  # never leave it "running": retry it (and log why)
        log.exception("prefetch %d: unexpected error", run.prefetch_id)
        return _retry_or_fail(sessions, config, run, f"unexpected error: {type(exc).__name__}")


def _query_and_retrieve(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    run: _Run,
    ct: pairing.SeriesInfo,
    peer: Destination,
    store: Store | None,
) -> PrefetchState:
    options = qr.QROptions(config.node.ae_title, config.node.network_timeout_seconds)
    try:
        found = query_pacs(peer, options, ct, float(config.pairing.max_days_between))
    except QueryRetrieveError as exc:
        audit_query(config, peer, ct, ok=False, text=f"query failed: {exc}")
        return _retry_or_fail(sessions, config, run, f"query failed: {exc}")
    found_text = f"{found.studies} MR studies, {len(found.candidates)} series found"
    audit_query(config, peer, ct, ok=True, text=found_text)
    with sessions() as session:
        chosen = _record_query(session, config, run, ct, found)
        if not chosen:
            _finish(session, run, PrefetchState.NOT_FOUND, _not_found_reason(found), retry_at=None)
            session.commit()
            return PrefetchState.NOT_FOUND
        session.commit()
    problems = []
    for cand, _reason in chosen:
        complete, detail = _retrieve(sessions, config, run, peer, cand, store)
        if not complete:
            problems.append(detail)
    if problems:
        return _retry_or_fail(sessions, config, run, "; ".join(problems))
    uids = [cand.info.series_uid for cand, _ in chosen]
    with sessions() as session:
        reason = (
            f"retrieved {len(uids)} series ({', '.join(uids)}); pairing proceeds as for a "
            "received MR once it is complete"
        )
        _finish(session, run, PrefetchState.RETRIEVED, reason, retry_at=None)
        session.commit()
    return PrefetchState.RETRIEVED


def run_due(
    sessions: sessionmaker[Session], config: NodeConfig, store: Store | None, owner: str
) -> list[int]:
    """Run every due pending/retry prefetch once (the scheduler's task); their ids."""
    if not config.prefetch.enabled:
        return []
    recover_stale(sessions, config)
    ran: list[int] = []
    while True:
        now = utcnow()
        with sessions() as session:
            due = session.scalar(
                select(Prefetch.id)
                .where(
                    Prefetch.state.in_([PrefetchState.PENDING, PrefetchState.RETRY]),
                    or_(Prefetch.not_before.is_(None), Prefetch.not_before <= now),
                    Prefetch.id.not_in(ran),
                )
                .order_by(Prefetch.id)
                .limit(1)
            )
            claimed = due is not None and _claim(session, due, owner, now)
            session.commit()
        if due is None:
            return ran
        ran.append(due)
        if claimed:
            run_attempt(sessions, config, due, store)


# --------------------------------------------------------------------------- manual
def run_manual(
    sessions: sessionmaker[Session],
    config: NodeConfig,
    store: Store | None,
    patient_id: str,
    issuer: str | None = None,
) -> int:
    """``dicom-node prefetch PATIENT_ID``: the same query and retrieve for the patient's newest
    eligible CT, run now in this process; returns the prefetch id (its events say the rest)."""
    if config.prefetch.source is None:
        raise UsageError("prefetch.source is not set: name the PACS (a destinations entry)")
    with sessions() as session:
        ct = reference_ct(session, config, patient_id, issuer)
        row = _create(session, config, ct, PrefetchTrigger.MANUAL, owner=default_owner("cli"))
        prefetch_id = row.id
        session.commit()
    run_attempt(sessions, config, prefetch_id, store)
    return prefetch_id
