"""dvc.yaml names exactly the code and the params each stage runs on: nothing stale, nothing re-run for nothing.

The code a stage runs is the import closure of its module inside the project (``import`` statements anywhere in
a module, functions included, resolved to files under pipelines/ and stages/; a package's ``__init__.py`` only
when it holds code). Its params are the ``PARAMS`` keys its module declares and reads (stages.config only hands a
stage the keys it declares).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "stages")


def module_file(name: str) -> Path | None:
    """The project file of module ``name`` (a module or a package), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def holds_code(path: Path) -> bool:
    """False for an ``__init__.py`` with nothing but a docstring (its edits change no result)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def imported_modules(path: Path, name: str) -> set[str]:
    """Every module ``path`` (module ``name``) imports, including ``from pkg import submodule``."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def import_closure(module: str) -> set[str]:
    """Repository-relative paths of the project files that running ``python -m module`` executes."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            todo.append(".".join(parts[:i]))
        path = module_file(name)
        if path is None:
            continue
        files.add(path)
        todo.extend(imported_modules(path, name))
    return {str(p.relative_to(ROOT)) for p in files if p.name != "__init__.py" or holds_code(p)}


def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def stage_module(stage: dict) -> str:
    return re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1)


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith(PACKAGES)}


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_depends_on_exactly_the_code_it_runs(name):
    """An edit to any file the stage runs re-runs it (no stale output); an edit to code it does not run does not
    (no 32 GB re-extraction, no re-download of SD because a metric changed)."""
    stage = dvc_stages()[name]
    closure = import_closure(stage_module(stage))
    deps = code_deps(stage)
    missing, extra = sorted(closure - deps), sorted(deps - closure)
    assert not missing, f"{name}: dvc.yaml misses code the stage runs: {missing}"
    assert not extra, f"{name}: dvc.yaml depends on code the stage does not run: {extra}"


def test_no_stage_imports_another_stage():
    """Shared code lives in pipelines/ (or stages/config.py and stages/schemas/ for params)."""
    allowed = {"stages", "stages.config", "stages.schemas"}
    for path in sorted((ROOT / "stages").glob("*.py")):
        for name in imported_modules(path, f"stages.{path.stem}"):
            if name.startswith("stages.") and not name.startswith(("stages.schemas.", "stages.config.")):
                assert name in allowed, f"{path.name} imports {name}"


def declared_params(stage: dict) -> list[str]:
    import importlib

    module = importlib.import_module(stage_module(stage))
    section = re.search(r"--section (\w+)", stage["cmd"])
    return [k.format(section=section.group(1) if section else "") for k in module.PARAMS]


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_params_are_the_keys_it_declares(name):
    """dvc.yaml's params of a stage are its module's PARAMS, so a change to base.launcher or base.device re-runs no
    download, and a key the stage reads is never missing from its dependencies."""
    stage = dvc_stages()[name]
    assert sorted(stage.get("params", [])) == sorted(declared_params(stage)), name


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages").glob("*.py")))
def test_stage_reads_only_declared_base_keys(path):
    """The ``base`` fields a stage module uses are among the keys it declares (undeclared ones are None)."""
    source = (ROOT / path).read_text()
    used = set(re.findall(r"\bbase\.(profile|seed|device|image_size|launcher)\b", source))
    if not re.search(r"^PARAMS = ", source, re.M):
        assert path in ("stages/__init__.py", "stages/config.py"), f"{path} declares no PARAMS"
        return
    import importlib

    declared = {k.split(".", 1)[1] for k in importlib.import_module(f"stages.{Path(path).stem}").PARAMS
                if k.startswith("base.")}
    code = re.sub(r'""".*?"""|#.*', "", source, flags=re.S)  # docstrings and comments name keys too
    used = set(re.findall(r"\bbase\.(profile|seed|device|image_size|launcher)\b", code))
    assert used <= declared, f"{path} reads base.{sorted(used - declared)} without declaring it in PARAMS"
