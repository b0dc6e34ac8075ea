"""The study file: a YAML document validated strictly; every error names the file and the field.

A study crosses tasks (each list-valued setting is a ladder: one cell per value) with variants, and with
the model's capacity where ``model.hidden_size`` or ``model.param_budget`` is a list (a ladder too);
every (task settings, variant, capacity) is a *cell* with its own two Optuna studies (search and replicates).
See README "Study files".

torch is imported only inside the functions that build tasks and variants (through ``tasks``, ``variants``
and ``studies.training``, which import it): this module itself does not, so that ``rnnbench status`` on a
prepared study answers without torch's import (about 2.7 s); see :func:`load`'s ``deep``.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import re
import sys
import typing
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)

if TYPE_CHECKING:
    from tasks import Task

# Hyperparameters a search space may name, and the section of the study file holding their fixed value.
MODEL_PARAMS = ("hidden_size", "num_layers", "dropout")
TRAIN_PARAMS = ("lr", "batch_size", "grad_clip", "weight_decay", "optimizer", "momentum", "nesterov")
# A search space may also name a variant's switch: ``switches.forget_bias``. It is that name in Optuna too
# (what the importance figure reads), and the MLflow param ``switch.forget_bias``, as for fixed switches.
SWITCH = "switches."
# Model fields that may be a list, a ladder of capacities: one cell per value (see Model, Cell.capacity).
CAPACITY = ("hidden_size", "param_budget")
_POSITIVE = TypeAdapter(Annotated[int, Field(ge=1)])


class SpecError(ValueError):
    """A mistake in a study file; the message is one line naming the file and the field."""


class _Loader(yaml.SafeLoader):
    """YAML as study files mean it: safe; ``1e-3`` is a number (YAML 1.1 reads exponents without a dot as
    text); a key given twice in one mapping is an error (YAML keeps the last, silently dropping the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def read_yaml(text: str):
    """Parse YAML text the way study files and --set values are read (:class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v, info: ValidationInfo):
        """pydantic reads true/false as 1/0 where a number is expected (``trials: true`` ran 1 trial): refused.
        A field's own before-validator sees the raw value first (``population: off``, which YAML makes false)."""
        if isinstance(v, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, not {str(v).lower()}")
        return v


def _admits_bool(annotation) -> bool:
    """Whether a field's type takes a bool as itself (bool, Any, or a union or container holding one)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(a) for a in typing.get_args(annotation) if not isinstance(a, (str, int, float)))


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
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical takes 'choices' only")
            twice = [c for i, c in enumerate(self.choices) if c in self.choices[:i]]
            if twice:
                raise ValueError(f"choice {twice[0]!r} appears twice")
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
            if self.step is not None:
                self._check_step()
        return self

    def _check_step(self):
        # Optuna refuses log with a step, and silently lowers a high that is not low + k * step (a warning
        # only), so the range would not be the one written; it computes in decimals, and so do we.
        if self.log:
            raise ValueError("log and step cannot be combined (Optuna samples a log scale without steps)")
        if self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        if self.type == "int" and self.step != int(self.step):
            raise ValueError(f"int step must be a whole number (got {self.step})")
        low, high, step = (Decimal(str(x)) for x in (self.low, self.high, self.step))
        span = high - low
        if span % step:
            fit = (span // step) * step + low
            fit = int(fit) if self.type == "int" else float(fit)
            raise ValueError(f"high - low is not a multiple of step ({self.step:g}); "
                             f"Optuna would lower high to {fit}: write high: {fit}")


class VariantEntry(Strict):
    """``lstm`` or ``{variant: lstm, label: lstm_fb1, switches: {forget_bias: 1.0}, search_space: {...}}``."""

    variant: str
    label: str | None = None
    switches: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, Param] = Field(default_factory=dict)  # overrides the study's, per name

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        if (info.context or {}).get("deep", True):  # the registries import torch: see load's ``deep``
            from variants import check_switches, get_variant
            get_variant(self.variant)
            check_switches(self.variant, self.switches)
        return self

    @property
    def name(self) -> str:
        return self.label or self.variant


class Model(Strict):
    hidden_size: int | list[int] = 64  # a list is a ladder: one cell per value
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    match: Literal["width", "params"] = "width"
    param_budget: int | list[int] | None = None  # with match: params, hidden size is derived per variant

    @field_validator(*CAPACITY, mode="plain")
    @classmethod
    def _capacity(cls, v, info: ValidationInfo):
        """A positive int (the message an ``int >= 1`` field gives), or a ladder of distinct ones."""
        if v is None and info.field_name == "param_budget":
            return None
        if not isinstance(v, list):
            return _positive(v)
        if not v:
            raise ValueError("a ladder needs at least one value")
        values = []
        for x in v:
            try:
                values.append(_positive(x))
            except ValueError as e:
                raise ValueError(f"ladder value {x!r}: {str(e)[:1].lower()}{str(e)[1:]}") from None
        twice = [x for j, x in enumerate(values) if x in values[:j]]
        if twice:
            raise ValueError(f"value {twice[0]!r} appears twice in the ladder")
        return values

    @model_validator(mode="after")
    def _check(self):
        if self.match == "params" and self.param_budget is None:
            raise ValueError("match: params needs param_budget")
        if self.match == "width" and self.param_budget is not None:
            raise ValueError("param_budget only applies with match: params")
        if self.match == "params" and isinstance(self.hidden_size, list):
            raise ValueError("a ladder of hidden_size needs match: width (with match: params the hidden size "
                             "is derived from param_budget: make param_budget the ladder)")
        if self.match == "params" and "hidden_size" in self.model_fields_set:
            raise ValueError(f"hidden_size {self.hidden_size} would be ignored: with match: params each variant's "
                             "hidden size is derived from param_budget; remove hidden_size")
        return self

    @property
    def ladder(self) -> str | None:
        """The capacity field given as a list (``hidden_size`` or ``param_budget``), None if neither is."""
        return next((f for f in CAPACITY if isinstance(getattr(self, f), list)), None)

    def capacities(self) -> list[Model]:
        """This section once per capacity value: itself without a ladder, else one copy per ladder value."""
        field = self.ladder
        return [self] if field is None else [self.model_copy(update={field: x}) for x in getattr(self, field)]


def _positive(v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, not {str(v).lower()}")
    try:
        return _POSITIVE.validate_python(v)
    except ValidationError as e:
        raise ValueError(e.errors()[0]["msg"]) from None


class Train(Strict):
    steps: int | None = Field(300, ge=1)
    seconds: float | None = Field(None, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"  # Greff et al. 2017 searched SGD with momentum
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    nesterov: bool = False  # sgd only; needs momentum > 0
    # Replicate runs of a cell, and its search trials where only lr, grad_clip or weight_decay are searched,
    # trained as one population module (studies/population.py): off, auto (where the measured rule says it
    # pays), or the most members per population. Not part of a cell's definition.
    population: Literal["off", "auto"] | Annotated[int, Field(ge=1)] = "auto"

    @field_validator("population", mode="before")
    @classmethod
    def _population(cls, v):
        if isinstance(v, bool):  # YAML reads `off` as false
            return "off" if v is False else "auto"
        if v in ("off", "auto") or (isinstance(v, int) and v >= 1):
            return v
        raise ValueError(f"expected off, auto or the most members per population (1 or more), got {v!r}")

    @model_validator(mode="after")
    def _check(self):
        if self.steps is None and self.seconds is None:
            raise ValueError("give a budget: steps, seconds, or both")
        if self.seconds is not None and isinstance(self.population, int) and self.population > 1:
            raise ValueError(f"population {self.population} with a seconds budget: a population's members share one "
                             "clock, so each would train for a fraction of train.seconds; set population to off or "
                             "auto (both train one by one under a seconds budget), or give a steps budget only")
        return self

    @property
    def pooled(self) -> Literal["off", "auto"] | int:
        """``population`` as the engine applies it: off under a seconds budget, where members trained together
        would split one run's wall-clock time."""
        return "off" if self.seconds is not None else self.population


# Train fields added after studies were run: they enter a cell's fingerprint only when not at their
# default, so a study prepared before they existed keeps its fingerprint (and stays resumable).
_LATER_TRAIN_FIELDS = ("optimizer", "momentum", "nesterov")  # population never enters: see cell_fingerprint


class Objective(Strict):
    metric: str = "loss"
    direction: Literal["minimize", "maximize"] = "minimize"


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    # Python files (relative to the study file) or dotted module names imported before the rest is
    # validated: a user's own cells and tasks (``variants.register``, ``tasks.register``).
    imports: list[str] = Field(default_factory=list)
    seed: int = 0
    tasks: list[dict[str, Any]] = Field(min_length=1)
    variants: list[VariantEntry] = Field(min_length=1)
    model: Model = Model()
    train: Train = Train()
    search_space: dict[str, Param] = Field(default_factory=dict)
    trials: int = Field(8, ge=1)  # ended trials per cell
    # Search trials are sampled in generations of this many: the trial in slot s sees exactly the trials
    # of the generations before s // generation, so results do not depend on the number of workers.
    generation: int = Field(4, ge=1)
    replicates: int = Field(5, ge=0)  # seeds the best configuration of each cell is retrained with
    sampler: Literal["tpe", "random", "grid", "qmc"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    objective: Objective = Objective()
    reference: str | None = None  # the variant label reports compare against; default lstm, else the first
    # Filled by :func:`load`: each entry of ``imports`` -> (sha256 of its source, its file); the effective
    # study text (the file's, or with ``--set`` overrides the YAML they give) and the overrides.
    _imported: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)
    _text: str = PrivateAttr("")
    _overrides: tuple[str, ...] = PrivateAttr(())
    _deep: bool = PrivateAttr(True)

    @property
    def deep(self) -> bool:
        """Whether :func:`load` made every check, those needing the task and variant classes included."""
        return self._deep

    @property
    def text(self) -> str:
        """The effective study text: what is hashed and stored in MLflow as the study's description."""
        return self._text

    @property
    def overrides(self) -> tuple[str, ...]:
        """The ``--set KEY=VALUE`` overrides applied to the study file, as given."""
        return self._overrides

    @property
    def imported(self) -> dict[str, str]:
        """Each entry of ``imports``, as written, and the SHA-256 of its source ("" if it has no file)."""
        return {entry: sha for entry, (sha, _) in self._imported.items()}

    @property
    def import_tags(self) -> dict[str, str]:
        """``rnnbench.import.<entry>``: the SHA-256 of each imported module, as MLflow tags (the entry made a
        valid tag name: no leading slash or '..', only letters, digits and ``_-. /``)."""
        def key(entry):
            return "rnnbench.import." + re.sub(r"[^\w.\- /]", "_", entry).replace("..", "__").lstrip("/")
        return {key(entry): sha for entry, sha in self.imported.items()}

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
            for i, v in enumerate(self.variants):
                space = {**self.search_space, **v.search_space}
                for name, p in space.items():
                    if p.type != "categorical":
                        where = f"variants[{i}].search_space" if name in v.search_space else "search_space"
                        raise ValueError(f"sampler: grid needs categorical search spaces; {where}.{name} is {p.type}")
                points = math.prod(len(p.choices) for p in space.values())
                if self.trials > points:
                    raise ValueError(f"trials: {self.trials} trials exceed the {points} point"
                                     f"{'s' * (points != 1)} of variant {v.name!r}'s grid; set trials to at most "
                                     f"{points}")
        return self


@dataclass(frozen=True)
class Cell:
    """One (task settings, variant, capacity): the unit with its own Optuna studies (search, replicates) and MLflow
    parent run."""

    task: str
    settings: tuple[tuple[str, Any], ...]  # as given in the study file, ladder value filled in
    variant: VariantEntry
    search_space: tuple[tuple[str, Param], ...]
    model: Model  # the study's model section, with this cell's value where a capacity is a ladder
    capacity: str | None = None  # that ladder's field (hidden_size or param_budget); None without one

    @property
    def key(self) -> str:
        """``adding(seq_len=50)/lstm``; with a capacity ladder ``adding(seq_len=50)/lstm(hidden_size=64)``."""
        args = ",".join(f"{k}={v}" for k, v in self.settings)
        size = f"({self.capacity}={self.capacity_value})" if self.capacity else ""
        return f"{self.task}({args})/{self.variant.name}{size}"

    @property
    def capacity_value(self) -> int | None:
        return getattr(self.model, self.capacity) if self.capacity else None

    @property
    def ladder(self) -> str:
        """The task's difficulty knob (e.g. seq_len)."""
        from tasks import get_task_class
        return get_task_class(self.task).ladder

    def build_task(self):
        from tasks import build_task
        return build_task(self.task, **dict(self.settings))

    @property
    def ladder_value(self):
        from tasks import get_task_class
        return dict(self.settings).get(self.ladder, getattr(get_task_class(self.task), self.ladder, None))

    def switches(self, hp: dict[str, Any] | None = None) -> dict[str, Any]:
        """The variant's switches: the fixed ones, and those a trial drew (``hp``'s ``switches.*`` names)."""
        drawn = {k.removeprefix(SWITCH): v for k, v in (hp or {}).items() if k.startswith(SWITCH)}
        return {**self.variant.switches, **drawn}

    def hidden_size(self, task: Task, hp: dict[str, Any]) -> int:
        """The recurrent width for a trial's hyperparameters ``hp``: its hidden_size, or with ``match: params``
        the width whose parameter count comes nearest the capacity's param_budget, with the drawn switches."""
        if self.model.match == "width":
            return int(hp["hidden_size"])
        from studies.training import rnn_input_size
        from variants import hidden_for_param_budget
        return hidden_for_param_budget(self.variant.variant, rnn_input_size(task), self.model.param_budget,
                                       num_layers=int(hp["num_layers"]), output_size=task.output_size,
                                       **self.switches(hp))



def cells(spec: Spec) -> list[Cell]:
    """Every cell of the study, in study-file order (task entries, ladder values, capacities, variants)."""
    out = []
    for entry in spec.tasks:
        name, settings = entry["task"], {k: v for k, v in entry.items() if k != "task"}
        ladders = [[(k, x) for x in v] if isinstance(v, list) else [(k, v)] for k, v in settings.items()]
        for combo in itertools.product(*ladders):
            for model in spec.model.capacities():
                for v in spec.variants:
                    space = {**spec.search_space, **v.search_space}
                    out.append(Cell(name, tuple(combo), v, tuple(space.items()), model, spec.model.ladder))
    return out


def cell_fingerprint(spec: Spec, cell: Cell, imports: dict[str, str] | None = None) -> str:
    """Hash of everything that determines a cell's trials (not the trial count or replicate count);
    ``imports``: the hashes of its imported modules in place of the files' now (those it was prepared with)."""
    payload = {"task": cell.task, "settings": cell.settings, "variant": cell.variant.model_dump(),
               "space": {k: p.model_dump() for k, p in cell.search_space},
               **spec.model_dump(include={"seed", "model", "train", "sampler", "pruner", "objective", "generation"})}
    payload["model"] = cell.model.model_dump()  # the cell's capacity, not the ladder (without one: the same)
    for name in _LATER_TRAIN_FIELDS:
        if payload["train"][name] == Train.model_fields[name].default:
            del payload["train"][name]
    del payload["train"]["population"]  # how replicates are executed, not what they compute
    imports = cell_imports(spec, cell) if imports is None else imports
    if imports:  # an edited cell or task is a changed cell
        payload["imports"] = imports
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_imports(spec: Spec, cell: Cell) -> dict[str, str]:
    """The imported modules a cell depends on, with their SHA-256: the one defining its variant or task;
    and every one defining neither a variant nor a task of the study (a helper: it may touch anything).
    So editing ``mingru.py`` changes the mingru cells only, and adding an import extends a study."""
    if not spec._imported:
        return {}
    owners: dict[str, set[tuple[str, str]]] = {}  # file -> the (kind, name) of the study's cells it defines
    for c in cells(spec):
        for used in (("variant", c.variant.variant), ("task", c.task)):
            file = _defined_in(*used)
            if file:
                owners.setdefault(file, set()).add(used)
    mine = {("variant", cell.variant.variant), ("task", cell.task)}
    return {entry: sha for entry, (sha, file) in spec._imported.items()
            if file not in owners or owners[file] & mine}


def _defined_in(kind: str, name: str) -> str | None:
    """The source file of the class behind a variant or task name (None if unknown)."""
    from tasks import get_task_class
    from variants import VARIANTS
    try:
        cls = (inspect.getclosurevars(VARIANTS[name].build).nonlocals.get("cls") if kind == "variant"
               else get_task_class(name))
        return str(Path(inspect.getfile(cls)).resolve())
    except (KeyError, TypeError, ValueError, OSError):
        return None


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


def study_name(study: str) -> str:
    """The study a command names: a study file's (or shipped study's) ``name``, else ``study`` itself (a
    study in the store). Reads the file's ``name`` only: a report needs no valid study file."""
    p = Path(study)
    if not p.is_file() and p.suffix == "" and shipped(study).exists():
        p = shipped(study)
    if not p.is_file():
        return study
    try:
        data = read_yaml(_read(p))
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise SpecError(f"{p}: no study 'name' in it; give a study file, a shipped study or a study name")
    return data["name"]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load(path_or_name: str | Path, overrides: tuple[str, ...] | list[str] = (),
         deep: bool = True) -> tuple[Spec, Path, str]:
    """Parse and validate a study file. Returns (spec, path, sha256 of the effective study text).

    ``overrides``: ``KEY=VALUE`` strings (``rnnbench run --set``), each VALUE read as YAML, KEY a dotted path
    into the study file's mapping (``train.steps``, ``tasks[0].seq_len``), applied before validation; an
    error in an overridden field names the override. With overrides, the effective text is the YAML they
    give, headed by a comment listing them (``Spec.text``).

    Everything a trial would trip over is refused here, before anything is written: every task setting
    and variant is built once, the objective is looked up in each task's metrics, and every value the
    search space can draw is checked against what the model and Optuna accept.

    ``deep=False`` leaves out the checks that need the task and variant classes (they import torch): names of
    tasks, task settings, variants and switches, building each task and variant, the objective's metric. What
    is left is the structure, types and ranges of every field, ladders, search spaces and the reference. The
    cells and their fingerprints are the same. ``rnnbench status`` uses it for a study whose every cell the
    store holds with this fingerprint (``run`` made the deep checks when it prepared them), and loads deeply
    otherwise. A study file with ``imports`` is always loaded deeply (its cells and tasks are its modules').
    ``Spec.deep`` says which was done.
    """
    path = resolve(str(path_or_name))
    text = _read(path)
    try:
        data = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever YAML says
        raise SpecError(f"{path}{where}: not valid YAML ({why})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a study file is a mapping with at least 'name', 'tasks' and 'variants'")
    overrides = tuple(overrides)
    parsed = [_apply_override(data, override) for override in overrides]
    if overrides:
        text = (f"# {path.name} with " + " ".join(f"--set {o}" for o in overrides) + "\n"
                + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def blame(field: str) -> str:  # the file, or the last override that set this field (or within it)
        for override, (keys, created) in reversed(list(zip(overrides, parsed))):
            written = _loc(tuple(keys))
            if _within(field, written) or _within(written, field) or _within(field, _loc(tuple(created))):
                return f"--set {override}"
        return str(path)
    deep = deep or bool(data.get("imports"))
    try:
        imported = _import(path, data.get("imports"))
    except SpecError as e:
        raise SpecError(str(e).replace(f"{path}: imports:", f"{blame('imports')}: imports:", 1)) from e.__cause__
    try:
        spec = Spec.model_validate(data, context={"deep": deep})
        spec._imported = imported
        spec._text, spec._overrides, spec._deep = text, overrides, deep
        _check_space("search_space", spec.search_space, spec)
        for i, v in enumerate(spec.variants):
            _check_space(f"variants[{i}].search_space", v.search_space, spec)
        if deep:
            _check_switch_space(spec)
        _check_optimizer(spec)
        if deep:
            tasks = _build_tasks(spec)
            _check_objective(spec, tasks)
            _check_variants(spec, tasks)
            _check_user_variants(spec, tasks)
        else:
            for i, entry in enumerate(spec.tasks):
                _, settings = _task_entry(i, entry)
                empty = [k for k, v in settings.items() if v == []]
                if empty:
                    raise SpecError(f"tasks[{i}].{empty[0]}: a ladder needs at least one value")
        labels = [v.name for v in spec.variants]
        if spec.reference_label not in labels:
            raise SpecError(f"reference: {spec.reference!r} is not among the variants ({', '.join(labels)})")
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        field = _loc(err["loc"])
        if not err["loc"]:  # a check of the whole study (Spec._check): its message starts with the field
            lead = msg.split(":", 1)[0]
            field = lead if re.fullmatch(r"[\w.\[\]]+", lead) else ""
        raise SpecError((f"{blame(field)}: {field}: {msg}" if err["loc"] else f"{blame(field)}: {msg}")
                        + _own_hint(msg, data)) from None
    except SpecError as e:  # from the checks above: "field: message"
        field = str(e).split(":", 1)[0] if ":" in str(e) else ""
        raise SpecError(f"{blame(field)}: {e}{_own_hint(str(e), data)}") from None
    return spec, path, hashlib.sha256(text.encode()).hexdigest()


def _own_hint(message: str, data: dict) -> str:
    """For an unknown variant or task in a study file that imports nothing: where a user's own one comes from."""
    unknown = "unknown variant" in message or "unknown task" in message
    return " (your own? list its file under `imports:`)" if unknown and not data.get("imports") else ""


def _override_keys(override: str) -> tuple[list[str | int], Any]:
    """``tasks[0].seq_len=[10, 20]`` -> (["tasks", 0, "seq_len"], [10, 20]). A search space's ``switches.NAME``
    is one key: ``search_space.switches.forget_bias.high=3`` -> (["search_space", "switches.forget_bias",
    "high"], 3)."""
    key, eq, value = override.partition("=")
    if not eq or not key.strip():
        raise SpecError(f"--set {override}: expected KEY=VALUE, e.g. --set train.steps=200")
    keys: list[str | int] = []
    for part in key.strip().split("."):
        m = re.fullmatch(r"([A-Za-z_][\w-]*)((?:\[\d+\])*)", part)
        if not m:
            raise SpecError(f"--set {override}: {key!r} is not a field path (e.g. train.steps, tasks[0].seq_len)")
        if len(keys) >= 2 and keys[-2] == "search_space" and keys[-1] == SWITCH.rstrip("."):
            keys[-1] += "." + m.group(1)
        else:
            keys.append(m.group(1))
        keys += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    try:
        parsed = read_yaml(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise SpecError(f"--set {override}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return keys, parsed


def _apply_override(data: dict, override: str) -> tuple[list[str | int], list[str | int]]:
    """Set one ``KEY=VALUE`` in the study file's mapping (missing mappings on the way are created; list
    entries must exist). Returns the path it set, and that of the outermost mapping it created ([] if none)."""
    keys, value = _override_keys(override)
    node: Any = data
    created: list[str | int] = []
    for i, k in enumerate(keys):
        where = _loc(tuple(keys[:i])) or "the study file"
        last = i == len(keys) - 1
        if isinstance(k, int):
            if not isinstance(node, list):
                raise SpecError(f"--set {override}: {where} is not a list")
            if k >= len(node):
                raise SpecError(f"--set {override}: {where} has {len(node)} entries (indices from 0)")
        elif not isinstance(node, dict):
            raise SpecError(f"--set {override}: {where} is not a mapping")
        elif not last and node.get(k) is None:
            node[k] = {} if isinstance(keys[i + 1], str) else []
            created = created or keys[:i + 1]
        if last:
            node[k] = value
        else:
            node = node[k]
    return keys, created


def _within(field: str, prefix: str) -> bool:
    """Whether field path ``field`` is ``prefix`` or lies inside it (``tasks[0].seq_len`` in ``tasks[0]``)."""
    return bool(prefix) and (field == prefix or field.startswith(prefix + ".") or field.startswith(prefix + "["))


def _import(path: Path, entries: Any) -> dict[str, tuple[str, str]]:
    """Import the study file's ``imports`` (relative to its folder), so the names they register can be
    validated; returns each entry -> (sha256 of its source, its file)."""
    if entries is None:
        return {}
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise SpecError(f"{path}: imports: a list of Python files (relative to the study file) or dotted "
                        f"module names, e.g. imports: [my_cell.py]")
    from variants.imports import UserModuleError, import_user_modules
    out = {}
    for entry in entries:
        try:
            sha = import_user_modules([entry], path.parent)[entry]
        except UserModuleError as e:  # chained, so `rnnbench --debug` can show the module's traceback
            raise SpecError(f"{path}: imports: {e}") from e
        if entry.endswith(".py") or "/" in entry or "\\" in entry:
            file = str((path.parent / entry).resolve())
        else:
            file = getattr(sys.modules.get(entry), "__file__", None) or ""
            file = str(Path(file).resolve()) if file else ""
        out[entry] = (sha, file)
    return out


def _read(path: Path) -> str:
    if path.is_dir():
        raise SpecError(f"{path}: is a directory, not a study file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                        f"save the study file as UTF-8") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror})") from None


def _check_space(where: str, space: dict[str, Param], spec: Spec) -> None:
    """Every value a search-space entry can draw must be one the study file could set directly, in
    ``model`` or ``train`` (same type, same range), so a trial never gets a value the model refuses."""
    allowed = MODEL_PARAMS + TRAIN_PARAMS
    for name, p in space.items():
        if name.startswith(SWITCH) and name != SWITCH:
            continue  # a variant's switch: see _check_switch_space
        if name not in allowed:
            raise SpecError(f"{where}: unknown hyperparameter {name!r}; allowed: {', '.join(allowed)}, "
                            f"or {SWITCH}NAME for a switch of the variants it applies to")
        field, section = f"{where}.{name}", Model if name in MODEL_PARAMS else Train
        annotation = int if name in CAPACITY else section.model_fields[name].annotation  # one value per trial
        kind = "int" if annotation is int else "float" if annotation in (float, float | None) else None
        if kind is None and p.type != "categorical":
            raise SpecError(f"{field}: takes type categorical, not {p.type}")
        if p.type not in (kind, "categorical"):
            raise SpecError(f"{field}: takes type {kind} or categorical, not {p.type}")
        if name == "hidden_size" and spec.model.match == "params":
            raise SpecError(f"{field}: with match: params the hidden size is derived from model.param_budget; "
                            f"remove hidden_size from the search space, or use match: width")
        if name == spec.model.ladder:
            raise SpecError(f"{field}: model.{name} is a ladder (one cell per value); ladder it or search it, "
                            f"not both")
        drawn = [("choice", c) for c in p.choices] if p.type == "categorical" else [("low", p.low), ("high", p.high)]
        for label, value in drawn:
            value = int(value) if p.type == "int" else value
            try:
                if name in CAPACITY:
                    _POSITIVE.validate_python(value, strict=True)
                else:
                    section.model_validate({name: value}, strict=True)
            except ValidationError as e:
                msg = e.errors()[0]["msg"]
                raise SpecError(f"{field}: {label} {value!r} is not a valid {name} "
                                f"({msg[0].lower()}{msg[1:]})") from None


def _space(spec: Spec, i: int) -> dict[str, tuple[Param, str]]:
    """Variant ``i``'s search space (the study's, overridden per name by the variant's): name -> (param,
    the field that sets it)."""
    v = spec.variants[i]
    out = {name: (p, f"search_space.{name}") for name, p in spec.search_space.items()}
    out.update({name: (p, f"variants[{i}].search_space.{name}") for name, p in v.search_space.items()})
    return out


def _check_switch_space(spec: Spec) -> None:
    """A searched ``switches.NAME`` must be a switch of every variant the space applies to, not fixed in the
    variant's entry as well, and of a type its default allows (a bool or string switch: categorical)."""
    from variants import get_variant
    for i, v in enumerate(spec.variants):
        allowed = get_variant(v.variant).switches
        for name, (p, field) in _space(spec, i).items():
            if not name.startswith(SWITCH):
                continue
            switch = name.removeprefix(SWITCH)
            if switch not in allowed:
                listed = ", ".join(SWITCH + k for k in sorted(allowed)) or "none"
                raise SpecError(f"{field}: variant {v.name!r} ({v.variant}) has no switch {switch!r}; "
                                f"searchable switches: {listed}")
            if switch in v.switches:
                raise SpecError(f"{field}: switch {switch!r} is also fixed in variants[{i}].switches; "
                                f"fix it or search it, not both")
            default = allowed[switch]
            if isinstance(default, (bool, str)) and p.type != "categorical":
                raise SpecError(f"{field}: switch {switch!r} is a {type(default).__name__} "
                                f"(default {default!r}); search it as type categorical")


def _check_optimizer(spec: Spec) -> None:
    """``momentum`` and ``nesterov`` are SGD's; Nesterov needs momentum > 0 (torch refuses otherwise)."""
    for i, v in enumerate(spec.variants):
        space = _space(spec, i)

        def values(name):
            if name in space:
                return _param_values(space[name][0]), space[name][1]
            return [getattr(spec.train, name)], f"train.{name}"
        optimizers, _ = values("optimizer")
        nesterov, n_field = values("nesterov")
        momentum, m_field = values("momentum")
        if True in nesterov and "sgd" not in optimizers:
            raise SpecError(f"{n_field}: Nesterov momentum is for optimizer sgd; optimizer is "
                            f"{' or '.join(map(str, optimizers))} (variant {v.name!r})")
        if True in nesterov and min(momentum) == 0:
            raise SpecError(f"{n_field}: Nesterov momentum needs momentum > 0; {m_field} can be 0 "
                            f"(variant {v.name!r})")
        if max(momentum) > 0 and "sgd" not in optimizers:
            raise SpecError(f"{m_field}: momentum is for optimizer sgd; optimizer is "
                            f"{' or '.join(map(str, optimizers))} (variant {v.name!r})")


def _build_tasks(spec: Spec) -> list[Task]:
    """Every task setting of the study (one per ladder value), each built once: impossible settings, a value
    repeated in a ladder and two entries with the same settings are refused (each would be a second cell
    with one key, or one data set under two keys)."""
    from tasks import TaskSettingError, build_task, get_task_class
    built, seen = [], {}
    for i, entry in enumerate(spec.tasks):
        name, settings = _task_entry(i, entry)
        try:
            get_task_class(name)
            empty = [k for k, v in settings.items() if v == []]
            if empty:
                raise TaskSettingError(f"{name}.{empty[0]}: a ladder needs at least one value")
            for combo in itertools.product(*[v if isinstance(v, list) else [v] for v in settings.values()]):
                task = build_task(name, **dict(zip(settings, combo)))
                key = json.dumps([name, task.settings()], sort_keys=True, default=str)  # defaults filled in
                if key in seen:
                    described = ", ".join(f"{k}={v}" for k, v in task.settings().items())
                    raise SpecError(f"tasks[{i}]: same task and settings as tasks[{seen[key]}] ({name}: {described}); "
                                    f"each cell must appear once")
                seen[key] = i
                built.append(task)
        except TaskSettingError as e:
            raise SpecError(f"tasks[{i}]: {e}") from None
    return built


def _task_entry(i: int, entry: dict) -> tuple[str, dict[str, Any]]:
    """Task entry ``i``'s name and settings, checked as far as no task class is needed: a name is given,
    and no ladder repeats a value."""
    if "task" not in entry:
        raise SpecError(f"tasks[{i}]: missing 'task' (the task's name)")
    name = entry["task"]
    if not isinstance(name, str):
        from tasks import TASKS
        raise SpecError(f"tasks[{i}].task: must be a task name, got {name!r}; known: {', '.join(sorted(TASKS))}")
    settings = {k: v for k, v in entry.items() if k != "task"}
    for k, v in settings.items():
        twice = [x for j, x in enumerate(v) if x in v[:j]] if isinstance(v, list) else []
        if twice:
            raise SpecError(f"tasks[{i}].{k}: value {twice[0]!r} appears twice in the ladder")
    return name, settings


def _check_objective(spec: Spec, tasks: list[Task]) -> None:
    """The objective must be a metric every task reports: each task draws a two-sequence batch and scores a
    random output once (loss and metrics, as a trial does), to learn the metrics' names. A task that raises
    there (a user's, most likely) stops the study at load with its error, not every trial."""
    import torch
    metric = spec.objective.metric
    for task in tasks:
        try:
            batch = task.sample(2, torch.Generator().manual_seed(0))
            out = torch.randn(*batch.x.shape[:2], task.output_size)
            task.loss(out, batch)
            reported = list(task.metrics(out, batch))
        except Exception as e:  # noqa: BLE001 - the task's code: any error is the message
            i = next(i for i, entry in enumerate(spec.tasks) if entry.get("task") == task.name)
            text = str(e).strip().splitlines()
            described = ", ".join(f"{k}={v}" for k, v in task.settings().items())
            raise SpecError(f"tasks[{i}]: task {task.name!r} ({described}) fails on a two-sequence batch: "
                            f"{type(e).__name__}" + (f": {text[0]}" if text else "")
                            + f"; `rnnbench check task {task.name}` runs every check") from e
        if metric not in reported:
            raise SpecError(f"objective.metric: task {task.name!r} does not report {metric!r}; "
                            f"it reports: {', '.join(reported)}")


def _check_variants(spec: Spec, tasks: list[Task]) -> None:
    """Build each variant once with its switches at every width, depth, dropout and searched switch value
    a trial may give it (for its shapes only: ``variants.shapes_only``), so contradictory switches or a width
    the variant refuses (clockwork: a multiple of ``modules``) stop the study at load, not in every trial.
    With ``match: params`` the width is the one trials derive for each task's input and output sizes."""
    from studies.training import rnn_input_size
    from variants import build_variant, count_parameters, hidden_for_param_budget, shapes_only
    shapes = sorted({(rnn_input_size(t), t.output_size) for t in tasks})
    user = _user_variants(spec)
    for i, v in enumerate(spec.variants):
        dropouts = [(x, where) for x, where in _drawn(spec, i, "dropout") if x]
        if dropouts and max(x for x, _ in _drawn(spec, i, "num_layers")) == 1:  # every variant's convention
            raise SpecError(f"{dropouts[0][1]}: dropout {dropouts[0][0]} does nothing with num_layers 1 (it acts "
                            "between stacked layers): set num_layers to 2 or more, or leave dropout at 0")
        searched = [name for name in _space(spec, i) if name.startswith(SWITCH)]
        drawn = [_drawn(spec, i, name) for name in MODEL_PARAMS + tuple(searched)]
        budgets = spec.model.param_budget if isinstance(spec.model.param_budget, list) else [spec.model.param_budget]
        widths: dict[tuple, int] = {}  # (task shape, depth, switches, width) -> the budget that gave it
        for budget, ((hidden, source), (layers, _), (dropout, _), *values) in itertools.product(
                budgets, itertools.product(*drawn)):
            switches = {**v.switches, **{k.removeprefix(SWITCH): x for k, (x, _) in zip(searched, values)}}
            drew = "".join(f", {k}={x!r} from {where}" for k, (x, where) in zip(searched, values))
            if spec.model.match == "params":  # the width is derived per variant and task: one that builds
                hidden, source = None, f"model.param_budget {budget}"
            try:
                for width, outputs in shapes if spec.model.match == "params" else [(1, 0)]:
                    if spec.model.match == "params":
                        hidden = hidden_for_param_budget(v.variant, width, budget, layers, outputs, **switches)
                        twin = widths.setdefault((width, outputs, layers, repr(switches), hidden), budget)
                        if twin != budget:  # two cells would train the same model
                            raise SpecError(f"model.param_budget: {twin} and {budget} both give variant {v.name!r} "
                                            f"hidden_size {hidden}: space the ladder's values further apart")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # e.g. torch's note on dropout with one layer: trials show it
                        rnn = shapes_only(lambda: build_variant(v.variant, width, hidden, layers, dropout, **switches))
                    if spec.model.match == "params":  # a budget the smallest model overshoots
                        n = count_parameters(rnn) + (hidden + 1) * outputs
                        if n > 2 * budget:
                            raise SpecError(f"model.param_budget: {budget} is less than half the smallest "
                                            f"{v.name!r} (hidden_size {hidden}: {n} parameters with its head); "
                                            "raise the budget")
            except SpecError:
                raise
            except Exception as e:  # noqa: BLE001 - a refusal (ValueError, TypeError), or a user cell's own error
                refused = isinstance(e, (ValueError, TypeError))
                if not refused and v.variant not in user:
                    raise  # a shipped variant that fails to build is a bug
                width = source if hidden is None else f"hidden_size={hidden} from {source}"
                field = f"variants[{i}].switches" if switches else f"variants[{i}]"
                said = (str(e).strip().splitlines() or [""])[0]
                if not refused:
                    said = f"variant {v.variant!r} fails to build: {type(e).__name__}: {said}"
                raise SpecError(f"{field}: {said} ({width}, num_layers={layers}, dropout={dropout}{drew})") from None


def _check_user_variants(spec: Spec, tasks: list[Task]) -> None:
    """Run each variant a study file imported (not a shipped one) forward and backward once, on a short
    random batch at every input width its tasks give it, so a cell that raises stops the study at load
    rather than failing every trial. (``rnnbench check variant`` runs the full contract.)"""
    import torch
    from studies.training import rnn_input_size
    from variants import build_variant, hidden_for_param_budget
    shapes = sorted({(rnn_input_size(t), t.output_size) for t in tasks})
    user = _user_variants(spec)
    for i, v in enumerate(spec.variants):
        if v.variant not in user:
            continue
        (hidden, _), (layers, _), (dropout, _) = (_drawn(spec, i, name)[0] for name in MODEL_PARAMS)
        budget = spec.model.capacities()[0].param_budget
        for width, outputs in shapes:
            try:
                with torch.random.fork_rng(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if spec.model.match == "params":
                        hidden = hidden_for_param_budget(v.variant, width, budget, layers, outputs, **v.switches)
                    rnn = build_variant(v.variant, width, hidden, layers, dropout, **v.switches)
                    out, _ = rnn(torch.randn(2, 8, width))
                    if tuple(out.shape) != (2, 8, hidden):
                        raise ValueError(f"output has shape {tuple(out.shape)}, expected (2, 8, {hidden}) "
                                         f"(batch-first: batch, time, hidden)")
                    if not torch.isfinite(out).all():  # else every trial fails as "Divergence" at step 1
                        raise ValueError("output is not finite (NaN or inf) at initialisation")
                    out.sum().backward()
            except Exception as e:  # noqa: BLE001 - the user's code: any error is the message
                text = str(e).strip().splitlines()
                raise SpecError(f"variants[{i}]: variant {v.variant!r} fails on a (2, 8, {width}) batch with "
                                f"hidden_size={hidden}: {type(e).__name__}" + (f": {text[0]}" if text else "")
                                + f"; `rnnbench check variant {v.variant} --imports FILE` runs every check") from e


def _user_variants(spec: Spec) -> set[str]:
    """The variants the study file names that its imports define (not shipped ones)."""
    files = {file for _, file in spec._imported.values()}
    return {v.variant for v in spec.variants if _defined_in("variant", v.variant) in files}


def _drawn(spec: Spec, i: int, name: str) -> list[tuple[Any, str]]:
    """(value, where it is set) for the values of model setting ``name`` that variant ``i``'s trials may get
    and that settle whether all of them build: the fixed value; or every choice; or the bounds and, for an
    int, the second value (a constraint like "a multiple of m" holds for every low + k * step when it holds
    for the first two)."""
    space = _space(spec, i)
    if name not in space:
        value = getattr(spec.model, name)
        return [(x, f"model.{name}") for x in (value if isinstance(value, list) else [value])]
    p, where = space[name]
    return [(x, where) for x in _param_values(p)]


def _param_values(p: Param) -> list[Any]:
    """The values of a search-space entry that settle whether all it can draw is accepted (see _drawn)."""
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "float":
        return [p.low, p.high]
    low, high, step = int(p.low), int(p.high), int(p.step or 1)
    return sorted({low, min(low + step, high), high})
