"""Console commands: one per entry point (``[project.scripts]``), the scripts in recipes/, eval/ and tokenizers/
thin wrappers of the same ``main``, every one of them answering ``--help``."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import runpy
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
TARGETS = {target.partition(":")[0]: name for name, target in SCRIPTS.items()}  # module -> command


def synthetic_kinds() -> dict[str, str]:
    """``mlmm-synthetic KIND``: kind -> generator module (each one an entry point behind that one command)."""
    from mlmm.synthetic.cli import GENERATORS

    return {kind: module for kind, (module, _) in GENERATORS.items()}

WRAPPERS = sorted(p for d in ("eval", "tokenizers") for p in (REPO / d).glob("*.py"))


def is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``"""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and getattr(test.left, "id", "") == "__name__"
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def runnable_modules() -> list[str]:
    """Every ``mlmm.*`` module with an ``if __name__ == "__main__":`` block (an entry point by ``python -m``)."""
    out = []
    for path in sorted((REPO / "mlmm").rglob("*.py")):
        if any(is_main_guard(n) for n in ast.parse(path.read_text(encoding="utf-8")).body):
            out.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return out


def wrapper_target(path: Path) -> str:
    """The module a wrapper takes ``main`` from; fails unless the file is a docstring, ``import sys``, that one
    import and the ``__main__`` guard calling ``sys.exit(main())``."""
    body, module = ast.parse(path.read_text(encoding="utf-8")).body, None
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        if isinstance(node, ast.Import) and [a.name for a in node.names] == ["sys"]:
            continue
        if isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["main"] and module is None:
            module = node.module
            continue
        if is_main_guard(node) and ast.unparse(node.body) == "sys.exit(main())":
            continue
        pytest.fail(f"{path.relative_to(REPO)}:{node.lineno}: a wrapper holds no code of its own: "
                    f"{ast.unparse(node)[:80]!r}")
    assert module, f"{path.relative_to(REPO)}: no 'from <module> import main'"
    return module


def test_every_entry_point_has_one_console_command():
    assert all(t.endswith(":main") for t in SCRIPTS.values()) and all(n.startswith("mlmm-") for n in SCRIPTS)
    assert len(TARGETS) == len(SCRIPTS), "two commands run the same main()"
    runnable, covered = runnable_modules(), {*TARGETS, *synthetic_kinds().values()}
    assert [m for m in runnable if m not in covered] == [], "python -m entry points without a command"
    assert [m for m in TARGETS if m not in runnable] == [], "commands whose module has no __main__ guard"
    assert len(WRAPPERS) >= 10
    for path in WRAPPERS:
        assert wrapper_target(path) in TARGETS, f"{path.relative_to(REPO)} wraps a main() that has no command"


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_console_command_main_answers_help(command, capsys):
    module, _, func = SCRIPTS[command].partition(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["--help"]))
    assert e.value.code in (0, None) and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("kind", sorted(synthetic_kinds()))
def test_synthetic_generator_answers_help(kind, capsys):
    from mlmm.synthetic.cli import main

    with pytest.raises(SystemExit) as e:
        main([kind, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_synthetic_command_refuses_an_unknown_kind(capsys):
    from mlmm.synthetic.cli import main

    assert main(["nope"]) == 2 and "unknown KIND 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: str(p.relative_to(REPO)))
def test_wrapper_script_runs_its_command(wrapper, capsys, monkeypatch):
    """``python <wrapper> --help`` (run as __main__, in this process) prints the command's usage."""
    monkeypatch.setattr(sys, "argv", [str(wrapper), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(wrapper), run_name="__main__")
    assert e.value.code in (0, None) and "usage:" in capsys.readouterr().out


def test_installed_console_commands_are_the_declared_ones():
    """``pip install -e .`` put every command on PATH (a stale install fails here: re-run it)."""
    installed = {ep.name: ep.value for ep in importlib.metadata.distribution("mlmm").entry_points
                 if ep.group == "console_scripts"}
    assert installed == SCRIPTS, "installed console commands differ from pyproject.toml: run pip install -e ."
    exe = Path(sysconfig.get_path("scripts")) / "mlmm-eval"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: mlmm-eval" in res.stdout, res.stderr[-2000:]
