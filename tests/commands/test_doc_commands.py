"""The command lines of README.md and EXPERIMENTS.md run: every documented module starts (its
`--help`, or a dry run where it has one) and knows every flag the docs give it.

The docs are read when the tests run, so an edited doc is checked as it is. A command is
`python -m brats_jax...`, `python -m experiments...`, `python -m benchmarks...`,
`python benchmarks/....py` or a console script of pyproject.toml's `[project.scripts]`
(`brats-train`, ...), in a fenced block (lines continued with `\\` joined) or in an inline
code span. One `--help` per module (and per subcommand the docs use): argparse commands
list their flags there, absl commands in `--helpfull`. `--config.a.b` overrides are checked
against the config file the command names (else the U-Net and TransUNet configs).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = ("README.md", "EXPERIMENTS.md")

# extra arguments of a dry run, for the modules that have one: it checks more than `--help`
# (e.g. that the documented sweep names exist); the documented leading positional arguments
# (lower-case names such as `table1`) are passed too
DRY_RUNS = {"experiments.run": ["--dry-run", "--out={tmp}/dry-run"]}

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE = re.compile(r"`([^`]+)`")
# where a command ends on its line: a comment, `;`, `&&`, `||`, a spaced pipe, a redirection
_END = re.compile(r"\s#|;|&&|\|\||\s\|\s|\s[12]?>")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str  # what runs: "brats_jax.main", "benchmarks/compare_cpu.py", "brats-train"
    argv: tuple[str, ...]  # the documented arguments
    where: str  # "README.md:15"


@functools.cache
def console_scripts() -> dict[str, str]:
    """pyproject.toml's `[project.scripts]`: name -> "module:function"."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return dict(project.get("scripts", {}))


@functools.cache
def _start() -> re.Pattern:
    scripts = "|".join(re.escape(s) for s in sorted(console_scripts(), key=len, reverse=True))
    return re.compile(
        r"(?:\bpython3? -m (?P<module>(?:brats_jax|experiments|benchmarks)(?:\.\w+)*)"
        r"|\bpython3? (?P<script>benchmarks/[\w/]+\.py)"
        + (rf"|(?<![\w/.-])(?P<console>{scripts})" if scripts else "")
        + r")(?=[\s`]|$)"
    )


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose
        return text.split()


def _commands_in(text: str, where: str) -> list[Command]:
    out = []
    starts = list(_start().finditer(text))
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        rest = text[m.end() : end]
        if cut := _END.search(rest):
            rest = rest[: cut.start()]
        name = m.group("module") or m.group("script") or m.group("console")
        out.append(Command(name, tuple(_tokens(rest)), where))
    return out


def documented_commands(docs=DOCS) -> list[Command]:
    """Every command line of this project's code in `docs`, in the order written."""
    out = []
    for doc in docs:
        lines = (REPO / doc).read_text().splitlines()
        fenced, prose = False, []  # prose: (line number, text) outside fenced blocks
        joined, first = "", 0
        for n, line in enumerate(lines, 1):
            if _FENCE.match(line):
                fenced = not fenced
                continue
            if not fenced:
                prose.append((n, line))
                continue
            if not joined:
                first = n
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            out += _commands_in(joined + line, f"{doc}:{first}")
            joined = ""
        # inline code spans, which may run over a line break
        text = "\n".join(line for _, line in prose)
        starts = [0]
        for _, line in prose:
            starts.append(starts[-1] + len(line) + 1)
        for m in _INLINE.finditer(text):
            row = max(i for i, s in enumerate(starts) if s <= m.start())
            where = f"{doc}:{prose[min(row, len(prose) - 1)][0]}"
            out += _commands_in(m.group(1).replace("\n", " "), where)
    return out


def _flag_names(argv) -> list[str]:
    """The `--name` of every flag in `argv` (`[--dry-run]`, `--out=DIR`, `--vmap 8`)."""
    names = []
    for token in argv:
        token = token.strip("[]{}(),")
        if token.startswith("--") and len(token) > 2:
            names.append(token[2:].split("=", 1)[0])
    return names


def _leading_positionals(argv) -> list[str]:
    """The arguments before the first flag that are plain lower-case names (`table1`;
    not placeholders such as `NAME`, `[NAME ...]` or `${COMMON[@]}`)."""
    out = []
    for token in argv:
        if token.startswith(("-", "[")):
            break
        if re.fullmatch(r"[a-z][a-z0-9_]*", token):
            out.append(token)
    return out


def _subcommands(argv) -> list[str]:
    """The first argument as a subcommand: `train`, or each of `{train,eval,data}`."""
    if not argv or argv[0].startswith("-"):
        return []
    first = argv[0]
    if first.startswith("{") and first.endswith("}"):
        return first[1:-1].split(",")
    return [first]


def _invocation(name: str) -> list[str]:
    if name in console_scripts():
        module, _, function = console_scripts()[name].partition(":")
        code = (
            f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as f; "
            "sys.exit(f())"
        )
        return [sys.executable, "-c", code]
    if name.endswith(".py"):
        return [sys.executable, name]
    return [sys.executable, "-m", name]


def _run(argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@functools.cache
def _help(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`argv` run once per test session (`--help` of a command and its subcommands)."""
    return _run(list(argv))


_ABSL_FLAG = re.compile(r"^\s+--(?:\[no\])?([\w.-]+):", re.MULTILINE)
_ARGPARSE_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")


def _known_flags(name: str, sub: str | None) -> tuple[set[str], str]:
    """(the flags `name [sub] --help` lists, a problem or ""). absl commands: `--helpfull`
    (absl's help exits with 1 after printing it)."""
    argv = _invocation(name) + ([sub] if sub else [])
    proc = _help((*argv, "--help"))
    text = proc.stdout + proc.stderr
    if "Try --helpfull" in text:  # absl
        full = _run([*argv, "--helpfull"])
        if full.returncode not in (0, 1) or "Traceback" in full.stderr:
            return set(), f"`{' '.join(argv[1:])} --helpfull` failed:\n{full.stderr[-2000:]}"
        flags = set(_ABSL_FLAG.findall(full.stdout))
        return flags | {f"no{f}" for f in flags}, ""
    if proc.returncode != 0 or "Traceback" in proc.stderr:
        return set(), f"`{' '.join(argv[1:])} --help` exited {proc.returncode}:\n{text[-2000:]}"
    return set(_ARGPARSE_FLAG.findall(text)), ""


def _subcommand_choices(name: str) -> set[str]:
    """The argparse subcommands `name --help` lists in its usage's `{a,b,c}`."""
    proc = _help((*_invocation(name), "--help"))
    if not proc.stdout.startswith("usage:"):
        return set()
    usage = proc.stdout.split("\n\n", 1)[0]
    return {c for group in re.findall(r"\{([\w,-]+)\}", usage) for c in group.split(",")}


@functools.cache
def _config(path_and_preset: str | None):
    """The config a `--config=FILE[:preset]` names; None: U-Net's and TransUNet's."""
    if path_and_preset is None:
        return [_config("configs/unet.py"), _config("configs/transunet.py")]
    path, _, preset = path_and_preset.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(preset or None)


def _unknown_config_fields(commands: list[Command]) -> list[str]:
    from brats_jax import config_fields

    problems = []
    for c in commands:
        named = next((t.split("=", 1)[1] for t in c.argv if t.startswith("--config=")), None)
        configs = _config(named) if named else _config(None)
        for field in _flag_names(c.argv):
            if not field.startswith("config."):
                continue
            field = field[len("config.") :]
            if all(len(part) == 1 for part in field.split(".")):  # `--config.a.b=value`
                continue
            errors = []
            for config in configs if isinstance(configs, list) else [configs]:
                try:
                    config_fields.get_field(config, field)
                    break
                except KeyError as e:
                    errors.append(e.args[0])
            else:
                problems.append(f"{c.where}: {c.name} --config.{field}: {errors[0]}")
    return problems


def _missing_records(commands: list[Command]) -> list[str]:
    """Kept result files the docs pass (`--records=experiments/results/a.json,...`) that do
    not exist (renamed or deleted)."""
    problems = []
    for c in commands:
        for token in c.argv:
            for part in token.partition("=")[2].split(","):
                if part.startswith("experiments/results/") and not (REPO / part).exists():
                    problems.append(f"{c.where}: {c.name}: no file {part}")
    return problems


def _grouped() -> dict[str, list[Command]]:
    groups: dict[str, list[Command]] = {}
    for c in documented_commands():
        groups.setdefault(c.name, []).append(c)
    return groups


def test_the_docs_have_commands_to_check():
    """The parser finds the commands (a parser that found none would check nothing)."""
    commands = documented_commands()
    names = {c.name for c in commands}
    assert {"brats_jax.main", "brats_jax.predict", "experiments.run"} <= names, names
    root = "--config.data.root=/data/BraTS2020_training_data/content/data"
    continued = [
        c
        for c in commands
        if c.name == "brats_jax.main" and c.where.startswith("README.md:") and root in c.argv
    ]
    assert continued  # the Kaggle command, whose flags continue over a `\` line end


@pytest.mark.parametrize("name", sorted(_grouped()))
def test_documented_command_runs_and_knows_its_flags(name, tmp_path):
    commands = _grouped()[name]
    problems = []
    subs_known = _subcommand_choices(name) if not name.endswith(".py") else set()
    by_sub: dict[str | None, list[Command]] = {}
    for c in commands:
        subs = [s for s in _subcommands(c.argv) if s in subs_known] or [None]
        for s in subs:
            by_sub.setdefault(s, []).append(c)
    top_flags, problem = _known_flags(name, None)
    problems += [problem] if problem else []
    for sub, cs in by_sub.items():
        known = set(top_flags)
        if sub is not None:
            sub_flags, problem = _known_flags(name, sub)
            known |= sub_flags
            problems += [problem] if problem else []
        for c in cs:
            for flag in _flag_names(c.argv):
                if flag not in known and not flag.startswith("config."):
                    command = f"{name} {sub}" if sub else name
                    problems.append(f"{c.where}: {command} does not know --{flag}")
    problems += _unknown_config_fields(commands)
    problems += _missing_records(commands)
    if name in DRY_RUNS:
        positionals = sorted({p for c in commands for p in _leading_positionals(c.argv)})
        extra = [a.replace("{tmp}", str(tmp_path)) for a in DRY_RUNS[name]]
        proc = _run([*_invocation(name), *positionals, *extra])
        if proc.returncode != 0:
            problems.append(
                f"dry run `{name} {' '.join(positionals + extra)}` exited {proc.returncode}: "
                f"{proc.stderr[-2000:]}"
            )
    assert not problems, "\n".join(problems)


def _python_c_snippets() -> list[tuple[str, str]]:
    """(where, code) of every documented `python -c "..."` that imports this library."""
    out = []
    for doc in DOCS:
        for n, line in enumerate((REPO / doc).read_text().splitlines(), 1):
            for m in re.finditer(r"\bpython3? -c (\"[^\"]*\"|'[^']*')", line):
                code = _tokens(m.group(1))[0]
                if re.search(r"\b(brats_jax|experiments|configs)\b", code):
                    out.append((f"{doc}:{n}", code))
    return out


def test_documented_python_c_snippets_name_what_exists():
    """Their imports run and the attributes they use of an imported module exist (the
    snippets themselves may write files, so only those are checked)."""
    problems = []
    for where, code in _python_c_snippets():
        tree = ast.parse(code)
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {}  # local name -> module or object path
        for node in imports:
            for alias in node.names:
                base = f"{node.module}." if isinstance(node, ast.ImportFrom) else ""
                names[alias.asname or alias.name.split(".")[0]] = base + alias.name
        used = sorted(
            {
                f"{n.value.id}.{n.attr}"
                for n in ast.walk(tree)
                if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id in names
            }
        )
        check = ast.unparse(ast.Module(body=imports, type_ignores=[]))
        check += "".join(f"\n{u}" for u in used)
        proc = _run([sys.executable, "-c", check])
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            problems.append(f"{where}: {code!r}: {last}")
    assert not problems, "\n".join(problems)
