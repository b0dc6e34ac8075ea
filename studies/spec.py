"""The study file: a YAML document validated strictly; every error names the file and the field.

A study crosses tasks (each list-valued setting is a ladder: one cell per value) with variants;
every (task settings, variant) pair is a *cell* with its own Optuna study. See README "Study files".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks import TaskSettingError, build_task, get_task_class
from variants import check_switches, get_variant

# Hyperparameters a search space may name, and the section of the study file holding their fixed value.
MODEL_PARAMS = ("hidden_size", "num_layers", "dropout")
TRAIN_PARAMS = ("lr", "batch_size", "grad_clip", "weight_decay")


class SpecError(ValueError):
    """A mistake in a study file; the message is one line naming the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Param(Strict):
    """One search-space dimension: ``{type: float, low: 1e-4, high: 1e-2, log: true}``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("categorical takes 'choices' only")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is above high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("log scale needs low > 0")
            if self.choices is not None:
                raise ValueError(f"{self.type} takes no 'choices'")
            if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError("int bounds must be whole numbers")
        return self


def _check_space(space: dict[str, Param]) -> dict[str, Param]:
    allowed = MODEL_PARAMS + TRAIN_PARAMS
    for name in space:
        if name not in allowed:
            raise ValueError(f"unknown hyperparameter {name!r}; allowed: {', '.join(allowed)}")
    return space


SearchSpace = Annotated[dict[str, Param], AfterValidator(_check_space)]


class VariantEntry(Strict):
    """``lstm`` or ``{variant: lstm, label: lstm_fb1, switches: {forget_bias: 1.0}, search_space: {...}}``."""

    variant: str
    label: str | None = None
    switches: dict[str, Any] = Field(default_factory=dict)
    search_space: SearchSpace = Field(default_factory=dict)  # overrides the study's, per name

    @model_validator(mode="after")
    def _check(self):
        get_variant(self.variant)
        check_switches(self.variant, self.switches)
        return self

    @property
    def name(self) -> str:
        return self.label or self.variant


class Model(Strict):
    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    match: Literal["width", "params"] = "width"
    param_budget: int | None = Field(None, ge=1)  # with match: params, hidden size is derived per variant

    @model_validator(mode="after")
    def _check(self):
        if self.match == "params" and self.param_budget is None:
            raise ValueError("match: params needs param_budget")
        if self.match == "width" and self.param_budget is not None:
            raise ValueError("param_budget only applies with match: params")
        return self


class Train(Strict):
    steps: int | None = Field(300, ge=1)
    seconds: float | None = Field(None, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.steps is None and self.seconds is None:
            raise ValueError("give a budget: steps, seconds, or both")
        return self


class Objective(Strict):
    metric: str = "loss"
    direction: Literal["minimize", "maximize"] = "minimize"


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    tasks: list[dict[str, Any]] = Field(min_length=1)
    variants: list[VariantEntry] = Field(min_length=1)
    model: Model = Model()
    train: Train = Train()
    search_space: SearchSpace = Field(default_factory=dict)
    trials: int = Field(8, ge=1)  # ended trials per cell
    replicates: int = Field(5, ge=0)  # seeds the best configuration of each cell is retrained with
    sampler: Literal["tpe", "random", "grid", "qmc"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    objective: Objective = Objective()
    reference: str | None = None  # the variant label reports compare against; default lstm, else the first

    @property
    def reference_label(self) -> str:
        labels = [v.name for v in self.variants]
        return self.reference or ("lstm" if "lstm" in labels else labels[0])

    @field_validator("variants", mode="before")
    @classmethod
    def _variant_names(cls, v):
        return [{"variant": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _check(self):
        labels = [v.name for v in self.variants]
        dupes = sorted({n for n in labels if labels.count(n) > 1})
        if dupes:
            raise ValueError(f"variants: label {dupes[0]!r} used twice; give each entry a distinct 'label'")
        if self.sampler == "grid":
            for v in self.variants:
                space = {**self.search_space, **v.search_space}
                for name, p in space.items():
                    if p.type != "categorical":
                        raise ValueError(f"sampler grid needs categorical search spaces; {name!r} is {p.type}")
                points = math.prod(len(p.choices) for p in space.values())
                if self.trials > points:
                    raise ValueError(f"trials ({self.trials}) exceeds the {points} points of variant "
                                     f"{v.name!r}'s grid; set trials to at most {points}")
        return self


@dataclass(frozen=True)
class Cell:
    """One (task settings, variant) pair: the unit with its own Optuna study and MLflow parent run."""

    task: str
    settings: tuple[tuple[str, Any], ...]  # as given in the study file, ladder value filled in
    ladder: str  # the task's difficulty knob
    variant: VariantEntry
    search_space: tuple[tuple[str, Param], ...]

    @property
    def key(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.settings)
        return f"{self.task}({args})/{self.variant.name}"

    def build_task(self):
        return build_task(self.task, **dict(self.settings))

    @property
    def ladder_value(self):
        return dict(self.settings).get(self.ladder, getattr(get_task_class(self.task), self.ladder, None))


def cells(spec: Spec) -> list[Cell]:
    """Every cell of the study, in study-file order (task entries, ladder values, variants)."""
    out = []
    for entry in spec.tasks:
        name, settings = entry["task"], {k: v for k, v in entry.items() if k != "task"}
        ladders = [[(k, x) for x in v] if isinstance(v, list) else [(k, v)] for k, v in settings.items()]
        for combo in itertools.product(*ladders):
            for v in spec.variants:
                space = {**spec.search_space, **v.search_space}
                out.append(Cell(name, tuple(combo), get_task_class(name).ladder, v, tuple(space.items())))
    return out


def cell_fingerprint(spec: Spec, cell: Cell) -> str:
    """Hash of everything that determines a cell's trials (not the trial count or replicate count)."""
    payload = {"task": cell.task, "settings": cell.settings, "variant": cell.variant.model_dump(),
               "space": {k: p.model_dump() for k, p in cell.search_space},
               **spec.model_dump(include={"seed", "model", "train", "sampler", "pruner", "objective"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shipped(name: str) -> Path:
    return Path(str(resources.files("studies") / f"{name}.yaml"))


def resolve(path_or_name: str) -> Path:
    """A study file path, or the name of a study shipped in ``studies/`` (e.g. ``quickstart``)."""
    p = Path(path_or_name)
    if p.exists():
        return p
    if p.suffix == "" and shipped(path_or_name).exists():
        return shipped(path_or_name)
    names = sorted(f.stem for f in Path(str(resources.files("studies"))).glob("*.yaml"))
    raise SpecError(f"{path_or_name}: no such study file or shipped study (shipped: {', '.join(names)})")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load(path_or_name: str | Path) -> tuple[Spec, Path, str]:
    """Parse and validate a study file. Returns (spec, path, sha256 of the file's text)."""
    path = resolve(str(path_or_name))
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a study file is a mapping with at least 'name', 'tasks' and 'variants'")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise SpecError(f"{path}: {_loc(err['loc'])}: {msg}") from None
    except ValueError as e:  # raised by registry checks inside validators
        raise SpecError(f"{path}: {e}") from None
    for i, entry in enumerate(spec.tasks):
        if "task" not in entry:
            raise SpecError(f"{path}: tasks[{i}]: missing 'task' (the task's name)")
        settings = {k: v for k, v in entry.items() if k != "task"}
        try:
            get_task_class(entry["task"])
            empty = [k for k, v in settings.items() if v == []]
            if empty:
                raise TaskSettingError(f"{entry['task']}.{empty[0]}: a ladder needs at least one value")
            for combo in itertools.product(*[v if isinstance(v, list) else [v] for v in settings.values()]):
                build_task(entry["task"], **dict(zip(settings, combo)))
        except TaskSettingError as e:
            raise SpecError(f"{path}: tasks[{i}]: {e}") from None
    labels = [v.name for v in spec.variants]
    if spec.reference_label not in labels:
        raise SpecError(f"{path}: reference: {spec.reference!r} is not among the variants ({', '.join(labels)})")
    return spec, path, hashlib.sha256(text.encode()).hexdigest()
