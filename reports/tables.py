"""The saved tables of a report: everything its figures and statistics are computed from.

A report directory holds, each as Parquet (read back by ``rnnbench report --from``) and CSV (for
people and spreadsheets):

    results    one row per trial run (search and replicate): cell, hyperparameters (param.*), final
               metrics (metric.*), objective, state, seed, run id, solved_threshold
    curves     one row per (run, metric, eval step): the per-eval learning curves
    grad_by_lag  one row per (run, phase init|trained, lag): ||d loss / d h_t|| of replicate runs
    importance one row per (cell, hyperparameter): Optuna importance of its search trials

and ``manifest.json``, whose ``collection`` part (study file, hashes, commits, versions, run ids,
objective) is what was known at collection time. Nothing else is read by ``--from``.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd

TABLES = ("results", "curves", "grad_by_lag", "importance")
MANIFEST = "manifest.json"


@dataclass
class Tables:
    results: pd.DataFrame
    curves: pd.DataFrame
    grad_by_lag: pd.DataFrame
    importance: pd.DataFrame
    collection: dict = field(default_factory=dict)

    @property
    def study(self) -> str:
        return self.collection.get("study") or (self.results.study.iloc[0] if len(self.results) else "study")

    @property
    def objective_metric(self) -> str:
        return self.collection.get("objective", {}).get("metric", "loss")

    @property
    def unit(self) -> str:
        """The runs the statistics aggregate: "replicate" runs when the study plans any (``replicates`` > 0, recorded
        by the engine) or the logs hold some, else "search" (complete search trials). A study still searching
        thus shows no runs yet rather than its search trials."""
        from reports.stats import unit_of  # what the logs alone say (stats imports this module)

        if (self.collection.get("replicates") or 0) > 0 or not len(self.results):
            return "replicate"
        return unit_of(self.results)

    @property
    def direction(self) -> str:
        return self.collection.get("objective", {}).get("direction", "minimize")

    @property
    def tasks(self) -> list[str]:
        """Tasks present, in study-file order."""
        return _ordered(self.collection.get("task_order", []), self.results.get("task", []))

    @property
    def variants(self) -> list[str]:
        """Variant labels present, in study-file order."""
        return _ordered(self.collection.get("variant_order", []), self.results.get("variant", []))

    def digest(self) -> str:
        """A hash of everything in the tables (as their CSV and the manifest write it): equal digests,
        the same report. ``report --watch`` redraws only when it changes."""
        h = hashlib.sha256()
        for name in TABLES:
            h.update(getattr(self, name).to_csv(index=False).encode())
        h.update(json.dumps(self.collection, sort_keys=True, default=str).encode())
        return h.hexdigest()

    @property
    def reference(self) -> str | None:
        """The study file's reference variant (its ``reference``, else lstm, else the first variant), whether or
        not it has runs yet (then nothing is compared, and the page says so)."""
        known = self.known_variants
        ref = self.collection.get("reference")
        if ref in known:
            return ref
        return "lstm" if "lstm" in known else (known[0] if known else None)

    @property
    def known_variants(self) -> list[str]:
        """The variants the study file names (in its order), with or without runs, and any other present."""
        return list(dict.fromkeys([*self.collection.get("variant_order", []), *self.variants]))


def package_versions(packages) -> dict[str, str]:
    """Python's and each package's installed version ("unknown" when absent)."""
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "unknown"
    return out


def _ordered(preferred, present) -> list:
    present = list(dict.fromkeys(present))
    return [x for x in preferred if x in present] + [x for x in present if x not in preferred]


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing kinds of values (e.g. a switch that is a number in one variant, a word in
    another) become text, so Parquet can store them; numbers stay numbers otherwise."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col] if v is not None and v == v}
            if len(kinds) > 1 and not kinds <= {int, float}:
                out[col] = out[col].map(lambda v: None if v is None or v != v else str(v))
    return out


def save(tables: Tables, out: Path) -> list[Path]:
    """Write every table as Parquet and CSV into ``out``; returns the files written."""
    written = []
    for name in TABLES:
        df = _arrow_safe(getattr(tables, name))
        df.to_parquet(out / f"{name}.parquet", index=False)
        df.to_csv(out / f"{name}.csv", index=False)
        written += [out / f"{name}.parquet", out / f"{name}.csv"]
    return written


def locate(path: Path) -> Path:
    """The directory of a saved report: ``path`` itself, or the folder of its ``results.parquet``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name != "results.parquet":
        raise LookupError(f"{path}: --from takes a report directory or its results.parquet")
    missing = [f"{n}.parquet" for n in TABLES if not (folder / f"{n}.parquet").exists()]
    if not (folder / MANIFEST).exists():
        missing.append(MANIFEST)
    if missing:
        raise LookupError(f"{folder}: not a saved report (missing {', '.join(missing)}); "
                          "give the folder `rnnbench report STUDY` wrote")
    return folder


def read_frames(folder: Path, collection: dict) -> Tables:
    """The tables as Parquet gives them back (what every figure is drawn from, fresh or regenerated)."""
    frames = {name: pd.read_parquet(folder / f"{name}.parquet") for name in TABLES}
    return Tables(**frames, collection=json.loads(json.dumps(collection, default=str)))


def load(path: Path) -> Tables:
    """Read a saved report's tables back (no MLflow, no Optuna)."""
    folder = locate(path)
    return read_frames(folder, json.loads((folder / MANIFEST).read_text())["collection"])
