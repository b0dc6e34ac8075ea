"""A study's report from its tables: tables (Parquet + CSV), summary and statistics, figures,
manifest.json and index.html in one folder; and its copy in MLflow.

    build_report(collect(client, study, storage), out)      # rnnbench report STUDY
    build_report(tables.load(folder), out, source=folder)  # rnnbench report --from FOLDER --out OUT

The second form reads nothing but the saved tables, and writes byte-identical files each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from reports import html, stats, tables as tbl
from reports.figures import FORMATS, Figure, draw_all

REPORT_PACKAGES = ("numpy", "pandas", "pyarrow", "scipy", "matplotlib", "seaborn")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_report(tables: tbl.Tables, out: Path, reference: str | None = None, source: Path | None = None) -> Path:
    """Write the report of ``tables`` into ``out``; returns the index.html path.

    ``reference``: the variant label every other variant is compared with (default: the study file's
    ``reference``, else lstm, else the first variant). ``source``: the saved report the tables were
    loaded from (``out`` itself is fine); its table files are copied byte for byte instead of being written
    again. The report is written into a new folder beside ``out`` and its files then moved into ``out``, so
    an interrupted build (Ctrl-C, a failed figure) leaves the previous report whole.
    """
    reference = reference or tables.reference
    if tables.known_variants and reference not in tables.known_variants:
        raise LookupError(f"reference variant {reference!r} is not in the study (variants: "
                          f"{', '.join(tables.known_variants)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-building-", dir=out.parent))
    try:
        _write(tables, staging, reference, source)
        _move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "index.html"


def _move_into(staging: Path, out: Path) -> None:
    """Move the built report's files into ``out`` (each replaced at once, index.html last) and delete the
    figures of the previous report that this one no longer draws. Other files in ``out`` are left alone."""
    built = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    for rel in sorted(built, key=lambda rel: rel.name == "index.html"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, out / rel)
    kept = set(built)
    for old in [*(out / "figures").glob("*.png"), *(out / "figures").glob("*.svg")]:
        if old.relative_to(out) not in kept:
            old.unlink()


def _write(tables: tbl.Tables, out: Path, reference: str, source: Path | None) -> None:
    files = [f"{n}.{ext}" for n in tbl.TABLES for ext in ("parquet", "csv")]
    if source is None:
        tbl.save(tables, out)
        tables = tbl.read_frames(out, tables.collection)  # draw from what --from will read
    else:
        for f in files:
            shutil.copyfile(Path(source) / f, out / f)

    has_runs = len(tables.results) > 0
    if has_runs:
        cells = stats.cell_stats(stats.selected_runs(tables.results, tables.unit))
        summ, vs = stats.summary(tables), stats.versus_reference(tables, reference)
    else:
        cells, summ, vs = None, pd.DataFrame(), pd.DataFrame(columns=["significant"])
    summ.to_csv(out / "summary.csv", index=False)
    vs.to_csv(out / "statistics.csv", index=False)
    files += ["summary.csv", "statistics.csv"]
    figures = draw_all(tables, cells, out / "figures") if has_runs else {}

    unit = tables.unit
    manifest = {
        "collection": tables.collection,
        "report": {
            "reference": reference,
            "aggregation": stats.policy(unit, tables.objective_metric, tables.direction),
            "importance_method": tables.collection.get("importance_method"),
            "interval": {"method": "Student-t interval of the mean", "level": stats.LEVEL},
            "primary_test": "Welch's t-test, two-sided, Holm-corrected over the study",
            "alpha": stats.ALPHA,
            "superseded_replicate_runs": int(summ.superseded.sum()) if "superseded" in summ else 0,
            "files": {f: _sha256(out / f) for f in files},
            "figures": sorted(f"figures/{fig.stem}.{fmt}" for items in figures.values()
                              for _, fig in items if isinstance(fig, Figure) for fmt in FORMATS),
            "versions": tbl.package_versions(REPORT_PACKAGES),
        },
    }
    (out / tbl.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    page = html.page(tables.study, tables.collection.get("study_file", ""), summ, vs, reference, figures,
                     manifest, tables.objective_metric, tables.direction, files + [tbl.MANIFEST], unit)
    (out / "index.html").write_text(page)


def publish(client, study: str, out: Path) -> str:
    """Log the report folder as the artifacts of the study's report run (tag ``rnnbench.role=report``),
    replacing the previous report run. Returns the run id. Report runs are never trials: collection
    reads ``rnnbench.role=trial`` runs only."""
    exp = client.get_experiment_by_name(study)
    for old in client.search_runs([exp.experiment_id], "tags.`rnnbench.role` = 'report'", max_results=100):
        client.delete_run(old.info.run_id)
    run = client.create_run(exp.experiment_id, run_name="report",
                            tags={"rnnbench.role": "report", "rnnbench.study": study,
                                  "mlflow.note.content": "The study's report: open index.html under Artifacts."})
    client.log_artifacts(run.info.run_id, str(out))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
