"""The trial protocol (studies/queue.py): what it relies on in Optuna, and its rules, on an in-memory storage."""

import inspect
import math
import threading
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import TINY
from studies import launcher, queue, spec as specs, worker


def fresh(n_waiting=0, name="s"):
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name=name)
    study = queue.open_study(storage, name)
    for s in range(n_waiting):
        queue.enqueue(study, s)
    return storage, study


def finish(study, frozen, value, space=("x",)):
    trial = queue.start(study, frozen)
    for p in space:
        trial.suggest_float(p, 0, 1)
    return queue.end(study, trial, TrialState.COMPLETE, value)


# --------------------------------------------------------------------------------------------------
# What the protocol relies on in Optuna's private API
# --------------------------------------------------------------------------------------------------

def test_optuna_private_api_is_what_the_protocol_relies_on():
    assert list(inspect.signature(optuna.Study.__init__).parameters)[1:5] == ["study_name", "storage", "sampler", "pruner"]
    assert list(inspect.signature(optuna.Study._get_trials).parameters)[1:] == ["deepcopy", "states", "use_cache"]
    assert list(inspect.signature(optuna.Trial.__init__).parameters)[1:] == ["study", "trial_id"]
    assert "_find_sample_id" in vars(optuna.samplers.QMCSampler)
    tpe = inspect.getsource(optuna.samplers.TPESampler)
    assert "study._get_trials(" in tpe  # the view filters what TPE sees through this method
    storage, study = fresh(1)
    (t,) = study.get_trials()
    assert isinstance(t._trial_id, int)
    # the atomic claim: WAITING -> RUNNING succeeds once
    assert storage.set_trial_state_values(t._trial_id, TrialState.RUNNING) is True
    assert storage.set_trial_state_values(t._trial_id, TrialState.RUNNING) is False
    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # interrupt() relies on both raising
        storage.set_trial_user_attr(t._trial_id, "interrupted", "x")
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def test_view_shows_only_the_earlier_generations_in_slot_order():
    storage, study = fresh(12)
    for _ in range(12):
        finish(study, queue.claim(study), value=0.5)
    later = queue.claim(study)  # none left
    assert later is None
    queue.enqueue(study, 12)
    frozen = queue.claim(study)
    seen = []

    class Spy(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, dist):
            seen.append([queue.slot(t) for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,),
                                                                   use_cache=True)])
            return super().sample_independent(study, trial, name, dist)

    trial = queue.start(study, frozen, sampler=Spy(0), generation=4)
    trial.suggest_float("x", 0, 1)
    assert seen == [list(range(12))]
    assert queue.generation_ready(4)(frozen, study.get_trials()) is True


def test_tpe_suggestion_does_not_depend_on_trials_outside_the_view():
    """The same slot with the same seed suggests the same point whatever else has ended by then."""
    def suggestion(extra_trials: int) -> float:
        storage, study = fresh(13 + extra_trials)
        frozen = None
        for i in range(13 + extra_trials):
            t = queue.claim(study)
            if queue.slot(t) == 12:
                frozen = t
            else:
                finish(study, t, value=(queue.slot(t) - 5) ** 2)
        trial = queue.start(study, frozen, sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=4),
                            generation=4)
        return trial.suggest_float("x", 0, 1)

    assert suggestion(1) == suggestion(0) == suggestion(3)


def test_slot_qmc_sampler_takes_the_slots_point_from_the_first_trial_on():
    space = {"x": FloatDistribution(0, 1)}

    def point(slot):
        storage, study = fresh(1)  # nothing has finished yet: the first generation
        trial = queue.start(study, queue.claim(study), sampler=queue.SlotQMCSampler(slot, space, seed=1),
                            generation=4)
        return trial.suggest_float("x", 0, 1)
    points = [point(slot) for slot in range(4)]
    assert point(3) == points[3] != points[2]
    assert sorted(int(4 * x) for x in points) == [0, 1, 2, 3]  # a Sobol sequence's first 4 points: one per quarter


def test_a_qmc_study_spreads_its_first_learning_rates_over_the_range(tmp_path):
    """`sampler: qmc` in a study file: the first generation's learning rates, one per quarter of the log range."""
    path = tmp_path / "q.yaml"
    path.write_text("name: q\ntasks: [{task: adding, seq_len: 10}]\nvariants: [lstm]\nsampler: qmc\ntrials: 4\n"
                    "search_space: {lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}}\n")
    spec, _, _ = specs.load(path)
    (cell,) = specs.cells(spec)

    def lr(slot):
        storage, study = fresh(1)
        trial = queue.start(study, queue.claim(study), sampler=worker.make_sampler(spec, cell, slot), generation=4)
        return worker.suggest(trial, cell)["lr"]
    quarters = [int(4 * math.log(lr(slot) / 1e-4) / math.log(1e3)) for slot in range(4)]
    assert sorted(quarters) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------

def test_two_workers_claiming_two_copies_of_a_slot_from_one_snapshot_do_not_both_run(monkeypatch):
    """Two processes topping up at once enqueue slot 0 twice; two workers read the trials at the same
    moment (both copies WAITING) and each claims one. Only one of them may run it."""
    storage, study = fresh(1)
    queue.enqueue(study, 0)  # the second top-up's copy
    snapshot = study.get_trials(deepcopy=True)
    first, second = (t._trial_id for t in snapshot)
    assert storage.set_trial_state_values(first, state=TrialState.RUNNING)  # worker A's claim, from the snapshot
    fresh_trials = study.get_trials
    reads = iter([snapshot])  # worker B's first read is the same snapshot; later reads are fresh
    monkeypatch.setattr(study, "get_trials", lambda **kw: next(reads, None) or fresh_trials(**kw))
    assert queue.claim(study) is None  # B claimed the other copy, saw A's claim, and yielded
    b = storage.get_trial(second)
    assert queue.interrupted(b) and "duplicate" in b.user_attrs["interrupted"]
    assert [t._trial_id for t in fresh_trials() if queue.holds(t)] == [first]


def test_a_trial_that_completes_while_being_reaped_stays_counted():
    """Issue case 4: the reaper marks a trial interrupted, the worker completes it before the reaper
    sets FAIL. The trial must count once, and the reaper must not fail."""
    storage, study = fresh(1)
    frozen = queue.claim(study)
    storage.set_trial_user_attr(frozen._trial_id, "interrupted", "no heartbeat")  # the reaper's first write
    assert finish(study, frozen, 1.0) == TrialState.COMPLETE  # the worker was faster
    assert queue.interrupt(storage, frozen._trial_id, "no heartbeat") is False  # the reaper's second write
    (t,) = study.get_trials()
    assert queue.counted(t) and not queue.interrupted(t)
    assert queue.tally([t])["counted"] == 1
    assert queue.tally([t])["interrupted"] == 0


def test_interrupt_of_a_finished_trial_is_a_no_op():
    storage, study = fresh(1)
    frozen = queue.claim(study)
    finish(study, frozen, 1.0)
    assert queue.interrupt(storage, frozen._trial_id, "late") is False
    assert "interrupted" not in study.get_trials()[0].user_attrs


def test_free_slots_are_the_missing_indices_not_a_count():
    """Issue case 1: replicate 0 interrupted while 1 and 2 wait: the free slot is 0, not 2."""
    storage, study = fresh()
    for s in range(3):
        queue.enqueue(study, s, source_trial=7)
    first = queue.claim(study)
    assert queue.slot(first) == 0
    queue.interrupt(storage, first._trial_id, "killed")
    trials = study.get_trials()
    assert queue.free_slots(trials, 3, source_trial=7) == [0]
    assert queue.free_slots(trials, 3, source_trial=8) == [0, 1, 2]  # another source has its own slots
    assert queue.free_slots(trials, 5, source_trial=7) == [0, 3, 4]  # raising replicates adds slots


def test_claim_takes_lowest_slot_first_and_honours_generations():
    storage, study = fresh()
    for s in (3, 0, 2, 1):
        queue.enqueue(study, s)
    ready = queue.generation_ready(2)
    a, b = queue.claim(study, ready), queue.claim(study, ready)
    assert (queue.slot(a), queue.slot(b)) == (0, 1)
    assert queue.claim(study, ready) is None  # slots 2, 3 wait for slots 0, 1 to end
    finish(study, a, 1.0)
    assert queue.claim(study, ready) is None
    queue.interrupt(storage, b._trial_id, "killed")  # an interrupted slot has not ended
    assert queue.claim(study, ready) is None
    queue.enqueue(study, 1)
    c = queue.claim(study, ready)
    assert queue.slot(c) == 1
    finish(study, c, 2.0)
    assert queue.slot(queue.claim(study, ready)) == 2


def two_top_ups_at_once(tmp_path, make_storage, monkeypatch) -> dict[str, list[int]]:
    """A launcher and a launcher-less worker (two storage handles, as two processes have) top up a fresh
    study from the same reading, the second starting while the first is enqueueing. Returns each cell's
    search trials' slots."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("seq_len: [8, 12]", "seq_len: 8"))
    spec, _, _ = specs.load(path)
    first, second = make_storage(), make_storage()
    queue.prepare_studies(spec, first)
    rows = queue.progress(spec, first)  # both read every slot free
    enqueueing, real_enqueue = threading.Event(), queue.enqueue

    def slow_enqueue(*args, **kwargs):
        enqueueing.set()
        time.sleep(0.2)
        return real_enqueue(*args, **kwargs)
    monkeypatch.setattr(queue, "enqueue", slow_enqueue)
    launcher_top_up = threading.Thread(target=launcher.top_up, args=(spec, first, rows))
    launcher_top_up.start()
    assert enqueueing.wait(10)
    launcher.top_up(spec, second, rows)
    launcher_top_up.join()
    return {row.cell.key: sorted(queue.slot(t) for t in row.search_trials) for row in queue.progress(spec, first)}


def test_two_top_ups_at_once_fill_each_slot_once(tmp_path, monkeypatch):
    """They take turns on a lock beside the journal, and the second reads the cells afresh under it (before:
    each slot enqueued twice, the copies closed as interrupted by ``claim``)."""
    journal = str(tmp_path / "optuna.journal")

    def storage():
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    slots = two_top_ups_at_once(tmp_path, storage, monkeypatch)
    assert len(slots) == 4 and all(s == [0, 1] for s in slots.values()), slots


def test_a_duplicate_slot_is_closed_not_run():
    """A retried enqueue whose first attempt reached the database leaves two trials for one slot."""
    storage, study = fresh()
    queue.enqueue(study, 0)
    queue.enqueue(study, 0)
    first = queue.claim(study)
    assert queue.claim(study) is None  # the duplicate is closed as interrupted
    finish(study, first, 1.0)
    trials = study.get_trials()
    assert [queue.counted(t) for t in trials] == [True, False]
    assert "duplicate" in trials[1].user_attrs["interrupted"]


def test_best_trial_ties_go_to_the_lowest_number():
    storage, study = fresh(3)
    for v in (2.0, 1.0, 1.0):
        finish(study, queue.claim(study), v)
    assert queue.best_trial(study.get_trials(), "minimize").number == 1
    assert queue.best_trial(study.get_trials(), "maximize").number == 0


def test_best_trial_ties_go_to_the_lowest_slot_not_the_replacements_number():
    """An interrupted trial's replacement (a higher number, the same slot) keeps its place in a tie."""
    storage, study = fresh(3)
    trials = [queue.claim(study) for _ in range(3)]  # slots 0, 1, 2
    queue.interrupt(storage, trials[0]._trial_id, "test")
    for t in trials[1:]:
        finish(study, t, 1.0)
    queue.enqueue(study, 0)
    finish(study, queue.claim(study), 1.0)  # slot 0 again, trial number 3
    best = queue.best_trial(study.get_trials(), "minimize")
    assert (queue.slot(best), best.number) == (0, 3)


@pytest.mark.parametrize("shared", [False, True])
def test_a_changed_study_is_told_the_way_out_its_store_offers(tmp_path, shared):
    """Another --root starts afresh with the embedded store, not with a database several machines share."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    queue.prepare_studies(specs.load(path)[0], storage)
    with pytest.raises(queue.StudyChanged, match="give the study a new 'name'") as e:
        queue.prepare_studies(specs.load(path, ["train.steps=41"])[0], storage, shared=shared)
    assert ("another --root" in str(e.value)) == (not shared)
