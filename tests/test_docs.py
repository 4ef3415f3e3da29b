"""The README front page and docs/: short, links that resolve, a current flag reference, and commands
that run as written.

The README's evaluation, plug-and-play and export commands are run verbatim (as `python train.py ...`
from the words after `train.py`) in a sandbox that looks like the user's machine: HOME is a temporary
folder holding tiny PACS and OfficeHome trees under `~/data`, the current folder holds an authors'-format
checkpoint in `outputs/ImageNet_resnet18_rel_transformer/`, a fine-tuned torchvision ResNet-18 state dict
and a folder of known classes. The training commands need ImageNet and GPUs: they are parsed and checked
with the real parser instead.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from datasets.benchmarks import BENCHMARKS
from tests.conftest import save_informative_checkpoint
from tests.imagegen import make_image_tree

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
FRONT_PAGE_MAX_LINES = 250
# Flags of other programs that the README names (torchrun's).
OTHER_PROGRAMS_FLAGS = {"nproc_per_node", "max_restarts", "nnodes", "node_rank", "master_addr", "master_port"}


def _code_blocks(text: str, language: str = "bash") -> List[str]:
    """The bodies of the fenced code blocks of one language, line continuations joined."""
    return [block.replace("\\\n", " ") for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


def train_commands(text: str) -> List[List[str]]:
    """argv (the words after `train.py`) of every command line of a bash block that runs train.py."""
    commands = []
    for block in _code_blocks(text):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or "train.py" not in line:
                continue
            words = shlex.split(line)
            if "train.py" in words:
                commands.append(words[words.index("train.py") + 1:])
    return commands


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set:
    return {_slug(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def test_the_front_page_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= FRONT_PAGE_MAX_LINES, f"README.md has {lines} lines; move details into docs/"


@pytest.mark.parametrize("page", [README, *DOC_PAGES], ids=lambda page: page.name)
def test_relative_links_resolve(page):
    """Every relative link and image of a page names an existing file, and an existing heading."""
    text = page.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    broken = []
    for target in targets:
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert broken == [], f"{page.name}: links to nothing: {broken}"


def test_the_readme_links_the_paper_and_the_authors_code():
    text = README.read_text(encoding="utf-8")
    assert "https://arxiv.org/abs/2207.08699" in text
    assert "https://github.com/FrancescoCappio/ReSeND" in text
    assert "@inproceedings" in text


def _load_flag_reference_module():
    spec = importlib.util.spec_from_file_location("make_flag_reference", ROOT / "docs" / "make_flag_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flag_reference_is_generated_from_the_current_parser():
    module = _load_flag_reference_module()
    written = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert written == module.current_reference(), "docs/flags.md is stale: run python docs/make_flag_reference.py"


def test_the_flag_reference_lists_every_flag_and_fails_when_stale(tmp_path):
    from train import get_args_parser

    module = _load_flag_reference_module()
    parser = get_args_parser()
    text = module.render_flag_reference(parser)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert f"`{action.option_strings[0]}`" in text
    # A new flag changes the reference, so the check above would fail until it is regenerated.
    parser.add_argument("--a_flag_added_later", default=3, help="new")
    assert "`--a_flag_added_later` | `3` | new" in module.render_flag_reference(parser)
    # The machine-dependent defaults are written as rules, not as this machine's values.
    assert "| `--device` | `cuda if available, else cpu` |" in text
    assert f"`{os.path.expanduser('~')}" not in text


@pytest.mark.parametrize("page", [README, *DOC_PAGES], ids=lambda page: page.name)
def test_every_train_command_of_the_docs_parses(page):
    """Each `train.py` command line of a page is accepted by the real parser and the flag checks."""
    from train import check_flag_combinations, parse_command_line

    for argv in train_commands(page.read_text(encoding="utf-8")):
        args = parse_command_line(argv)
        check_flag_combinations(args)


def test_the_front_page_names_only_real_flags():
    from train import get_args_parser

    known = {option.lstrip("-").replace("-", "_") for action in get_args_parser()._actions
             for option in action.option_strings}
    named = {flag.replace("-", "_") for flag in re.findall(r"(?<![\w-])--([a-zA-Z][\w-]*)", README.read_text())}
    assert named - known - OTHER_PROGRAMS_FLAGS == set()


# ------------------------------------------------------------------ the README's commands, run as written

def _benchmark_tree(data_root: Path, dataset: str, per_class: int) -> None:
    """Every class folder that any target of `dataset` reads, with `per_class` tiny images."""
    bench = BENCHMARKS[dataset]
    layout: Dict[str, int] = {}
    for protocol in bench.targets.values():
        for side in (protocol.support, protocol.scored):
            for domain, classes in side.items():
                for cls in classes:
                    layout[f"{bench.root}/{domain}/{cls}"] = per_class
    make_image_tree(data_root, layout, size=24)


@pytest.fixture(scope="module")
def user_machine(tmp_path_factory):
    """(home, working folder) holding what the README's commands expect to find."""
    home = tmp_path_factory.mktemp("home")
    work = tmp_path_factory.mktemp("work")
    _benchmark_tree(home / "data", "PACS_DG", per_class=2)
    _benchmark_tree(home / "data", "OfficeHome_DG", per_class=1)
    make_image_tree(work / "my_known_classes", {"cat": 2, "dog": 2}, size=24)
    support = sorted((str(path), index) for index, cls in enumerate(("cat", "dog"))
                     for path in (work / "my_known_classes" / cls).glob("*.jpg"))
    save_informative_checkpoint(work / "outputs" / "ImageNet_resnet18_rel_transformer", support, 224)
    torch.manual_seed(1)
    import torchvision
    finetuned = torchvision.models.resnet18(num_classes=7)  # a classifier of the known classes, fc included
    torch.save(finetuned.state_dict(), work / "finetuned_resnet18.pth")
    return home, work


def _run_readme_command(argv: List[str], home: Path, work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--quiet"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


def _readme_commands(*required: str) -> List[List[str]]:
    return [argv for argv in train_commands(README.read_text(encoding="utf-8"))
            if all(flag in argv for flag in required)]


def test_the_readme_evaluation_commands_run_as_written(user_machine):
    home, work = user_machine
    commands = _readme_commands("--only_eval")
    assert len(commands) >= 3
    for argv in commands:
        done = _run_readme_command(argv, home, work)
        assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stderr[-3000:]}"
        assert "results written to" in done.stdout
    groups = sorted(path.name for path in (work / "outputs" / "ImageNet_resnet18_rel_transformer" / "eval").iterdir())
    assert any(name.startswith("PACS_DG_it7_") for name in groups), groups
    assert any(name.startswith("OfficeHome_DG_it7_") for name in groups), groups
    assert any("_bb-finetuned_resnet18_" in name for name in groups), groups


def test_the_readme_export_command_runs_as_written(user_machine):
    home, work = user_machine
    commands = _readme_commands("--export")
    assert len(commands) == 1
    done = _run_readme_command(commands[0], home, work)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = commands[0][commands[0].index("--export") + 1]
    assert (work / exported).is_file()
