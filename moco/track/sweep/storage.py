"""Where a sweep's study lives, and the few operations every worker does on it under one lock.

Storage: Optuna's ``JournalStorage(JournalFileBackend(OUT/study.journal))`` by default (Optuna's
recommended storage for several processes on one machine: an append-only log file, no server),
``journal:PATH`` for another journal file, ``sqlite:///file.db``, or ``postgresql://user@host:port/db``
(``RDBStorage``) for many machines (without a driver in the URL, the installed one is named:
``postgresql+psycopg2://`` with psycopg2; files record that URL, any password masked).

The lock (:class:`StudyLock`) serialises the short bookkeeping steps of every process on the study:
enqueueing the grid, finding interrupted trials, claiming the next trial. A journal or SQLite study
uses ``fcntl.flock`` on a file beside it; a PostgreSQL study uses a session advisory lock
(``pg_advisory_lock``). Both are released by the operating system or the server when a process dies,
so a SIGKILL never leaves the lock held.

Interrupted trials. A process killed during a trial leaves it RUNNING forever. Optuna's own remedy (a
heartbeat and ``fail_stale_trials``) exists only for ``RDBStorage`` and only inside ``study.optimize``; the
journal storage has none. So every claimed trial records its worker (host, pid, the process's start
time, the boot id) and a heartbeat (every :data:`HEARTBEAT_S` seconds). A RUNNING trial is
interrupted when its worker on this host is gone (checked at once, exactly: no timeout to wait for),
when this host has rebooted since, or, for a worker on another host, when its heartbeat is older than
``stale_after`` seconds. Under the lock it is marked FAIL with ``error`` in its user attributes and
re-queued once through Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`
(``max_retry=1``): same parameters, ``failed_trial`` pointing at the original.

Grid sweeps enqueue their points themselves (one WAITING trial per point, never twice): Optuna's
``GridSampler`` evaluates points twice when several processes share a study (measured: 3 processes on an
8-point grid ran 10 trials, the last point 3 times), and it would count an interrupted point as visited.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from moco.errors import MocoError

__all__ = [
    "HEARTBEAT_S", "STALE_AFTER_S", "StorageSpec", "StudyLock", "claim_trial", "count_trials", "enqueue_grid",
    "mark_interrupted", "open_study", "parse_storage", "process_identity", "recover_interrupted", "start_heartbeat",
]

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
WORKER_ATTR = "moco.worker"
HEARTBEAT_ATTR = "moco.heartbeat"
POINT_ATTR = "moco.point"
INTERRUPTED_ATTR = "moco.interrupted"
RETRIED_ATTR = "moco.retried"


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage``: ``kind`` (``"journal"``, ``"sqlite"``, ``"postgresql"``), the ``url`` given,
    ``path`` (journal/SQLite file) and ``display`` (the URL with any password masked: what files record)."""

    kind: str
    url: str
    path: str | None
    display: str

    def open(self):
        """The Optuna storage object (connects: a PostgreSQL server that does not answer is a MocoError)."""
        import optuna

        if self.kind == "journal":
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(self.path))
        try:
            return optuna.storages.RDBStorage(self.url, engine_kwargs={"pool_pre_ping": True}
                                              if self.kind == "postgresql" else None)
        except ImportError as exc:
            raise MocoError(f"--storage {self.display}: the database driver is missing ({exc}); "
                            "pip install psycopg2-binary") from None
        except Exception as exc:  # sqlalchemy.exc.OperationalError and friends: one clear line
            first = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
            raise MocoError(f"--storage {self.display}: cannot open the study database ({first}); is the server "
                            "running and the URL right (postgresql://user@host:port/dbname)?") from None

    def lock_path(self) -> Path | None:
        return Path(self.path + ".moco-lock") if self.path else None


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def parse_storage(url: str | None, out: str | Path) -> StorageSpec:
    """``--storage`` (None: ``OUT/study.journal``) -> :class:`StorageSpec`; a URL moco cannot use is a MocoError."""
    if url is None:
        path = str((Path(out) / "study.journal").resolve())
        return StorageSpec("journal", f"journal:{path}", path, f"journal:{path}")
    if not isinstance(url, str) or not url.strip():
        raise MocoError("--storage must be a URL like postgresql://user@host:5432/db, sqlite:///study.db or journal:FILE")
    url = url.strip()
    fix = ("give postgresql://user@host:port/dbname (many machines), sqlite:///path/study.db or journal:PATH "
           "(a journal file; the default is OUT/study.journal)")
    if url.startswith("journal:"):
        path = url[len("journal:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise MocoError(f"--storage {url!r}: no file after 'journal:'; {fix}")
        full = str(Path(path).expanduser().resolve())
        if Path(full).is_dir():
            raise MocoError(f"--storage {url!r} is a folder; a journal storage is a file")
        return StorageSpec("journal", f"journal:{full}", full, f"journal:{full}")
    scheme = urlsplit(url).scheme.lower()
    base = scheme.split("+", 1)[0]
    if base == "sqlite":
        if not url.startswith(f"{scheme}:///") or len(url) <= len(f"{scheme}:///"):
            raise MocoError(f"--storage {url!r}: an SQLite URL is sqlite:///relative.db or sqlite:////absolute.db")
        path = url[len(f"{scheme}:///"):]
        full = str(Path(path).expanduser().resolve())
        return StorageSpec("sqlite", f"sqlite:///{full}", full, f"sqlite:///{full}")
    if base in ("postgresql", "postgres"):
        if base == "postgres":
            url = "postgresql" + url[len("postgres"):]
            scheme = "postgresql" + scheme[len("postgres"):]
        if scheme == "postgresql":  # no driver named: the one installed (SQLAlchemy 2 defaults to psycopg 3)
            url = f"postgresql+{_pg_driver()}" + url[len("postgresql"):]
        parts = urlsplit(url)
        if not parts.path.strip("/") and "host=" not in (parts.query or ""):
            raise MocoError(f"--storage {_mask(url)!r}: no database name; write postgresql://user@host:port/dbname")
        try:
            parts.port
        except ValueError:
            raise MocoError(f"--storage {_mask(url)!r}: the port is not a number; {fix}") from None
        return StorageSpec("postgresql", url, None, _mask(url))
    if not scheme:
        raise MocoError(f"--storage {url!r} is not a URL; {fix}")
    raise MocoError(f"--storage {_mask(url)!r}: unsupported scheme {scheme!r}; {fix}")


def _pg_driver() -> str:
    import importlib.util

    for name in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "psycopg2"  # opening says which package to install


# -------------------------------------------------------------------------------------------- lock

class StudyLock:
    """An exclusive lock over one study shared by every process on it (see the module docstring).

    Re-entrant within a process; ``with lock:`` holds it.
    """

    def __init__(self, spec: StorageSpec, storage: Any, study_name: str):
        self.spec, self.storage, self.study_name = spec, storage, study_name
        self._depth = 0
        self._fd: int | None = None
        self._conn = None
        self._key = int.from_bytes(hashlib.sha1(f"moco.sweep:{study_name}".encode()).digest()[:8], "big", signed=True)

    def __enter__(self) -> "StudyLock":
        if self._depth == 0:
            if self.spec.kind == "postgresql":
                from sqlalchemy import text

                self._conn = self.storage.engine.connect()
                self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            else:
                path = self.spec.lock_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        if self._conn is not None:
            from sqlalchemy import text

            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


# ---------------------------------------------------------------------------------------- the study

def open_study(spec: StorageSpec, study_name: str, directions, *, digest: str, create: bool = True,
               storage: Any = None):
    """Create or load study ``study_name`` (under the lock); a study made by another sweep file is refused.

    Returns ``(study, storage, lock)``.
    """
    import optuna

    storage = storage if storage is not None else spec.open()
    lock = StudyLock(spec, storage, study_name)
    with lock:
        names = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        if study_name in names:
            study = optuna.load_study(study_name=study_name, storage=storage)
            found = study.user_attrs.get("moco.digest")
            if found != digest:
                raise MocoError(f"study {study_name!r} in {spec.display} was made by another sweep file or settings "
                                f"(digest {found} != {digest}); give another --study or --out, or the same file and "
                                "flags as before")
            if [d.name.lower() for d in study.directions] != [d.lower() for d in directions]:
                raise MocoError(f"study {study_name!r} optimises {[d.name.lower() for d in study.directions]}, the "
                                f"sweep file {list(directions)}; give another --study")
        elif not create:
            raise MocoError(f"no study {study_name!r} in {spec.display}; studies there: "
                            f"{', '.join(sorted(names)) or 'none'}")
        else:
            study = optuna.create_study(study_name=study_name, storage=storage, directions=list(directions))
            study.set_user_attr("moco.digest", digest)
    return study, storage, lock


def enqueue_grid(study, points: list[dict[str, Any]], distributions: dict[str, Any]) -> int:
    """Enqueue every grid point no trial holds yet (call under the lock); returns how many were added.

    Idempotent: a point already queued, running, finished or failed is not queued again (a re-run of an
    interrupted point comes from :func:`recover_interrupted`).
    """
    import optuna
    from optuna.trial import TrialState

    present = {t.system_attrs.get(POINT_ATTR) for t in study.get_trials(deepcopy=False)}
    added = 0
    for index, params in enumerate(points):
        if index in present:
            continue
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, system_attrs={"fixed_params": dict(params), POINT_ATTR: index}))
        added += 1
    return added


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None if it is
    gone or a zombie. Together with the pid it names one process (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2:].split()
    if not rest or rest[0] in ("Z", "X"):
        return None
    return rest[19] if len(rest) > 19 else None


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """What names this process to the others: host, pid, start ticks and boot id."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": _start_ticks(pid), "boot": _boot_id()}


def _alive(worker: dict[str, Any]) -> bool | None:
    """True/False for a worker on this host and boot; None when it runs elsewhere (judged by heartbeat)."""
    if worker.get("host") != socket.gethostname():
        return None
    if worker.get("boot") != _boot_id():
        return False  # this machine rebooted since: nothing of that run is alive
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    start = _start_ticks(pid)
    if start is None:
        return False
    return worker.get("start") is None or start == worker.get("start")


def recover_interrupted(study, *, stale_after: float = STALE_AFTER_S, now: float | None = None) -> list[int]:
    """Mark interrupted RUNNING trials FAIL and queue each once more (call under the lock).

    Returns the numbers of the trials found interrupted. See the module docstring for the rule.
    """
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    found = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.system_attrs.get(WORKER_ATTR)
        if worker is None:
            why = "claimed but never started (its process died at once)"
        else:
            alive = _alive(worker)
            if alive is None:
                beat = t.system_attrs.get(HEARTBEAT_ATTR) or 0.0
                if now - float(beat) <= stale_after:
                    continue
                why = f"no heartbeat for {now - float(beat):.0f} s"
            elif alive:
                continue
            else:
                why = "its process is gone (killed or crashed)"
        who = f"pid {worker.get('pid')} on {worker.get('host')}" if worker else "a worker"
        if mark_interrupted(study, t._trial_id, f"{who} stopped during the trial: {why}"):
            found.append(t.number)
    return found


def mark_interrupted(study, trial_id: int, why: str) -> bool:
    """Mark one RUNNING trial FAIL as interrupted (``error`` says ``why``) and queue it once more unless it
    already is a re-run. Returns False when the trial had finished meanwhile."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = study._storage  # noqa: SLF001 - the storage API is public; Study exposes no getter
    t = storage.get_trial(trial_id)
    if t.state != TrialState.RUNNING:
        return False
    retry = len(t.system_attrs.get("retry_history", [])) < 1
    storage.set_trial_user_attr(trial_id, "error", f"interrupted: {why}; "
                                + ("re-run once" if retry else "not re-run (it was already a re-run)"))
    storage.set_trial_system_attr(trial_id, INTERRUPTED_ATTR, True)
    storage.set_trial_system_attr(trial_id, RETRIED_ATTR, retry)
    if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
        return False
    if retry:
        frozen = copy.deepcopy(storage.get_trial(trial_id))
        frozen.user_attrs = {}  # the re-run starts clean: no error, no worker of the interrupted one
        frozen.system_attrs = {k: v for k, v in frozen.system_attrs.items()
                               if k not in (WORKER_ATTR, HEARTBEAT_ATTR, INTERRUPTED_ATTR, RETRIED_ATTR)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API warnings of the callback
            RetryHeartbeatStaleTrialCallback(max_retry=1)(study, frozen)
    return True


def count_trials(study) -> dict[str, int]:
    """Counts by state; ``counted``: trials that use up the budget (all but interrupted ones re-run)."""
    from optuna.trial import TrialState

    out = {"trials": 0, "complete": 0, "pruned": 0, "failed": 0, "interrupted": 0, "running": 0, "waiting": 0,
           "counted": 0, "finished": 0}
    for t in study.get_trials(deepcopy=False):
        out["trials"] += 1
        interrupted = bool(t.system_attrs.get(INTERRUPTED_ATTR))
        if t.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.FAIL:
            out["interrupted" if interrupted else "failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        retried = interrupted and bool(t.system_attrs.get(RETRIED_ATTR))
        if not retried:
            out["counted"] += 1
            if t.state.is_finished():
                out["finished"] += 1
    return out


def claim_trial(study, lock: StudyLock, *, distributions: dict[str, Any], budget: int | None, make_sampler,
                identity: dict[str, Any], stale_after: float = STALE_AFTER_S):
    """The next trial for this worker, or None when there is nothing left to run.

    Under the lock: interrupted trials are recovered, then a WAITING trial (a grid point or a re-run) is
    taken first; with a ``budget`` (sampled sweeps) a new trial is asked for while fewer than ``budget``
    count; ``make_sampler(k)`` gives the sampler for the k-th trial (seeded per trial, so the suggestions
    do not depend on which process asks). Every parameter is suggested here, inside the lock.
    """
    from optuna.trial import TrialState

    with lock:
        recover_interrupted(study, stale_after=stale_after)
        trials = study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if not waiting:
            if budget is None:
                return None
            counted = sum(1 for t in trials if not (t.system_attrs.get(INTERRUPTED_ATTR)
                                                    and t.system_attrs.get(RETRIED_ATTR)))
            if counted >= budget:
                return None
            study.sampler = make_sampler(len(trials))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fixed parameter out of distribution" cannot happen: same space
            trial = study.ask(fixed_distributions=distributions)
        storage = study._storage  # noqa: SLF001
        storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, identity)
        storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
        trial.set_user_attr("worker_pid", identity["pid"])
        trial.set_user_attr("worker_host", identity["host"])
        return trial


@contextlib.contextmanager
def start_heartbeat(study, trial_id: int, interval: float = HEARTBEAT_S) -> Iterator[None]:
    """A daemon thread that records ``time.time()`` on the trial every ``interval`` seconds while the
    ``with`` block runs (what tells other hosts this trial is alive)."""
    import threading

    stop = threading.Event()
    storage = study._storage  # noqa: SLF001

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # noqa: BLE001 - the trial finished meanwhile, or the storage hiccuped
                return

    thread = threading.Thread(target=beat, name="moco-sweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
