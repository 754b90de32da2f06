"""The README and docs/ as a user reads them: every command they show parses with the real parsers (nothing is
run), the README stays short, every relative link lands on a file, every Python example is valid Python."""

import argparse
import contextlib
import importlib
import re
import shlex
from pathlib import Path

import pytest

from lvlm_interpret import METHODS, UserInputError, cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
# a value written as a placeholder (DIR, N, NAME_OR_PATH, I,J, A-B, METHOD.NAME=VALUE)
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(?:[,.=:/-][A-Z0-9_]*)*")


def page_parts(path: Path) -> tuple[str, list[tuple[str, int, str]]]:
    """The page's prose (fenced lines blanked, so that offsets keep their line numbers) and its fenced blocks as
    (language, first line number, text)."""
    prose, fences, fence = [], [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opening = re.fullmatch(r"\s*```\s*(\w*)\s*", line)
        if opening and fence is None:
            fence = (opening.group(1), number + 1, [])
        elif opening:
            fences.append((fence[0], fence[1], "\n".join(fence[2])))
            fence = None
        elif fence is not None:
            fence[2].append(line)
        prose.append("" if fence is not None or opening else line)
    return "\n".join(prose), fences


def shown_commands(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every shell line in a fenced block (continuations joined, comments cut) and every inline
    code span."""
    prose, fences = page_parts(path)
    commands = [(prose.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split()))
                for span in re.finditer(r"`([^`]+)`", prose)]
    for language, first, text in fences:
        if language not in SHELL_FENCES:
            continue
        pending, start = "", first
        for number, line in enumerate(text.splitlines(), first):
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if not pending:
                start = number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            commands.append((start, pending + line))
            pending = ""
    return commands


def invocation(command: str) -> tuple[str, list[str]] | None:
    """(what runs, its arguments) for a command of this project: "cli" (python -m lvlm_interpret, lvlm-interpret,
    accelerate launch -m lvlm_interpret), "make", or the module whose main() parses the arguments (python app.py,
    python -m lvlm_interpret.loadtest, ...); None for anything else."""
    words = command.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # PORT=8000 make run
        words = words[1:]
    if not words:
        return None
    program = words[0]
    if program not in ("make", "lvlm-interpret", "accelerate") and Path(program).name not in ("python", "python3"):
        return None
    words = shlex.split(" ".join(words))
    program, arguments = words[0], words[1:]
    if program in ("make", "lvlm-interpret"):
        return ("cli" if program == "lvlm-interpret" else "make"), arguments
    if program == "accelerate":
        if "-m" not in arguments or arguments.index("-m") + 1 == len(arguments):
            return None
        arguments = arguments[arguments.index("-m") + 1:]
        return ("cli", arguments[1:]) if arguments[0] == "lvlm_interpret" else None
    if arguments[:1] == ["app.py"]:
        return "app", arguments[1:]
    if arguments[:1] == ["-m"] and len(arguments) > 1 and arguments[1].split(".")[0] == "lvlm_interpret":
        return ("cli" if arguments[1] == "lvlm_interpret" else arguments[1]), arguments[2:]
    return None


def all_commands() -> list[tuple[str, tuple[str, list[str]]]]:
    found = []
    for path in PAGES:
        for line, command in shown_commands(path):
            try:
                parsed = invocation(command)
            except ValueError as error:  # shlex: an unbalanced quote
                parsed = ("unreadable", [str(error)])
            if parsed:
                found.append((f"{path.relative_to(ROOT)}:{line}: {command}", parsed))
    return found


COMMANDS = all_commands()


class Rejected(Exception):
    """A parser's error, raised instead of printing usage and exiting."""


class ParserBuilt(Exception):
    def __init__(self, parser):
        super().__init__("parser built")
        self.parser = parser


def parsers_within(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers_within(sub)


def strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No abbreviated options (a documented flag must be spelled out) and errors raised, not printed."""
    def reject(message):
        raise Rejected(message)
    for each in parsers_within(parser):
        each.allow_abbrev = False
        each.error = reject
    return parser


@pytest.fixture(scope="module")
def parser_of():
    """parser_of(program): the real argparse parser of `cli` or of a module's main(), caught as main() calls it."""
    parsers = {}

    def get(program):
        if program not in parsers:
            if program == "cli":
                parsers[program] = strict(cli.build_parser())
            else:
                main = importlib.import_module(program).main
                with pytest.MonkeyPatch.context() as patch:
                    def catch(self, *args, **kwargs):
                        raise ParserBuilt(self)
                    patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
                    with pytest.raises(ParserBuilt) as built:
                        main([])
                parsers[program] = strict(built.value.parser)
        return parsers[program]
    return get


def as_arguments(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], bool]:
    """A synopsis as arguments the parser can check: optional groups' brackets dropped, the first of `a|b`
    alternatives, each placeholder value (N, DIR, ...) of an option that checks its value (a number, a choice)
    swapped for one it accepts, `...` (more of the same) and --help left out. Also whether the command is partial
    (`...` or --help: required options may be missing)."""
    for word in words:  # nested subcommands too (`sae train`)
        subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not (subcommands and word in subcommands[0].choices):
            break
        parser = subcommands[0].choices[word]
    arguments, partial, takes_value = [], False, None
    for word in words:
        word = word.strip("[]()")  # optional groups [...] and alternatives (a | b)
        if takes_value is not None:  # the option's value, "..." included
            if takes_value.choices and PLACEHOLDER.fullmatch(word):
                word = str(next(iter(takes_value.choices)))
            elif takes_value.type in (int, float) and PLACEHOLDER.fullmatch(word):
                word = "1"
            arguments.append(word.split("|")[0])
            takes_value = None
        elif word in ("...", "-h", "--help"):
            partial = True
        elif word and word != "|":
            arguments.append(word)
            action = parser._option_string_actions.get(word)
            takes_value = action if action is not None and action.nargs != 0 else None
    return arguments, partial


@contextlib.contextmanager
def nothing_required(parser: argparse.ArgumentParser):
    optional = [a for each in parsers_within(parser) for a in each._actions if a.option_strings and a.required]
    for action in optional:
        action.required = False
    try:
        yield
    finally:
        for action in optional:
            action.required = True


def check_method_choices(arguments: argparse.Namespace) -> None:
    """What `explain`, `evaluate` and `bench` check before loading a model: method names and --option names."""
    methods = getattr(arguments, "methods", None)
    if methods is None or PLACEHOLDER.fullmatch(methods):
        return
    names = cli._parse_methods(methods, tokens_given=True)
    options = getattr(arguments, "option", None) or []
    if not any(PLACEHOLDER.fullmatch(spec) for spec in options):
        cli._parse_method_options(options, names)


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def test_readme_is_short():
    length = len((ROOT / "README.md").read_text())
    assert length <= README_LIMIT, f"README.md has {length} characters: move detail into docs/ (limit {README_LIMIT})"


def test_the_pages_show_commands_of_every_entry_point():
    """Guards the extraction above: were it to find nothing, every command test would pass vacuously."""
    programs = {program for _, (program, _) in COMMANDS}
    assert {"cli", "make", "app", "lvlm_interpret.loadtest"} <= programs, programs


@pytest.mark.parametrize("where, invoked", COMMANDS, ids=[where.split(": ")[0] for where, _ in COMMANDS])
def test_every_shown_command_parses(where, invoked, parser_of):
    program, arguments = invoked
    assert program != "unreadable", f"{where}: {arguments[0]}"
    if program == "make":
        unknown = [word for word in arguments if "=" not in word and word not in make_targets()]
        assert not unknown, f"{where}: no make target {unknown} in the Makefile (targets: {sorted(make_targets())})"
        return
    if program == "cli" and (not arguments or PLACEHOLDER.fullmatch(arguments[0])):
        return  # names the program (`python -m lvlm_interpret`, `lvlm-interpret COMMAND ...`), not a command
    parser = parser_of(program)
    arguments, partial = as_arguments(parser, arguments)
    try:
        with nothing_required(parser) if partial else contextlib.nullcontext():
            parsed = parser.parse_args(arguments)
        if program == "cli":
            check_method_choices(parsed)
    except (Rejected, UserInputError) as error:
        pytest.fail(f"{where}\n  is refused by its parser: {error}")


def test_every_shown_method_option_exists():
    """`--option cleann.head=3` or `cleann.head=3` in the text: the method takes that option, with that value."""
    shown = [(f"{path.relative_to(ROOT)}:{line}", span.removeprefix("--option "))
             for path in PAGES for line, span in shown_commands(path)
             if re.fullmatch(r"(--option )?(\w+)\.\w+=\S+", span) and span.removeprefix("--option ").split(".")[0]
             in METHODS]
    assert shown
    for where, spec in shown:
        try:
            cli._parse_method_options([spec], [spec.split(".")[0]])
        except UserInputError as error:
            pytest.fail(f"{where}: {spec}: {error}")


def heading_anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+)$", page_parts(path)[0], re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for path in PAGES:
        for link in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", page_parts(path)[0]):
            target = link.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            name, _, anchor = target.partition("#")
            file = (path.parent / name).resolve() if name else path
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in heading_anchors(file)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files or headings: " + ", ".join(broken)


def test_python_examples_are_valid_python():
    for path in PAGES:
        for language, first, text in page_parts(path)[1]:
            if language == "python":
                compile(text, f"{path.relative_to(ROOT)}:{first}", "exec")
