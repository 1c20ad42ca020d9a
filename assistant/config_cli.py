"""`freeze-omni config check [FILE]` and `freeze-omni config show`: the layered configuration."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from assistant.config import (
    SYSTEM_CONFIG_PATH,
    ConfigError,
    LoadedConfig,
    as_dict,
    build,
    load_config,
    parse_assignments,
    read_yaml_layer,
    user_config_path,
)

EXIT_OK = 0
EXIT_BAD_CONFIG = 2


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check or show the layered configuration")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate a config file (or the layers in effect); exit 0 or 2")
    check.add_argument("file", nargs="?", type=Path, default=None,
                       help="check this file alone over the defaults (default: every layer in effect)")
    show = config_sub.add_parser("show", help="print the merged configuration and where each value came from")
    add_layer_flags(show)


def add_layer_flags(p: argparse.ArgumentParser) -> None:
    """--config FILE and --set section.field=value (shared with `freeze-omni run`)."""
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="YAML config layered over /etc/freeze-omni and ~/.config/freeze-omni")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one setting (repeatable); wins over files and environment")


def run_config(args: argparse.Namespace) -> int:
    if args.config_command == "check":
        return _check(args.file)
    return _show(args)


def _check(path: Path | None) -> int:
    try:
        if path is None:
            loaded = load_config(check_paths=True)
            described = ", ".join(_layers_in_effect()) or "defaults only"
        else:
            settings, problems = read_yaml_layer(path)
            loaded = build([settings], problems, check_paths=True)
            described = str(path)
    except ConfigError as err:
        print_problems(err)
        return EXIT_BAD_CONFIG
    print(f"config ok ({described}); models: {loaded.config.models.model_dir or 'not set'}")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    cli, problems = parse_assignments(args.set)
    try:
        if problems:
            raise ConfigError(problems)
        loaded = load_config(args.config, cli=cli)
    except ConfigError as err:
        print_problems(err)
        return EXIT_BAD_CONFIG
    print(render(loaded), end="")
    return EXIT_OK


SECRET_KEYS = frozenset({"server.token"})
"""Shown as `<set>` (or empty): `config show` output ends up in bug reports and logs."""


def render(loaded: LoadedConfig) -> str:
    """The merged configuration as YAML, each value commented with its source (valid as a config
    file, except that secrets are masked)."""
    lines = []
    for section, values in as_dict(loaded.config).items():
        lines.append(f"{section}:")
        for name, value in values.items():
            if f"{section}.{name}" in SECRET_KEYS and value:
                value = "<set>"
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()
            entry = f"  {name}: {text}"
            lines.append(f"{entry:<48} # {loaded.sources[f'{section}.{name}']}")
    return "\n".join(lines) + "\n"


def _layers_in_effect() -> list[str]:
    paths = [SYSTEM_CONFIG_PATH, user_config_path(os.environ)]
    found = [str(p) for p in paths if p.is_file()]
    if any(var.startswith("FREEZE_OMNI_") for var in os.environ):
        found.append("environment")
    return found


def print_problems(err: ConfigError) -> None:
    for problem in err.problems:
        print(f"freeze-omni: config: {problem}", file=sys.stderr)
    count = len(err.problems)
    print(f"freeze-omni: config: {count} problem{'s' if count > 1 else ''}", file=sys.stderr)
