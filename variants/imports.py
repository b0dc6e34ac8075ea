"""Import a user's own modules, so the cells and tasks they register become names a study can use.

    >>> import_user_modules(["examples/mingru.py"], base_dir=".")   # doctest: +SKIP
    {'examples/mingru.py': '9f2c...'}

A module registers by existing, as the shipped ones do: ``@variants.register(...)`` on a cell class,
``@tasks.register`` on a task dataclass. Both ``rnnbench check --imports`` and a study file's ``imports:``
go through :func:`import_user_modules`. It lives here, not in ``studies``, because the command line must
load user cells and tasks without importing the study engine, and ``studies`` may import ``variants``
but not the reverse; it touches neither registry itself, so it serves tasks as well as cells.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable

__all__ = ["UserModuleError", "import_user_modules"]


class UserModuleError(ImportError):
    """A user module could not be imported; the message is one line naming it and the exception."""


def import_user_modules(paths_or_names: Iterable[str], base_dir: str | Path = ".") -> dict[str, str]:
    """Import every entry and return ``{entry, as given: sha256 of its source file}`` ("" if it has none).

    An entry ending in ``.py`` or holding a ``/`` is a file, relative to ``base_dir`` (a study file's
    folder; the working directory on the command line), imported as a module named after its stem.
    Any other entry is a dotted module name, imported with ``base_dir`` first on ``sys.path``.
    A file or module already imported, under any name, is not imported again (its ``register`` calls
    would clash), so callers may repeat themselves. A failure raises :class:`UserModuleError`.
    """
    base = Path(base_dir)
    return {entry: _sha256(_import_file(base / entry, entry) if _is_path(entry) else _import_name(entry, base))
            for entry in paths_or_names}


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def _loaded(path: Path) -> ModuleType | None:
    """The module already imported from ``path``, under whatever name."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == path:
            return module
    return None


def _fail(entry: str, e: BaseException) -> UserModuleError:
    text = str(e).strip().splitlines()
    return UserModuleError(f"{entry}: {type(e).__name__}" + (f": {text[0]}" if text else ""))


def _import_file(path: Path, entry: str) -> ModuleType:
    path = path.resolve()
    if (module := _loaded(path)) is not None:
        return module
    if not path.is_file():
        raise UserModuleError(f"{entry}: no such file ({path})")
    name = path.stem
    if name in sys.modules:
        raise UserModuleError(f"{entry}: a module named {name!r} is already imported from elsewhere; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as import does: the module can find itself (dataclasses, pickle)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        sibling = path.parent / f"{getattr(e, 'name', None) or ''}.py"
        if isinstance(e, ModuleNotFoundError) and sibling.is_file():  # its folder is not put on sys.path: only
            listed = (Path(entry).parent / sibling.name).as_posix()     # listed modules are hashed into a study
            raise UserModuleError(
                f"{entry}: imports {e.name!r} from its own folder: list {listed} too, before it (in the study "
                f"file's imports, or a second --imports), so that an edit to it counts as a change of the study"
            ) from e
        raise _fail(entry, e) from e
    return module


def _import_name(entry: str, base: Path) -> ModuleType:
    added = str(base.resolve()) not in sys.path
    if added:
        sys.path.insert(0, str(base.resolve()))
    try:
        spec = importlib.util.find_spec(entry)
        if spec is None:
            raise ModuleNotFoundError(f"no module named {entry!r}")
        if spec.origin and (module := _loaded(Path(spec.origin).resolve())) is not None:
            return module
        return importlib.import_module(entry)
    except Exception as e:
        raise _fail(entry, e) from e
    finally:
        if added:
            sys.path.remove(str(base.resolve()))


def _sha256(module: ModuleType) -> str:
    file = getattr(module, "__file__", None)
    return hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else ""
