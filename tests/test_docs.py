"""The README and docs/ cannot drift from the code.

* Every fenced block marked runnable (```` ```bash runnable ```` or ```` ```python runnable ````) runs, in document
  order (README.md first, then docs/*.md by name), in one scratch folder that sees the repo's recipes/, eval/,
  benchmarks/ and tokenizers/ as the repo root does; a failing block fails the test, naming its file and line.
  The README's first command (the demo) is not run again here: tests/test_demo.py runs it end to end.
* Every command in every bash block (runnable or not) names a script, module or console command that exists, uses
  only flags its argparse parser declares, and, for recipes/train.py, a config that loads with its dotted overrides.
* Every relative link resolves (file and #anchor), and every repo path, config name, test file and ``mlmm.*`` name
  written in backticks exists.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DEMO_COMMAND = 'pip install -e . && python -m mlmm.demo'
TEST_COMMAND = 'pip install -e ".[dev]" && pytest -q'
LINKED = ("recipes", "eval", "benchmarks", "tokenizers", "ds_config.json")  # what runnable blocks read from the repo
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# paths the reader of a doc supplies (load_config checks that local ones exist; keys, types, ranges still checked)
READER_INPUTS = ("data.train_shards", "model.text.tokenizer", "model.text.pretrained")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    tags: tuple[str, ...]
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(`{3,})([^`]*)$", lines[i])  # CommonMark: no backtick in a fence's info string
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).split(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: unclosed code fence"
        i += 1
        blocks.append(Block(path, start + 1, info[0] if info else "", tuple(info[1:]), "\n".join(body) + "\n"))
    return blocks


ALL_BLOCKS = [b for p in DOCS for b in fenced_blocks(p)]
RUNNABLE = [b for b in ALL_BLOCKS if "runnable" in b.tags]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = REPO / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 250
    first, second = fenced_blocks(readme)[:2]
    assert first.code.strip() == DEMO_COMMAND and second.code.strip() == TEST_COMMAND
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ runnable blocks
def test_runnable_blocks_run(tmp_path):
    assert any(b.path.name == "README.md" for b in RUNNABLE), "the README has no runnable block"
    work = tmp_path / "work"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    if (REPO.parent / "shared").is_dir():  # ../shared/data, as seen from the repo root
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    for block in RUNNABLE:
        if block.lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", block.code]
        elif block.lang == "python":
            cmd = [sys.executable, "-c", block.code]
        else:
            pytest.fail(f"{block.where}: runnable blocks are bash or python, not {block.lang!r}")
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, \
            f"{block.where} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


# --------------------------------------------------------------------------------- commands in blocks
def commands(code: str) -> list[list[str]]:
    """Shell commands of a bash block: continuation lines joined, comments dropped, split at && ; |, simple
    ``NAME="..."`` assignments substituted into later ``$NAME``."""
    text, variables, out = code.replace("\\\n", " "), {}, []
    for line in text.splitlines():
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        cmd: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "|", "||"):
                if len(cmd) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]):
                    name, _, value = cmd[0].partition("=")
                    variables[name] = value
                elif cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
    return out


CONSOLE = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def target(cmd: list[str]) -> tuple[str, str, list[str]] | None:
    """("module" | "script", name, its arguments) for python / deepspeed / console (``mlmm-*``) commands, else
    None; a console command is read as the module of its ``main``."""
    if cmd[0] in CONSOLE:
        return "module", CONSOLE[cmd[0]].partition(":")[0], cmd[1:]
    if cmd[0] == "python" and len(cmd) > 2 and cmd[1] == "-m":
        return "module", cmd[2], cmd[3:]
    if cmd[0] in ("python", "deepspeed"):
        args = cmd[1:]
        while args and args[0].startswith("-"):  # the launcher's own flags (--num_gpus 8, --hostfile h, ...)
            args = args[2:] if "=" not in args[0] and len(args) > 1 and not args[1].endswith(".py") else args[1:]
        if args and args[0].endswith(".py"):
            return "script", args[0], args[1:]
    return None


def declared_flags(source: Path, follow: int = 2) -> set[str]:
    """Every ``--flag`` string given to an ``add_argument`` call in a file, and (``follow`` levels) in the mlmm
    modules it imports, so that a thin entry point whose parser lives in the library (``eval/run_suite.py`` ->
    ``mlmm.cli.eval_suite`` -> ``mlmm.evaluation.cli``) is read right."""
    flags, imported = set(), []
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlmm"):
            imported += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names if a.name.startswith("mlmm")]
    for name in imported if follow else ():  # found on disk, not imported (importing mlmm.training is slow)
        base = REPO.joinpath(*name.split("."))
        for file in (base.with_suffix(".py"), base / "__init__.py"):
            if file.is_file():
                flags |= declared_flags(file, follow - 1)
    return flags


def source_of(kind: str, name: str) -> Path:
    if kind == "script":
        return REPO / name
    if name.split(".")[0] != "mlmm":  # another package's module (python -m torch.distributed.run ...)
        spec = importlib.util.find_spec(name)
        return Path(spec.origin) if spec is not None and spec.origin else REPO / name
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file() or not (base / "__main__.py").is_file():
        return base.with_suffix(".py")
    return base / "__main__.py"


BASH_COMMANDS = [(b, c) for b in ALL_BLOCKS if b.lang == "bash" for c in commands(b.code) if target(c)]


def test_every_command_names_an_existing_script_and_declared_flags():
    assert len(BASH_COMMANDS) > 40  # the parser found the docs' commands
    problems = []
    for block, cmd in BASH_COMMANDS:
        kind, name, args = target(cmd)
        source = source_of(kind, name)
        if not source.is_file():
            problems.append(f"{block.where}: {name}: no such file")
            continue
        flags = declared_flags(source)
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and flag not in flags:
                problems.append(f"{block.where}: {name}: unknown flag {flag} (declared: {sorted(flags)})")
    assert not problems, "\n".join(problems)


def test_train_commands_load_their_config_and_overrides():
    from mlmm.config import load_config

    checked, problems, written = 0, [], {}
    for block, cmd in BASH_COMMANDS:
        kind, name, args = target(cmd)
        outs = written.setdefault(block.where, [])  # folders the block's earlier commands write
        outs += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--out"]
        outs += [a.split("=", 1)[1] for a in args if a.startswith("output_dir=")]
        if name != "recipes/train.py" or "--config" not in args or "..." in args:  # "...": left to the reader
            continue
        config = args[args.index("--config") + 1]
        overrides = [a for a in args if re.match(r"^[a-z_]+(\.[a-z_0-9]+)+=", a)]
        try:
            load_config(REPO / config, overrides)
            checked += 1
        except Exception as e:  # noqa: BLE001 - every error is a doc that drifted ...
            inputs = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in READER_INPUTS]
            if "not found" in str(e) and any(o in str(e) for o in outs + inputs):
                checked += any(f": {k}: " in str(e) for k in READER_INPUTS)  # raised after keys/types/ranges passed
                continue  # ... except a file that an earlier command of the same block writes, or the reader's data
            problems.append(f"{block.where}: {config} {overrides}: {e}")
    assert not problems, "\n".join(problems)
    assert checked >= 5


# ------------------------------------------------------------------------------------ links and paths
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", prose(path), re.M)}


def prose(path: Path) -> str:
    """The file without its fenced blocks."""
    return re.sub(r"^(`{3,})[^`\n]*\n.*?^\1", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_links_resolve():
    problems = []
    for path in DOCS:
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose(path)):
            link = m.group(1)
            if re.match(r"^[a-z]+:", link):
                continue
            file, _, anchor = link.partition("#")
            dest = (path.parent / file) if file else path
            if not dest.exists():
                problems.append(f"{path.name}: link {link}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.name}: link {link}: no heading #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)


REPO_PATH = re.compile(r"^(mlmm|recipes|eval|benchmarks|tests|docs|tokenizers|\.ci)/[\w.*{},/-]*$")


def resolves(name: str) -> bool:
    """``mlmm.a.b.C``: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_paths_and_names_in_backticks_exist():
    from braceexpand import braceexpand

    problems = []
    for path in DOCS:
        for m in re.finditer(r"`([^`\n]+)`", prose(path)):
            span = m.group(1).strip()
            if REPO_PATH.match(span):
                if not any(list(REPO.glob(p.rstrip("/"))) for p in braceexpand(span)):
                    problems.append(f"{path.name}: `{span}`: no such path")
            elif re.fullmatch(r"[\w-]+\.yaml", span):
                if not any((REPO / d / span).is_file() for d in ("recipes/configs", "eval/configs")):
                    problems.append(f"{path.name}: `{span}`: no such config")
            elif re.fullmatch(r"test_\w+\.py", span):
                if not (REPO / "tests" / span).is_file():
                    problems.append(f"{path.name}: `{span}`: no such test file")
            elif re.fullmatch(r"mlmm(\.\w+)+", span) and not resolves(span):
                problems.append(f"{path.name}: `{span}`: no such module or name")
    assert not problems, "\n".join(problems)
