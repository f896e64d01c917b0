"""``hgscale config [CONFIG] [key=value ...]``: the resolved config with overrides applied, or every key."""
from __future__ import annotations

import argparse
import json
import sys

from hgscale.config import ConfigError, field_docs, load_config
from hgscale.core.status import USER_ERROR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hgscale config",
                                 description="Print the resolved config of CONFIG with overrides applied, or every "
                                             "config key with its default and doc.")
    ap.add_argument("config", nargs="?", help="JSON config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    ap.add_argument("--help-keys", action="store_true", help="list every config key, its default and its doc")
    args = ap.parse_args(argv)
    if args.help_keys or args.config is None:
        for key, doc, default in field_docs():
            print(f"{key:36s} {json.dumps(default):>22s}  {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
