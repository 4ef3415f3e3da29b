"""Write docs/flags.md, the flag reference, from train.py's own parser, so the two cannot drift apart.

    python docs/make_flag_reference.py           # rewrite docs/flags.md
    python docs/make_flag_reference.py --check   # exit 1, naming the fix, if docs/flags.md is stale

tests/test_docs.py runs the check, so a flag added, removed or re-documented without regenerating fails CI.
"""
import argparse
import os
import sys
from typing import Any, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS_FILE = os.path.join(ROOT, "docs", "flags.md")
# Defaults that depend on the machine the parser runs on; the reference shows the rule instead.
MACHINE_DEFAULTS = {
    "data_root": "~/data",
    "device": "cuda if available, else cpu",
    "local_rank": "-1, or $LOCAL_RANK when set",
}
HEADER = """# Flag reference

[README](../README.md) · [install](install.md) · [demo](demo.md) · [evaluation](evaluation.md) · [training](training.md) · [outputs](outputs.md) · [baselines](baselines.md) · [measured figures](benchmarks.md) · [flags](flags.md) · [differences from the authors' code](differences.md)

Every flag of `train.py`, with its default, grouped as `python train.py --help` groups them.
Generated from the parser by `python docs/make_flag_reference.py`; do not edit by hand
(`tests/test_docs.py` fails when this page and the parser differ). Yes/no values take
`on/off`, `yes/no`, `true/false` or `1/0`.
"""


def _default_text(action: argparse.Action) -> str:
    """The default as the reference shows it: '-' when there is none, on/off for switches and yes/no values."""
    if action.dest in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[action.dest]
    default: Any = action.default
    if default is None or default is argparse.SUPPRESS:
        return "-"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_flag_reference(parser: argparse.ArgumentParser) -> str:
    """The whole flags.md text for `parser`: one table per argument group, flags in parser order."""
    lines: List[str] = [HEADER]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions
                   if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | default | meaning |", "|---|---|---|"]
        for action in actions:
            flags = ", ".join(f"`{option}`" for option in action.option_strings)
            meaning = action.help or ""
            if action.choices:
                meaning = f"{meaning} (one of: {', '.join(str(choice) for choice in action.choices)})".strip()
            lines.append(f"| {flags} | `{_cell(_default_text(action))}` | {_cell(meaning)} |")
        lines.append("")
    return "\n".join(lines)


def current_reference() -> str:
    """The reference for the parser of the checked-out train.py."""
    from train import get_args_parser
    return render_flag_reference(get_args_parser())


def main() -> int:
    """Rewrite docs/flags.md, or with --check compare it with the parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if docs/flags.md is stale")
    args = parser.parse_args()
    text = current_reference()
    if args.check:
        with open(FLAGS_FILE, encoding="utf-8") as handle:
            if handle.read() != text:
                print(f"{FLAGS_FILE} differs from train.py's parser: run python docs/make_flag_reference.py",
                      file=sys.stderr)
                return 1
        print(f"{FLAGS_FILE} is current")
        return 0
    tmp = f"{FLAGS_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, FLAGS_FILE)
    print(FLAGS_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
