"""The trial protocol: how a cell's trials are created, claimed, run and closed, exactly once.

This is the only module that touches Optuna's private API (``Study(...)``, ``Study._storage``,
``Study._get_trials``, ``FrozenTrial._trial_id``, ``optuna.Trial(study, id)``, the storage's
``set_trial_state_values`` / ``set_trial_user_attr`` and ``QMCSampler._find_sample_id``);
``tests/test_queue.py`` pins what it relies on.

Each cell has two Optuna studies, ``search`` and ``replicate``. Every trial has a **slot**: search
trials fill slots 0..trials-1, replicate trials slots 0..replicates-1 (the replicate index) of one
*source* search trial. A run's seed and, for search trials, its sampler seed derive from the slot,
never from the trial number, so a trial that replaces an interrupted one is the same run again.

States and transitions (Optuna's trial states; user attributes in brackets)::

    enqueue      (a top-up)      -> WAITING  [slot, source_trial]
    claim        (a worker)         WAITING -> RUNNING      atomic: exactly one claimer wins
    record       (that worker)      RUNNING  [worker = host:pid or NAME:pid, heartbeat]
    beat         (that worker)      RUNNING  [heartbeat]    at every evaluation
    end          (that worker)      RUNNING -> COMPLETE | PRUNED | FAIL [error]      counted
    interrupt    (reaper/worker)    RUNNING -> FAIL [interrupted = reason]           not counted

A slot is *held* by a counted trial or by a WAITING or RUNNING one; a top-up (the launcher's, or a
launcher-less worker's: ``studies.launcher.top_up``) enqueues a trial for every slot nobody holds
(:func:`free_slots`), so an interrupted trial's slot is filled again and each cell ends with exactly
``trials`` counted search trials and ``replicates`` replicate runs per source. Top-ups take turns
(:func:`exclusive`) and read the cells afresh under the lock; a copy that slips through anyway (a retried
enqueue whose first attempt reached the database) is closed by :func:`claim`, never run.

Interrupting writes the ``interrupted`` attribute first and then sets FAIL; a trial that ends
COMPLETE or PRUNED in between (its worker was faster than the reaper) stays counted, because only a
FAIL trial with the attribute is interrupted. A process killed between the two writes leaves a
RUNNING trial marked ``interrupted``: the next reap finishes the job.

A cell whose first ``STOP_AFTER`` search trials (by slot) all FAIL with the same error (:func:`stop_reason`)
is *stopped* by whoever tops up (the launcher, or a worker without one): its search study gets the user
attribute ``stopped`` (the error), its WAITING trials are interrupted and no more are enqueued; it counts
as done. :func:`retry_stopped` clears the mark;
the check then looks at the trials created after it only.

Generations make search results independent of the number of workers: the trial in slot ``s`` may
only be claimed once every slot below ``g * (s // g)`` has ended (``g`` = the study file's
``generation``), and its sampler and pruner see exactly those trials, in slot order.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from optuna.distributions import BaseDistribution, CategoricalDistribution

from studies.crash import crash_point
from studies.spec import Cell, Spec, cell_fingerprint, cell_imports, cells

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # QMCSampler
optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "[I ...] A new study created" line per cell

ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
LIVE = (TrialState.WAITING, TrialState.RUNNING)


# --------------------------------------------------------------------------------------------------
# Reading trials
# --------------------------------------------------------------------------------------------------

def slot(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("slot", t.number))


def interrupted(t: FrozenTrial) -> bool:
    return t.state == TrialState.FAIL and "interrupted" in t.user_attrs


def counted(t: FrozenTrial) -> bool:
    return t.state in ENDED and not interrupted(t)


def holds(t: FrozenTrial) -> bool:
    """Whether ``t`` holds its slot: it counts, or it may still come to count."""
    return counted(t) or t.state in LIVE


def source(t: FrozenTrial) -> int | None:
    value = t.user_attrs.get("source_trial")
    return None if value is None else int(value)


def free_slots(trials: list[FrozenTrial], n: int, source_trial: int | None = None) -> list[int]:
    """Slots in 0..n-1 that no trial holds (among replicate trials: of ``source_trial``)."""
    held = {slot(t) for t in trials if holds(t) and source(t) == source_trial}
    return [s for s in range(n) if s not in held]


def trial_id(t: FrozenTrial) -> int:
    return t._trial_id


@contextmanager
def exclusive(storage, name: str) -> Iterator[None]:
    """Hold the lock ``name`` for the block against every process sharing ``storage``: a PostgreSQL advisory
    lock (``studies.store.OutageTolerantRDBStorage.exclusive``), or a file lock beside the embedded journal.
    Other storages: no lock (then two top-ups at once may enqueue a slot twice, and :func:`claim` closes the
    copy)."""
    if hasattr(storage, "exclusive"):
        with storage.exclusive(name):
            yield
        return
    journal = getattr(getattr(storage, "_backend", None), "_file_path", None)
    if journal is None:
        yield
        return
    with open(f"{journal}.top-up.lock", "a") as f:  # one lock per journal; not ".lock*" (repair_journal's)
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# --------------------------------------------------------------------------------------------------
# Studies
# --------------------------------------------------------------------------------------------------

def open_study(storage, name: str, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """A handle on an existing study (``KeyError`` if there is none). Its sampler never samples:
    :func:`start` gives each claimed trial a sampler of its own."""
    return optuna.Study(name, storage, sampler=optuna.samplers.RandomSampler(0),
                        pruner=pruner or optuna.pruners.NopPruner())


class _View(optuna.Study):
    """A study as a trial's sampler and pruner see it: only the ended, counted trials of the given
    slots, in slot order, whatever else the storage holds by now."""

    def __init__(self, study: optuna.Study, visible: Container[int], sampler, pruner):
        super().__init__(study.study_name, study._storage, sampler=sampler, pruner=pruner)
        self._visible = visible

    def _get_trials(self, deepcopy=True, states=None, use_cache=False):
        trials = super()._get_trials(deepcopy, states, use_cache)
        return sorted((t for t in trials if counted(t) and slot(t) in self._visible), key=slot)

    def get_trials(self, deepcopy=True, states=None):
        return self._get_trials(deepcopy, states)


class SlotQMCSampler(optuna.samplers.QMCSampler):
    """Optuna's QMC sampler, taking the sequence point of the trial's slot instead of a shared
    counter (which depends on the order in which workers sample), over the search space it is given
    (Optuna's infers it from a finished trial, so it drew the whole first generation at random)."""

    def __init__(self, slot: int, search_space: dict[str, BaseDistribution], **kwargs):
        super().__init__(**kwargs)
        self._slot = slot
        self._space = {name: d for name, d in search_space.items() if not isinstance(d, CategoricalDistribution)}

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return self._space

    def _find_sample_id(self, study, search_space) -> int:
        return self._slot


# --------------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------------

def enqueue(study: optuna.Study, slot_: int, params: dict | None = None, source_trial: int | None = None) -> None:
    attrs = {"slot": slot_} | ({} if source_trial is None else {"source_trial": source_trial})
    study.enqueue_trial(params or {}, user_attrs=attrs, skip_if_exists=False)


def claim(study: optuna.Study, ready: Callable[[FrozenTrial, list[FrozenTrial]], bool] = lambda t, ts: True
          ) -> FrozenTrial | None:
    """Atomically move one WAITING trial to RUNNING (lowest slot first, among those ``ready(t, trials)``
    accepts) and return it; None if there is none. Unlike ``Study.ask`` it never creates a trial.

    A WAITING trial whose slot another trial already holds (a retried enqueue whose first attempt did
    reach the database, or two processes topping up at once) is closed as interrupted instead of run.
    The check is made again after the claim, on fresh trials: two workers that claimed two copies of
    one slot from the same snapshot each see the other's claim then, and at least one of them yields
    (both may: the slot is then free for the next top-up), so a slot never runs twice."""
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    waiting = sorted((t for t in trials if t.state == TrialState.WAITING), key=lambda t: (slot(t), t.number))

    def rivals(t, trials):
        return [o for o in trials if o.number != t.number and holds(o) and o.state != TrialState.WAITING
                and slot(o) == slot(t) and source(o) == source(t)]
    for t in waiting:
        if not ready(t, trials) and not rivals(t, trials):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue  # another worker won it
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        taken = rivals(t, trials) or rivals(t, study.get_trials(deepcopy=False))
        if taken:
            interrupt(storage, t._trial_id, f"duplicate of trial {taken[0].number} (slot {slot(t)})")
            continue
        return storage.get_trial(t._trial_id)
    return None


def generation_ready(g: int) -> Callable[[FrozenTrial, list[FrozenTrial]], bool]:
    """``claim``'s rule for search trials: every slot below ``g * (slot // g)`` has ended."""
    def ready(t: FrozenTrial, trials: list[FrozenTrial]) -> bool:
        ended = {slot(o) for o in trials if counted(o)}
        return all(s in ended for s in range(g * (slot(t) // g)))
    return ready


def start(study: optuna.Study, frozen: FrozenTrial, sampler=None, pruner=None, generation: int | None = None
          ) -> optuna.Trial:
    """The ``optuna.Trial`` of a claimed trial. With ``generation``, its sampler and pruner see only the
    trials of earlier generations (see the module docstring); replicate trials have fixed params."""
    if generation is not None:
        visible = range(generation * (slot(frozen) // generation))
        study = _View(study, visible, sampler or study.sampler, pruner or study.pruner)
    return optuna.Trial(study, frozen._trial_id)


def record(storage, trial_id: int, worker: str, now: float) -> None:
    storage.set_trial_user_attr(trial_id, "worker", worker)
    storage.set_trial_user_attr(trial_id, "heartbeat", now)


def set_attr(storage, trial_id: int, key: str, value) -> None:
    storage.set_trial_user_attr(trial_id, key, value)


def end(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None = None) -> TrialState:
    """Close a running trial; returns the state it has now: ``state``, or, when it was closed already
    (reaped as interrupted, or a retried write whose first attempt got through), the state it got."""
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        return state
    except optuna.exceptions.UpdateFinishedTrialError:
        return study._storage.get_trial(trial._trial_id).state


def interrupt(storage, trial_id: int, reason: str) -> bool:
    """Close a RUNNING (or WAITING) trial as interrupted: not counted, its slot free again.
    Returns False if it had ended meanwhile (then it keeps the state it ended with)."""
    try:
        storage.set_trial_user_attr(trial_id, "interrupted", reason)
        crash_point("interrupt.marked")
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def get_trial(storage, trial_id: int) -> FrozenTrial:
    return storage.get_trial(trial_id)


# --------------------------------------------------------------------------------------------------
# A study's cells
# --------------------------------------------------------------------------------------------------

KINDS = ("search", "replicate")


def derive_seed(*parts) -> int:
    """A 31-bit seed from any parts (study seed, cell key, kind, slot...), stable across runs."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def optuna_name(spec: Spec, cell: Cell, kind: str) -> str:
    return f"{spec.name}/{cell.key}" + ("/replicates" if kind == "replicate" else "")


def ended_slots(trials: list[FrozenTrial], source_trial: int | None = None) -> set[int]:
    return {slot(t) for t in trials if counted(t) and source(t) == source_trial}


def tally(trials: list[FrozenTrial]) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in trials:
        out[t.state.name] += 1
    out["counted"] = sum(counted(t) for t in trials)
    out["interrupted"] = sum(interrupted(t) for t in trials)
    return out


def best_trial(trials: list[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The COMPLETE trial with the best value; ties go to the lowest slot (then trial number). Slots, not trial
    numbers: an interrupted trial's replacement has a higher number but is the same run, so the choice (and the
    configuration the replicate runs retrain) does not depend on interruptions."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    sign = 1 if direction == "minimize" else -1
    return min(done, key=lambda t: (sign * t.value, slot(t), t.number)) if done else None


@dataclass
class CellProgress:
    """One cell's trials as the storage has them now. ``replicate`` counts only the replicate runs of
    the current best search trial (``best``); runs of an earlier best are ``superseded``."""

    cell: Cell
    search_trials: list[FrozenTrial]
    replicate_trials: list[FrozenTrial]
    trials: int  # the study file's trials and replicates per cell
    replicates: int
    best: FrozenTrial | None
    stopped: str | None = None  # the error its first trials failed with (see stop_reason)
    stop_check_from: int = 0  # trial number from which stop_reason looks (set by retry_stopped)

    @property
    def search(self) -> dict[str, int]:
        return tally(self.search_trials)

    @property
    def replicate(self) -> dict[str, int]:
        source_ = None if self.best is None else self.best.number
        return tally([t for t in self.replicate_trials if source(t) == source_])

    @property
    def superseded(self) -> int:
        source_ = None if self.best is None else self.best.number
        return sum(counted(t) and source(t) != source_ for t in self.replicate_trials)

    @property
    def search_done(self) -> bool:
        return set(range(self.trials)) <= ended_slots(self.search_trials)

    def replicates_wanted(self) -> int:
        # No replicate runs when no search trial completed: there is no best configuration.
        return self.replicates if self.best is not None or not self.search_done else 0

    def done(self) -> bool:
        if self.stopped is not None:
            return True
        if not self.search_done:
            return False
        if self.best is None or self.replicates == 0:
            return True
        return set(range(self.replicates)) <= ended_slots(self.replicate_trials, self.best.number)


def progress(spec: Spec, storage, of: list[Cell] | None = None) -> list[CellProgress]:
    """Each cell's trials as the storage has them now (``of``: only these cells)."""
    rows = []
    for cell in cells(spec) if of is None else of:
        trials, attrs = {}, {}
        for kind in KINDS:
            try:
                study = open_study(storage, optuna_name(spec, cell, kind))
            except KeyError:  # not prepared yet
                trials[kind] = []
                continue
            trials[kind] = study.get_trials(deepcopy=False)
            if kind == "search":
                attrs = study.user_attrs
        best = best_trial(trials["search"], spec.objective.direction)
        rows.append(CellProgress(cell, trials["search"], trials["replicate"], spec.trials, spec.replicates, best,
                                 attrs.get("stopped"), int(attrs.get("stop_check_from") or 0)))
    return rows


# --------------------------------------------------------------------------------------------------
# Stopping a cell whose trials all fail alike
# --------------------------------------------------------------------------------------------------

STOP_AFTER = 3  # a cell whose first this many search trials fail with the same error is stopped
_NUMBER = re.compile(r"\b(?:nan|inf)\b|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def error_kind(message: str) -> str:
    """An error message with its numbers masked: ``Divergence: training loss became nan at step 3`` and
    ``... became inf at step 1`` are the same error."""
    return _NUMBER.sub("#", message)


def stop_reason(row: CellProgress) -> str | None:
    """The error to stop ``row``'s cell with: its first ``STOP_AFTER`` search slots (among the trials
    numbered from ``row.stop_check_from``) have ended, all FAIL with one :func:`error_kind` of error.
    None if not (or if the search has ended anyway, or the cell is stopped already). Slots, not the order
    in which trials ended, decide: the same trials stop a cell whatever the number of workers."""
    if row.stopped is not None or row.search_done:
        return None
    return failing_alike(row.search_trials, row.stop_check_from)


def failing_alike(trials: list[FrozenTrial], check_from: int = 0) -> str | None:
    """:func:`stop_reason` on a search study's trials: the error, if the first ``STOP_AFTER`` slots held by
    trials numbered from ``check_from`` have ended, all FAIL with one :func:`error_kind` of error."""
    mine = [t for t in trials if t.number >= check_from and holds(t)]
    first = sorted({slot(t) for t in mine})[:STOP_AFTER]
    if len(first) < STOP_AFTER:
        return None
    ended = [next((t for t in mine if slot(t) == s and counted(t)), None) for s in first]
    if any(t is None or t.state != TrialState.FAIL or "error" not in t.user_attrs for t in ended):
        return None
    errors = [str(t.user_attrs["error"]) for t in ended]
    return errors[0] if len({error_kind(e) for e in errors}) == 1 else None


def not_failing_alike(study: optuna.Study) -> Callable[[FrozenTrial, list[FrozenTrial]], bool]:
    """A ``claim`` rule for search trials: none while the cell's trials fail alike (the launcher is about to
    stop it), so a fast-failing cell does not burn its slots before the launcher looks."""
    def ready(t: FrozenTrial, trials: list[FrozenTrial]) -> bool:
        if failing_alike(trials) is None:  # cheap: no storage call
            return True
        attrs = study.user_attrs  # after --retry-stopped, the trials before it do not count
        return attrs.get("stopped") is None and failing_alike(trials, int(attrs.get("stop_check_from") or 0)) is None
    return ready


def stop(spec: Spec, storage, row: CellProgress, reason: str) -> None:
    """Mark the cell stopped and close its WAITING search trials as interrupted (not counted); trials
    running now finish and count."""
    study = open_study(storage, optuna_name(spec, row.cell, "search"))
    study.set_user_attr("stopped", reason)
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            interrupt(storage, t._trial_id, f"cell stopped: its first {STOP_AFTER} trials failed with: {reason}")
    row.stopped = reason


def retry_stopped(spec: Spec, storage) -> list[str]:
    """Clear the ``stopped`` mark of every stopped cell (``rnnbench run --retry-stopped``); the stop check
    then looks only at trials created from now on. Returns the keys of the cells retried."""
    retried = []
    for cell in cells(spec):
        try:
            study = open_study(storage, optuna_name(spec, cell, "search"))
        except KeyError:
            continue
        if study.user_attrs.get("stopped") is not None:
            study.set_user_attr("stop_check_from", len(study.get_trials(deepcopy=False)))
            study.set_user_attr("stopped", None)  # Optuna cannot delete a user attribute
            retried.append(cell.key)
    return retried


class StudyChanged(RuntimeError):
    """A study file defines a cell differently from the one its trials were run with."""


def check_fingerprints(spec: Spec, storage, action: str = "give workers the launcher's study file",
                       on_edited_import: Callable[[str], None] | None = None) -> bool:
    """Raise :class:`StudyChanged` if any prepared cell was prepared from another definition (task
    settings, search space, budget, model and switches, sampler, pruner, generation, objective, seed, or a
    module it imports); False while some cell is not prepared yet. ``on_edited_import(what)``, if given, is
    told instead of a cell whose only change is an edited module (its study file definition is the same)."""
    prepared = True
    for cell in cells(spec):
        try:
            attrs = open_study(storage, optuna_name(spec, cell, "search")).user_attrs
        except KeyError:
            prepared = False
            continue
        stored = attrs.get("fingerprint")
        if stored is not None and stored != cell_fingerprint(spec, cell):
            then, now = attrs.get("imports"), cell_imports(spec, cell)
            edited = sorted(k for k in {*(then or {}), *now} if (then or {}).get(k) != now.get(k))
            said = f"study {spec.name!r}, cell {cell.key}: "
            if then is not None and edited and stored == cell_fingerprint(spec, cell, imports=then):
                what = f"{said}{', '.join(edited)} (imported by the study file) changed since the study was prepared"
                if on_edited_import is None:
                    raise StudyChanged(f"{what}; {action}")
                on_edited_import(what)
                continue
            raise StudyChanged(f"{said}the study file changed this cell's definition (task settings, search space, "
                               "budget, model or switches, sampler, pruner, generation, objective or seed, or a module "
                               f"it imports) since the study was prepared; {action}")
    return prepared


def prepared_as_defined(spec: Spec, storage) -> bool:
    """Whether every cell of ``spec`` is prepared in ``storage`` with the fingerprint ``spec`` gives it: its
    definition is the one ``rnnbench run`` checked in full (``spec.load``) before it prepared the cell."""
    for cell in cells(spec):
        try:
            stored = open_study(storage, optuna_name(spec, cell, "search")).user_attrs.get("fingerprint")
        except KeyError:
            return False
        if stored != cell_fingerprint(spec, cell):
            return False
    return True


def prepare_studies(spec: Spec, storage, shared: bool = False) -> dict[str, str | None]:
    """Create each cell's two Optuna studies (or check their definition). Returns each cell's recorded
    MLflow parent run id (None where not recorded yet). ``shared``: a database several machines use, where
    another --root changes nothing."""
    check_fingerprints(spec, storage, "give the study a new 'name'" + ("" if shared else " (or use another --root)")
                       + " to start a new study")
    parents = {}
    for cell in cells(spec):
        for kind in KINDS:
            study = optuna.create_study(storage=storage, study_name=optuna_name(spec, cell, kind),
                                        direction=spec.objective.direction, load_if_exists=True)
            if "fingerprint" not in study.user_attrs:
                study.set_user_attr("imports", cell_imports(spec, cell))  # to name an edited module later
                study.set_user_attr("fingerprint", cell_fingerprint(spec, cell))
            if kind == "search":
                parents[cell.key] = study.user_attrs.get("mlflow_parent_run_id")
    return parents


def record_parents(spec: Spec, storage, parents: dict[str, str]) -> None:
    for cell in cells(spec):
        study = open_study(storage, optuna_name(spec, cell, "search"))
        if study.user_attrs.get("mlflow_parent_run_id") != parents[cell.key]:
            study.set_user_attr("mlflow_parent_run_id", parents[cell.key])
