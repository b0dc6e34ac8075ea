"""`rnnbench status` and the launcher's trial lines, on an Optuna journal whose trials are written by
hand (the launcher's own prepare and top-up, then claims and ends as a worker would make them; no
training, no MLflow), so that the states and errors are exactly the ones asked for."""

import re
import time

from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import TINY, rnnbench
from studies import queue
from studies import spec as specs
from studies.launcher import top_up
from studies.progress import Display, last_errors, trial_line

ERROR = "Divergence: objective loss is nan at step 20"


def fake_study(tmp_path, fail_slot=1):
    """The tiny study with every search trial ended: COMPLETE, except ``fail_slot`` of the first cell,
    FAIL with ``ERROR``, and slot 0 of the second, interrupted."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    spec, _, _ = specs.load(path)
    root = tmp_path / "runs"
    root.mkdir()
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    queue.prepare_studies(spec, storage)
    top_up(spec, storage)
    for i, row in enumerate(queue.progress(spec, storage)):
        for t in row.search_trials:
            end(storage, t, i, fail_slot)
    return spec, path, root, storage


def end(storage, t, cell_index, fail_slot):
    tid = queue.trial_id(t)
    storage.set_trial_state_values(tid, TrialState.RUNNING)
    queue.record(storage, tid, "host:1", time.time())
    if cell_index == 0 and queue.slot(t) == fail_slot:
        queue.set_attr(storage, tid, "error", ERROR)
        storage.set_trial_state_values(tid, TrialState.FAIL)
    elif cell_index == 1 and queue.slot(t) == 0:
        queue.interrupt(storage, tid, "worker host:1 died")
    else:
        storage.set_trial_state_values(tid, TrialState.COMPLETE, values=[0.5 - 0.1 * queue.slot(t)])


def test_status_shows_the_last_error_of_each_failing_cell(tmp_path):
    spec, path, root, _ = fake_study(tmp_path)
    out = rnnbench("status", path, "--root", root).stdout
    first = specs.cells(spec)[0].key
    assert "last error of each cell with failed trials" in out
    line = next(l for l in out.splitlines() if ERROR in l)
    assert line.split()[0] == first and "search slot 1" in line
    assert "died" not in out  # an interrupted trial is not a failure: a replacement is queued
    assert sum(ERROR in l for l in out.splitlines()) == 1


def test_status_of_a_study_without_failures_has_no_error_section(tmp_path):
    _, path, root, storage = fake_study(tmp_path, fail_slot=None)
    assert "last error" not in rnnbench("status", path, "--root", root).stdout


def test_status_without_a_store_is_a_one_line_error(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    proc = rnnbench("status", path, "--root", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no study store here yet" in proc.stderr


def test_status_of_a_study_the_store_does_not_hold_names_the_ones_it_does(tmp_path):
    _, path, root, _ = fake_study(tmp_path, fail_slot=None)
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("name: tiny", "name: other"))
    proc = rnnbench("status", other, "--root", root, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no study 'other' here (it holds: tiny)" in proc.stderr and proc.stdout == ""


def test_status_of_a_study_with_imports_refuses_other_settings(tmp_path):
    """A study file with imports is always loaded in full: status compared nothing with the store then."""
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).resolve().parent.parent / "examples" / "delayed_xor.py", tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text("imports: [delayed_xor.py]\n" + TINY)
    spec, _, _ = specs.load(path)
    root = tmp_path / "runs"
    root.mkdir()
    queue.prepare_studies(spec, JournalStorage(JournalFileBackend(str(root / "optuna.journal"))))
    assert "0/24 trials ended" in rnnbench("status", path, "--root", root).stdout
    proc = rnnbench("status", path, "--root", root, "--set", "train.steps=41", check=False)
    assert proc.returncode == 2 and "changed this cell's definition" in proc.stderr, proc.stderr


def test_last_error_is_the_latest_failure_of_the_cell(tmp_path):
    spec, _, _, storage = fake_study(tmp_path)
    rows = queue.progress(spec, storage)
    # a second failure in the first cell, later: a replicate
    replicate = queue.open_study(storage, queue.optuna_name(spec, rows[0].cell, "replicate"))
    queue.enqueue(replicate, 0, {"lr": 1e-3}, source_trial=0)
    t = queue.claim(replicate)
    queue.set_attr(storage, queue.trial_id(t), "error", "RuntimeError: later")
    storage.set_trial_state_values(queue.trial_id(t), TrialState.FAIL)
    errors = last_errors(queue.progress(spec, storage))
    assert [(r.cell.key, kind, t.user_attrs["error"]) for r, kind, t in errors] == [
        (rows[0].cell.key, "replicate", "RuntimeError: later")]


def topped_up_tiny_study(tmp_path):
    """The TINY study prepared in a journal under tmp_path, its first trials queued: (spec, storage)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    spec, _, _ = specs.load(path)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    queue.prepare_studies(spec, storage)
    top_up(spec, storage)
    return spec, storage


def test_display_prints_one_line_per_ended_trial(tmp_path, capsys, monkeypatch):
    spec, storage = topped_up_tiny_study(tmp_path)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    with Display(spec, interval=3600) as display:
        rows = queue.progress(spec, storage)
        end(storage, rows[0].search_trials[0], 0, fail_slot=None)  # ended before the launcher's first look
        display.update(queue.progress(spec, storage))
        first = capsys.readouterr().out
        display.update(queue.progress(spec, storage))
        assert capsys.readouterr().out == ""  # nothing new: nothing printed
        for t in rows[0].search_trials[1:] + rows[1].search_trials:
            end(storage, t, 0 if t in rows[0].search_trials else 1, fail_slot=1)
        display.update(queue.progress(spec, storage))
        lines = capsys.readouterr().out.splitlines()
    assert "1 trials had ended before this run" in first and rows[0].cell.key not in first
    trial_lines = [l for l in lines if "slot" in l]
    assert len(trial_lines) == len(rows[0].search_trials) - 1 + len(rows[1].search_trials)
    fail = next(l for l in trial_lines if "FAIL" in l)
    assert rows[0].cell.key in fail and "search" in fail and "slot   1" in fail and ERROR in fail
    interrupted = next(l for l in trial_lines if "INTERRUPTED" in l)
    assert rows[1].cell.key in interrupted and "worker host:1 died" in interrupted
    assert all(re.search(r"\d+\.\d s", l) for l in trial_lines)  # seconds


def test_trial_line_fields(tmp_path):
    spec, _, _, storage = fake_study(tmp_path)
    t = next(t for t in queue.progress(spec, storage)[0].search_trials if t.state == TrialState.COMPLETE)
    line = trial_line("adding(seq_len=8)/rnn", "search", t, "loss", cell_width=30)
    cell, kind, _, slot_, state, metric, value, seconds, unit = line.split()
    assert (cell, kind, int(slot_), state, metric, float(value), unit) == (
        "adding(seq_len=8)/rnn", "search", queue.slot(t), "COMPLETE", "loss", t.value, "s")
    assert float(seconds) >= 0


def test_a_cell_failing_alike_is_stopped_and_shown(tmp_path):
    """The first 3 search slots FAIL with one error (numbers masked): the launcher's check stops the cell,
    closes its waiting trials (not counted), and `status` shows it stopped."""
    from studies.launcher import stop_failing

    assert queue.error_kind("Divergence: loss became nan at step 3") == queue.error_kind(
        "Divergence: loss became inf at step 12")
    assert queue.error_kind("ValueError: a") != queue.error_kind("TypeError: a")
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("trials: 2", "trials: 5"))
    spec, _, _ = specs.load(path)
    root = tmp_path / "runs"
    root.mkdir()
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    queue.prepare_studies(spec, storage)
    top_up(spec, storage)
    first = queue.progress(spec, storage)[0]
    for t in sorted(first.search_trials, key=queue.slot)[:3]:
        tid = queue.trial_id(t)
        storage.set_trial_state_values(tid, TrialState.RUNNING)
        queue.set_attr(storage, tid, "error", f"Divergence: training loss became nan at step {queue.slot(t) + 1}")
        storage.set_trial_state_values(tid, TrialState.FAIL)
        if queue.slot(t) == 1:
            assert stop_failing(spec, storage, queue.progress(spec, storage))[0].stopped is None  # 2 of 3
    rows = stop_failing(spec, storage, queue.progress(spec, storage))
    assert rows[0].stopped == "Divergence: training loss became nan at step 1" and rows[0].done()
    assert [r.stopped for r in rows[1:]] == [None] * (len(rows) - 1)
    row = queue.progress(spec, storage)[0]
    assert row.stopped and row.search["counted"] == 3 and row.search["interrupted"] == 2
    top_up(spec, storage)  # a stopped cell gets no new trials
    assert queue.progress(spec, storage)[0].search["WAITING"] == 0
    out = rnnbench("status", path, "--root", root).stdout
    assert f"{row.cell.key}  stopped: Divergence: training loss became nan at step 1" in out
    assert "(1 stopped)" in out


STATUS_IN_PROCESS = """
import sys
from click.testing import CliRunner
from rnnbench import cli
result = CliRunner().invoke(cli, ["status", *sys.argv[1:]])
print(result.output)
print("exit", result.exit_code, "torch" in sys.modules)
"""


def status_in_process(*args) -> tuple[str, int, bool]:
    """`rnnbench status ARGS` in a fresh interpreter: its output, exit code, and whether torch was imported."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", STATUS_IN_PROCESS, *map(str, args)], capture_output=True,
                          text=True, check=True, timeout=300)
    *output, last = proc.stdout.rstrip("\n").splitlines()
    _, code, torch = last.split()
    return "\n".join(output), int(code), torch == "True"


def test_status_of_a_prepared_study_does_not_import_torch(tmp_path):
    """torch's import is most of a status's time; a study whose every cell the store holds as the file defines
    it was checked in full by `run` when it prepared them, so status checks the file without the task and
    variant classes."""
    spec, path, root, _ = fake_study(tmp_path)
    output, code, torch = status_in_process(path, "--root", root)
    assert code == 0 and not torch, output
    assert all(c.key in output for c in specs.cells(spec)) and ERROR in output


def test_status_checks_in_full_what_the_store_does_not_hold(tmp_path):
    """A typo gets the error `run` gives; a cell the store does not hold (a new variant) makes status check
    the file in full, torch and all, and show the cell with nothing run."""
    _, path, root, _ = fake_study(tmp_path)
    typo = "variants=[rnn, lstn]"
    output, code, _ = status_in_process(path, "--root", root, "--set", typo)
    run = rnnbench("run", path, "--root", tmp_path / "elsewhere", "--set", typo, check=False)
    assert code == 2 and run.returncode == 2 and output.strip() == run.stderr.strip()
    assert "variants[1]: unknown variant 'lstn'" in output
    output, code, torch = status_in_process(path, "--root", root, "--set", "variants=[rnn, lstm, gru]")
    assert code == 0 and torch and "adding(seq_len=8)/gru" in output, output
    # a cell the store holds, defined otherwise (another --set than the run's): refused, as a worker is
    output, code, _ = status_in_process(path, "--root", root, "--set", "train.steps=7")
    assert code == 2 and "the study file changed this cell's definition" in output and "give `status` the study " \
        "file and --set the study was run with" in output, output


def test_a_resumed_display_counts_the_interrupted_slots_still_to_run(tmp_path, capsys, monkeypatch):
    """Two trials interrupted before this run: one slot has been run again since, the other has only been
    queued again (as the launcher does before its first update): still to run."""
    spec, storage = topped_up_tiny_study(tmp_path)
    rows = queue.progress(spec, storage)
    study = queue.open_study(storage, queue.optuna_name(spec, rows[0].cell, "search"))
    first, second = queue.claim(study), queue.claim(study)
    for t in (first, second):
        queue.interrupt(storage, queue.trial_id(t), "worker host:1 died")
    queue.enqueue(study, queue.slot(first))
    again = queue.claim(study)
    assert queue.slot(again) == queue.slot(first)
    end(storage, again, 0, fail_slot=None)
    queue.enqueue(study, queue.slot(second))
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    with Display(spec, interval=3600) as display:
        display.update(queue.progress(spec, storage))
    assert "3 trials had ended before this run (2 interrupted: 1 slot to run again)" in capsys.readouterr().out


def test_status_without_the_runs_set_notes_the_cells_the_store_holds_instead(tmp_path):
    """Run with a --set that renamed the cells, asked about without it: a note, not just a table of zeros."""
    spec, path, root, storage = fake_study(tmp_path)
    wider = specs.load(path, ["tasks[0].seq_len=[8, 16]"])[0]
    queue.prepare_studies(wider, storage)
    proc = rnnbench("status", path, "--root", root, "--set", "tasks[0].seq_len=[20]", check=False)
    assert proc.returncode == 0 and "note: 2 of this file's cells are not in the store, which holds 6 other " \
        "cell(s) of study tiny: give `status` the --set the study was run with" in proc.stderr, proc.stderr
    assert "note:" not in rnnbench("status", path, "--root", root).stderr  # every cell there: nothing to note
    # two trials per cell in the store, asked about with --set trials=1: the rows show 2, the totals count 1
    proc = rnnbench("status", path, "--root", root, "--set", "trials=1")
    assert proc.stderr == ("note: the store holds up to 2 ended search trials per cell, more than the 1 this study "
                           "file asks for: give `status` the --set trials= the study was run with (the totals above "
                           "count the file's)\n"), proc.stderr
