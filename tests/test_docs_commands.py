"""Every `ptv2` command written in README.md and docs/*.md is one that ptv2 still takes: Hydra commands (train,
eval, predict, bench) are composed with the command line's own steps (flags first, positional run folders, the
official preset) and pass the start-up checks, every job of a sweep included; the other commands' arguments parse
with their own parsers. Nothing trains or loads a model, so the hub, a GPU or the data are not needed: a renamed key,
group option or preset in the docs fails here, naming the file and line. docs/results/ records past runs and is not
checked. Placeholders (DIR, RUN_DIR, ...) are replaced by the table below: a new one has to be added knowingly."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import compose_config

from ptv2 import checks, cli, command_line
from ptv2.checks import check_values
from ptv2.commands import export, table

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*ptv2 (\S+)\s*(.*)$")  # at the line start: not prose in a tree
RUN = "outputs/docs-run"  # stands for any run folder; composing does not open it
PLACEHOLDERS = {  # whole-word placeholders of the docs and what a check composes instead
    "RUN_DIR": RUN,
    "RUN": RUN,
    "RUN_A": RUN,
    "RUN_B": RUN,
    "RUN_C": RUN,
    "DIR": "data",
    "DIR1": "data1",
    "DIR2": "data2",
    "DIR3": "data3",
    "$F": "tests/fixtures",
}
MOST_JOBS = 8  # jobs checked per sweep (the command line checks every job itself before the first starts)


def documented_commands() -> list[tuple[str, str]]:
    """(file:line, command line) of each `ptv2 ...` line in a fenced block, continuation lines joined."""
    found = []
    for path in DOCS:
        lines, inside, index = path.read_text().splitlines(), False, 0
        while index < len(lines):
            line = lines[index]
            if line.lstrip().startswith("```"):
                inside = not inside
            elif inside and COMMAND.match(line):
                start = index
                while line.rstrip().endswith("\\") and index + 1 < len(lines):
                    index += 1
                    line = line.rstrip()[:-1] + " " + lines[index].strip()
                found.append((f"{path.relative_to(ROOT)}:{start + 1}", line))
            index += 1
    return found


def words(line: str) -> tuple[str, list[str]]:
    """The command and its arguments as a shell would pass them, placeholders replaced; `# comments`, `...` (the
    rest of an earlier command) and the brackets of optional arguments dropped."""
    line = re.sub(r"<time>(-<id>)?", "run", COMMAND.match(line.split("  #")[0].split(" # ")[0]).group(0))
    tokens = [token.strip("[]") if re.fullmatch(r"\[\w[^\[\]]*\]", token) else token for token in shlex.split(line)]
    tokens = tokens[tokens.index("ptv2") + 1 :]
    replaced = []
    for token in tokens:
        if token == "...":
            continue
        for name, value in sorted(PLACEHOLDERS.items(), key=lambda item: -len(item[0])):
            token = re.sub(rf"(?<![\w$]){re.escape(name)}(?!\w)", value, token)
        replaced.append(token.replace("outputs/multirun/...", "outputs/multirun"))
    return replaced[0], replaced[1:]


def data_folder_problem(folder: str) -> str | None:
    """Why a data folder a documented command names would not be there on a fresh clone (commands run from the
    repository's root), or None: a placeholder's folder (DIR), and ../shared where this machine lacks it, pass."""
    placeholders = {PLACEHOLDERS[name] for name in ("DIR", "DIR1", "DIR2", "DIR3")}
    if folder.split("/")[0] in placeholders or folder.startswith("~"):
        return None
    if folder.startswith("../shared/") and not (ROOT.parent / "shared").is_dir():
        return None
    if not (ROOT / folder).is_dir():
        return f"task.data_dir={folder} is not a folder of a fresh clone with ../shared"
    return None


def check_hydra_command(command: str, args: list[str]) -> int:
    """Compose and check what `ptv2 COMMAND ARGS` would run; the number of configs checked."""
    _, config_name, _ = cli.COMMANDS[command]
    args, _, problem = command_line.command_line(command, config_name, args)
    assert problem is None, problem
    flags, overrides, _ = command_line.split_flags(args)
    settings = [arg for arg in overrides if not arg.lstrip("+").startswith("hydra")]
    jobs = command_line.expanded_sweep(config_name, settings) if "-m" in flags or "--multirun" in flags else [settings]
    for job in jobs[:MOST_JOBS]:
        check_values(compose_config(*job, config_name=config_name))
    return len(jobs[:MOST_JOBS])


ARGUMENT_PARSERS = {"table": table.parse_args, "export": export.export_parser().parse_intermixed_args}
ARGUMENT_PARSERS["import"] = export.import_parser().parse_intermixed_args


@pytest.mark.parametrize(("where", "line"), documented_commands(), ids=[w for w, _ in documented_commands()])
def test_every_documented_command_is_one_ptv2_takes(where, line, tmp_path, monkeypatch):
    command, args = words(line)
    assert command in cli.COMMANDS, f"{where}: `ptv2 {command}` is no command ({', '.join(cli.COMMANDS)})"
    monkeypatch.chdir(tmp_path)  # relative run folders and outputs/ stay in the test's folder
    folders = []  # the data folders are checked from the repository's root, where the docs' commands run
    monkeypatch.setattr(checks, "check_data_dir", lambda shown, folder: folders.append(folder))
    (tmp_path / RUN).mkdir(parents=True)
    (tmp_path / "outputs" / "multirun").mkdir(parents=True, exist_ok=True)
    try:
        if cli.COMMANDS[command][1] is None:
            ARGUMENT_PARSERS[command](args)
        else:
            assert check_hydra_command(command, args) >= 1
    except SystemExit as exit:  # argparse refusing the arguments
        pytest.fail(f"{where}: `{line}`: the arguments do not parse (exit {exit.code})")
    except Exception as error:
        pytest.fail(f"{where}: `{line}`: {type(error).__name__}: {error}")
    problems = [problem for folder in folders if (problem := data_folder_problem(folder))]
    assert not problems, f"{where}: `{line}`: {problems[0]}"


def test_the_docs_hold_commands_of_every_kind():
    kinds = {words(line)[0] for _, line in documented_commands()}
    assert {"train", "eval", "predict", "bench", "table", "export", "import"} <= kinds


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ptv2 train task=rte backbone=minilm trainer.epoch=1", "trainer.epoch"),
        ("ptv2 train -m task=rte backbone=minilm prompt.length=4,-3", "prompt.length=-3"),
        ("ptv2 train preset=rte-roberta-larg", "rte-roberta-larg"),
        ("ptv2 eval ckpt=RUN_DIR splt=dev", "splt"),
    ],
)
def test_the_check_catches_a_broken_command(line, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command, args = words(line)
    with pytest.raises(Exception, match=re.escape(expected)):
        check_hydra_command(command, args)
