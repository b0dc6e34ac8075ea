"""The shipped reference study (studies/odyssey.yaml): its tables agree with the study file, its report
regenerates from them byte for byte without MLflow or training, and the README's findings quote them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from reports import findings, tables as saved
from studies import spec as specs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "studies" / "results" / "odyssey"


@pytest.fixture(scope="module")
def study():
    spec, _, sha = specs.load(ROOT / "studies" / "odyssey.yaml")
    return spec, sha


@pytest.fixture(scope="module")
def shipped():
    return saved.load(SHIPPED)


def test_the_shipped_tables_are_the_study_files_run(study, shipped):
    spec, sha = study
    assert shipped.collection["study_sha256"] == sha, "the study file changed since its tables were shipped"
    assert shipped.collection["runs_from_dirty_tree"] == 0
    results = shipped.results
    expected = {c.key for c in specs.cells(spec)}
    assert set(results.cell) == expected
    for cell, runs in results.groupby("cell"):
        search = runs[runs.kind == "search"]
        assert sorted(search.trial) == list(range(spec.trials)), cell  # every slot once, none twice
        assert (search.state != "RUNNING").all(), cell
        current = runs[(runs.kind == "replicate") & ~runs.superseded.astype(bool)]
        assert sorted(current.replicate) == list(range(spec.replicates)), cell
        assert (current.state == "COMPLETE").all(), cell
    assert len(results) == len(expected) * (spec.trials + spec.replicates) + results.superseded.astype(bool).sum()
    assert results.run_id.is_unique and set(results.run_id) == set(shipped.collection["mlflow_run_ids"])


def test_figures_regenerate_from_the_shipped_tables_byte_for_byte(tmp_path):
    def files(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    runs = [subprocess.Popen([sys.executable, "-m", "rnnbench", "report", "--from", str(SHIPPED), "--out",
                              str(tmp_path / out), "--root", str(tmp_path / "no-store")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for out in ("a", "b")]  # side by side: 2 cores
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    assert any(name.startswith("figures/") and name.endswith(".png") for name in a) and "index.html" in a
    for name, data in files(SHIPPED).items():  # the shipped tables, summary and statistics come back unchanged
        if name != saved.MANIFEST:
            assert a[name] == data, name
    assert not (tmp_path / "no-store").exists()  # nothing read from or written to a store


def test_the_readme_findings_quote_the_shipped_tables():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Findings", 1)[1].split("\n## ", 1)[0]
    assert findings.render(SHIPPED) in section
    summary = pd.read_csv(SHIPPED / "summary.csv")
    for task, value, variant, k, n in re.findall(r"`(\w+)` T=(\d+) `(\w+)` solved (\d+)/(\d+)", section):
        row = summary[(summary.task == task) & (summary.ladder_value == int(value)) & (summary.variant == variant)]
        assert (int(row.solved.iloc[0]), int(row.runs.iloc[0])) == (int(k), int(n)), (task, value, variant)
