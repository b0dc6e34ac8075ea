"""`rnnbench plan`: it validates like `run`, writes nothing but its calibration cache, and its estimate of a
real tiny study's wall time is within a factor of 2 of what `rnnbench run` takes."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest

from conftest import TINY, rnnbench
from studies import plan as plans
from studies import spec as specs
from studies.plan import CELL_OVERHEAD, RUN_OVERHEAD, makespan

UNITS = {"s": 1, "min": 60, "h": 3600}


def estimate_seconds(stdout: str) -> float:
    value, unit = re.search(r"^estimate: ([\d.]+) (s|min|h) ", stdout, re.M).groups()
    return float(value) * UNITS[unit]


@pytest.mark.slow
def test_plan_estimates_a_real_study_within_a_factor_of_2(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = rnnbench("plan", spec, "--root", tmp_path / "plan").stdout
    assert "study tiny" in out and "6 cells, 24 runs" in out
    assert re.search(r"^adding\(seq_len=8\)/lstm\s+16\s+1,297\s+2\+2 ", out, re.M), out  # 4H(in+H+2) + H+1
    planned = estimate_seconds(out)
    start = time.perf_counter()
    rnnbench("run", spec, "--root", tmp_path / "runs")
    actual = time.perf_counter() - start
    assert 0.5 < actual / planned < 2, f"planned {planned:.0f} s, took {actual:.0f} s\n{out}"


@pytest.mark.slow
def test_plan_writes_nothing_but_its_cache(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(TINY.replace("variants: [rnn, lstm]", "variants: [rnn]").replace("seq_len: [8, 12]", "seq_len: 8"))
    root = tmp_path / "runs"
    first = rnnbench("plan", spec, "--root", root, "--workers", "2").stdout
    assert sorted(p.name for p in root.iterdir()) == ["plan-cache.json"]
    # per cell: one model's step, and a population of 2's (its 2 search trials, then its 2 replicate runs)
    assert "calibrated 4 configuration(s) now" in first and "with 2 worker(s)" in first
    assert re.search(r"^adding\(seq_len=8\)/rnn\s+16\s+\S+\s+2\+2\s+2\+2 ", first, re.M), first
    again = rnnbench("plan", spec, "--root", root).stdout
    assert "calibrated 0 configuration(s) now" in again  # from the cache
    assert sorted(p.name for p in root.iterdir()) == ["plan-cache.json"]


def test_plan_refuses_a_bad_study_like_run(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(TINY.replace("trials: 2", "trails: 2"))
    for command in ("plan", "run"):
        proc = rnnbench(command, spec, "--root", tmp_path / "runs", check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {spec}: trails: unknown field"
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workers, cores, expected", [
    (1, 2, 8 * 1 + 2 * 2),  # one worker: the sum
    (2, 2, None),  # two: less than the sum, more than half of it (1.6x at best)
])
def test_makespan_list_schedules_with_generations_and_replicates(workers, cores, expected):
    cells = [(1.0, 4, 2.0, 1, 2), (1.0, 4, 2.0, 1, 2)]  # per cell: 4 search trials of 1 s in generations of 2, 1 replicate run of 2 s
    seconds = makespan(cells, workers, cores=cores)
    if expected is not None:
        assert seconds == pytest.approx(expected)
    else:
        assert 12 / 1.6 - 1e-9 <= seconds < 12
    # a replicate run waits for its cell's search; a generation for the one before it
    assert makespan([(1.0, 1, 5.0, 1, 1)], 4, 4) == pytest.approx(6.0)
    assert makespan([(1.0, 4, 0.0, 0, 2)], 8, 8) > makespan([(1.0, 4, 0.0, 0, 4)], 8, 8)


@pytest.mark.parametrize("population", ["auto", "off"])
def test_runs_trained_together_are_planned_as_one_population_job(tmp_path, monkeypatch, population):
    """A population's step is timed as one and shared by its members; one job per population. Here one
    model's step and a population of 2's both take 10 ms: a member's share is half."""
    monkeypatch.setattr(plans, "calibrate", lambda *a, **k: {"step": 0.01, "eval": 0.0, "probe": 0.0})
    monkeypatch.setattr(plans, "population_step_seconds", lambda task, spec, size, batch: 0.01)
    monkeypatch.setattr(plans, "engine_start_seconds", lambda: 0.0)
    path = tmp_path / "s.yaml"
    path.write_text(TINY.replace("seq_len: [8, 12]", "seq_len: 8").replace("  - task: copy_memory\n    seq_len: 5\n"
                                                                        "    n_copy: 2\n", "")
                    .replace("batch_size: 16}", f"batch_size: 16, population: {population}}}"))
    spec, _, _ = specs.load(path)
    plan = plans.estimate(spec, tmp_path, workers=1)
    rnn, lstm = plan.cells  # rnn at hidden 16: a population pays; lstm: torch's fused kernel, never
    together = population == "auto"
    assert (rnn.search_group, rnn.replicate_group) == ((2, 2) if together else (1, 1))
    assert (lstm.search_group, lstm.replicate_group) == (1, 1)
    run_alone = 40 * 0.01 + RUN_OVERHEAD  # 40 steps of 10 ms
    assert lstm.search_seconds == pytest.approx(run_alone)
    assert rnn.search_seconds == pytest.approx(40 * 0.01 / 2 + RUN_OVERHEAD if together else run_alone)
    assert plan.seconds == pytest.approx(2 * CELL_OVERHEAD + 4 * rnn.search_seconds + 4 * run_alone)
    assert ("together: " in plans.format_plan(plan)) == together
    if together:  # without replicate runs, no population of them is shown
        row = next(line for line in plans.format_plan(dataclasses.replace(plan, cells=[
            dataclasses.replace(c, replicates=0) for c in plan.cells])).splitlines() if "/rnn" in line)
        assert row.split()[3:5] == ["2+0", "2+0"], row  # runs (trials + replicates), together


def test_bench_options_it_cannot_honour_are_one_line_errors():
    from click.testing import CliRunner

    from rnnbench import cli
    for args, said in ((["--device", "meta"], "error: --device: expected auto, cpu, cuda or cuda:N, got 'meta'"),
                       (["--population", "--hidden", "64"], "error: --hidden: --population times fixed shapes"),
                       # a shape given on the command line is refused even at its default value
                       (["--population", "--batch", "64"], "error: --batch: --population times fixed shapes"),
                       (["--variants", "mingru"], "error: --variants: unknown mingru; known: rnn"),
                       (["--imports", "no_such.py"], "error: --imports no_such.py: no such file")):
        result = CliRunner().invoke(cli, ["bench", *args])
        assert result.exit_code == 2 and result.output.startswith(said), result.output


def test_bench_times_a_cell_of_yours(monkeypatch, registries):
    from click.testing import CliRunner

    from rnnbench import cli
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    result = CliRunner().invoke(cli, ["bench", "--imports", "examples/mingru.py", "--variants", "mingru", "--hidden",
                                      "8", "--seq-len", "5", "--batch", "4", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ")[0].strip("| ") for line in result.output.splitlines() if line.startswith("| ")]
    assert rows == ["variant", "torch.nn.LSTM", "mingru"], result.output


def test_an_interrupted_plan_keeps_the_cells_it_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(plans, "calibrate", lambda *a, **k: {"step": 0.01, "eval": 0.0, "probe": 0.0})
    monkeypatch.setattr(plans, "population_step_seconds", lambda task, spec, size, batch: 0.01)
    monkeypatch.setattr(plans, "engine_start_seconds", lambda: 0.0)
    path = tmp_path / "s.yaml"
    path.write_text(TINY)
    spec, _, _ = specs.load(path)
    seen = []

    def stop_at_the_third(i, n, cell):
        seen.append((i, n, cell.key))
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plans.estimate(spec, tmp_path, on_cell=stop_at_the_third)
    assert [s[:2] for s in seen] == [(0, 6), (1, 6), (2, 6)]
    def models(cache):  # one model's timings; "key/P" entries are populations'
        return {k for k in cache if "/" not in k}

    cached = models(plans._read_cache(tmp_path / plans.CACHE))
    assert len(cached) == 2  # the two cells timed before the interrupt, each written as it ended
    calls = []
    monkeypatch.setattr(plans, "calibrate", lambda *a, **k: calls.append(a) or {"step": 0.01, "eval": 0.0,
                                                                                 "probe": 0.0})
    plans.estimate(spec, tmp_path)
    assert len(calls) == len(models(plans._read_cache(tmp_path / plans.CACHE))) - len(cached) == 4  # the rest only
