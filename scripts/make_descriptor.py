"""Write descriptor.json (Boutiques 0.5, BIDS-app layout) from the argparse parser.

Usage: python scripts/make_descriptor.py > descriptor.json
"""

from __future__ import annotations

import argparse
import json
import sys

from bids_postop import __version__
from bids_postop.cli.parser import build_parser

# value keys the Boutiques BIDS-app template (bosh validate --bids) requires, in its order
TEMPLATE_KEYS = {"bids_dir": "[BIDS_DIR]", "output_dir_name": "[OUTPUT_DIR]", "analysis_level": "[ANALYSIS_LEVEL]",
                 "participant_label": "[PARTICIPANT_LABEL]", "postop_session": "[SESSION_LABEL]"}


def _default(action: argparse.Action):
    """The parser's default where Boutiques can state it (not None, not an empty list, not a flag's False)."""
    value = action.default
    if value is None or value is argparse.SUPPRESS or isinstance(value, bool) or value == []:
        return None
    if isinstance(value, int | float | str):
        return value
    return None


def error_codes() -> list[dict]:
    """The documented exit codes, from bids_postop.errors and the parser's epilog."""
    from bids_postop.cli.parser import EPILOG

    codes = []
    for line in EPILOG.split("exit codes:", 1)[1].split("example:", 1)[0].splitlines():
        number, _, text = line.strip().partition(" ")
        if number.isdigit() and int(number) != 0:
            codes.append({"code": int(number), "description": text.strip()})
    return codes


def descriptor() -> dict:
    parser = build_parser()
    inputs, template = [], []
    shared = {a.dest for a in parser._actions if sum(b.dest == a.dest for b in parser._actions) > 1}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        # ids as in the Boutiques BIDS-app template ("output_dir" is the output-file's id)
        ident = "output_dir_name" if action.dest == "output_dir" else action.dest
        if isinstance(action, argparse._StoreFalseAction) or action.dest in shared:
            # a Flag is true when present, and two options may share a dest (--mem-mb, --mem-gb): name it by its flag
            ident = max(action.option_strings, key=len).lstrip("-").replace("-", "_")
        value_key = TEMPLATE_KEYS.get(ident, f"[{ident.upper()}]")
        if value_key not in TEMPLATE_KEYS.values():
            template.append(value_key)
        entry = {"id": ident, "name": ident.replace("_", " "), "value-key": value_key,
                 "description": (action.help or "").replace("%%", "%"), "optional": not action.required}
        if action.option_strings:
            flag = max(action.option_strings, key=len)
            entry["command-line-flag"] = flag
        if isinstance(action, argparse._CountAction):  # -v / -vv: the value is the flag itself
            entry.pop("command-line-flag", None)
            entry["type"] = "String"
            entry["value-choices"] = ["-v", "-vv"]
        elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            entry["type"] = "Flag"
        else:
            entry["type"] = "File" if ident in ("bids_dir", "bids_filter_file") else "String"
            if action.type in (int,) or getattr(action.type, "__name__", "") == "positive_int":
                entry["type"] = "Number"
                entry["integer"] = True
            elif action.type is float:
                entry["type"] = "Number"
            if action.choices:
                entry["value-choices"] = list(action.choices)
            if action.nargs in ("+", "*"):
                entry["list"] = True
            default = _default(action)
            if default is not None and entry.get("type") != "Flag":
                entry["default-value"] = default
        inputs.append(entry)
    # the template's second view of the output folder, as a File, for group-level runs
    inputs.append({"id": "participant_level_analysis_dir", "name": "participant-level results",
                   "type": "File", "value-key": "[OUTPUT_DIR]", "optional": True,
                   "description": "for the group level: the output folder of the participant level"})
    command = "mkdir -p [OUTPUT_DIR]; bids_postop " + " ".join([*TEMPLATE_KEYS.values(), *template])
    return {
        "name": "bids_postop",
        "tool-version": __version__,
        "schema-version": "0.5",
        "description": parser.description,
        "command-line": command,
        "container-image": {"type": "docker", "image": f"bids_postop:{__version__}"},
        "inputs": inputs,
        "output-files": [{"id": "output_dir", "name": "Output directory", "path-template": "[OUTPUT_DIR]",
                          "optional": False}],
        "error-codes": error_codes(),
        "groups": [{"id": "resources", "name": "Resources", "description": "processes, threads, memory, device",
                    "members": [i["id"] for i in inputs
                                if i["id"] in ("nprocs", "omp_nthreads", "mem_mb", "mem_gb", "device")]}],
        "tags": {"domain": ["neuroinformatics", "mri", "neuro-oncology"], "BIDS-App": True},
    }


if __name__ == "__main__":
    json.dump(descriptor(), sys.stdout, indent=2)
    sys.stdout.write("\n")
