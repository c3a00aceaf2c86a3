"""``bids_postop-models``: list, fetch, import and describe the published models in the local cache.

The cache is ``$BIDS_POSTOP_HOME`` (default ``~/.cache/bids_postop/models``) or ``--home``. Installed
models are used by the participant level with ``--model NAME`` (and ``--brain-model NAME``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bids_postop.errors import EXIT_OK, BidsPostopError

EPILOG = """\
examples:
  bids_postop-models list
  bids_postop-models fetch MRI_GBM_Postop_FV_2p MRI_Brain
  bids_postop-models fetch MRI_GBM_Postop_FV_5p --catalogue raidionics_cloud_models_list_github.csv
  bids_postop-models import ~/Downloads/Raidionics-MRI_GBM_Postop_FV_5p-ONNX_v12.zip --name MRI_GBM_Postop_FV_5p
  bids_postop-models info MRI_GBM_Postop_FV_5p

offline machines: download the zip URL shown by `list` or `info` elsewhere, copy it, then `import` it.
exit codes: 0 ok, 64 unknown model / bad archive / checksum mismatch / download failure.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bids_postop-models", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None,
                        help="model cache folder (default: $BIDS_POSTOP_HOME or ~/.cache/bids_postop/models)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,fetch,import,info}")
    catalogue_help = ("catalogue CSV (URL or path) in the Raidionics release format; default: the one shipped "
                      "with bids_postop")

    p = sub.add_parser("list", help="catalogue models and installed models")
    p.add_argument("--catalogue", default=None, metavar="URL|PATH", help=catalogue_help)

    p = sub.add_parser("fetch", help="download, verify (md5) and install models")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--catalogue", default=None, metavar="URL|PATH", help=catalogue_help)
    p.add_argument("--force", action="store_true", help="download and replace an installed model")
    p.add_argument("--no-deps", action="store_true", help="do not fetch the models this one depends on")
    p.add_argument("--require-checksum", action="store_true",
                   help="refuse models whose md5 the catalogue does not give")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=60, help="network timeout in seconds (default: 60)")

    p = sub.add_parser("import", help="install a model .zip or folder from this machine")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--name", default=None, help="name in the cache (default: the model folder's name)")
    p.add_argument("--md5", default=None, help="expected md5 of the zip")
    p.add_argument("--force", action="store_true", help="replace an installed model of that name")

    p = sub.add_parser("info", help="what is known of one model")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--catalogue", default=None, metavar="URL|PATH", help=catalogue_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _list(args: argparse.Namespace) -> int:
    from bids_postop.models import registry

    entries = registry.read_catalogue(args.catalogue)
    installed = registry.installed_models(args.home)
    print(f"model cache: {registry.models_home(args.home)}")
    print(f"{'name':<24}{'installed':<11}{'md5':<10}url / folder")
    for name, entry in entries.items():
        print(f"{name:<24}{'yes' if name in installed else 'no':<11}{'known' if entry.md5 else 'unknown':<10}"
              f"{installed.get(name, entry.url)}")
    for name, folder in installed.items():
        if name not in entries:
            print(f"{name:<24}{'yes':<11}{'-':<10}{folder}")
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    from bids_postop.models import registry

    info = registry.model_info(args.name, home=args.home, catalogue=args.catalogue)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    from bids_postop.models import registry

    try:
        if args.command == "list":
            return _list(args)
        if args.command == "info":
            return _info(args)
        if args.command == "fetch":
            for name in args.names:
                folder = registry.fetch(name, catalogue=args.catalogue, home=args.home, force=args.force,
                                        dependencies=not args.no_deps, require_checksum=args.require_checksum,
                                        progress=not args.quiet, timeout=args.timeout)
                print(f"{name}: {folder}")
            return EXIT_OK
        folder = registry.import_model(args.path, name=args.name, home=args.home, md5=args.md5, force=args.force)
        print(f"{folder.name}: {folder}")
        return EXIT_OK
    except BidsPostopError as exc:
        print(f"bids_postop-models: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nbids_postop-models: interrupted; a partial download is kept and resumed next time", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
