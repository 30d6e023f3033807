"""The package's layers: imports go downward only, tools import no tools, and the config is
read only by the builders (config/, modeling/build.py, data/ builders, engine/)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "regionclip"
# Lowest first; a module may import its own unit and any unit of a lower layer.
LAYERS = (
    ("ops", "atomic", "distributed", "events", "prompts", "download_pages", "load_report",
     "script_archive", "progress"),
    ("config",),
    ("structures", "checkpoint"),
    ("model_zoo",),
    ("data", "modeling"),
    ("evaluation",),
    ("engine",),
    ("toyworld",),
    ("api", "vocabulary", "cli", "commands", "visualization", "__init__"),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
FRONT_DOOR = set(LAYERS[-1])
CFG_READERS = ("config/", "modeling/build.py", "modeling/build_rpn.py", "modeling/detic/build.py",
               "data/", "engine/")


def _unit(module: str) -> str:
    """'regionclip.data.coco' -> 'data'; the package itself -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Absolute names of the regionclip modules ``path`` imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("regionclip"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "regionclip":  # from regionclip import ops
                yield from (f"{base}.{a.name}" for a in node.names)
            elif base.startswith("regionclip"):
                yield base


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_downward_only(path):
    unit = _unit(_module_name(path))
    assert unit in RANK, f"{path}: add its unit {unit!r} to LAYERS"
    for target in _imports(path):
        other = _unit(target)
        if other == unit or (unit in FRONT_DOOR and other in FRONT_DOOR):
            continue
        assert RANK[other] < RANK[unit], f"{path} ({unit}) imports {target} ({other}), which " \
                                         f"is not in a lower layer"


def test_modules_are_small():
    long = {str(p.relative_to(REPO)): n for p in MODULES
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize("path", sorted((REPO / "tools").glob("*.py")), ids=lambda p: p.name)
def test_tools_import_no_tools(path):
    tools = {p.stem for p in (REPO / "tools").glob("*.py")}
    tree = ast.parse(path.read_text())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert not names & tools


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_only_builders_read_the_config(path):
    relative = str(path.relative_to(PACKAGE))
    if relative.startswith(CFG_READERS):
        return
    reads = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
             and node.value.id.endswith("cfg") and node.attr.isupper()]
    assert reads == [], f"{relative} reads config keys on lines {reads}"
