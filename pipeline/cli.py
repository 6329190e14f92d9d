"""Command line: ``python -m pipeline --help`` lists the stages; ``python -m pipeline <stage>`` runs one
with the resolved config in params.yaml; ``python -m pipeline configure --profile demo`` writes it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import (
    PARAMS_FILE,
    PROFILES,
    Config,
    ConfigError,
    load_params,
    load_profile,
    write_params,
)
from pipeline.console import headline, orchestrated, set_verbose, verbose
from pipeline.env import die_with_parent, set_offline_env
from pipeline.errors import StageError
from pipeline.io import exclusive_lock
from pipeline.machine import check_machine, machine_problems
from pipeline.registry import PER_FOLD, STAGES, stage_module


def build_parser() -> argparse.ArgumentParser:
    stage_list = "\n".join(f"  {name:<10} {text}" for name, text in STAGES.items())
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="State Farm pipeline stages (each also a DVC stage and a Prefect task).",
        epilog=f"stages, in DAG order:\n{stage_list}\n\n"
        "Usually run all of them with `dvc repro` or the Prefect flow (`make demo`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true",
                        help="every epoch line and the stage's figures as JSON (also STATEFARM_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    configure = sub.add_parser("configure", help="resolve a profile (+ overrides) into params.yaml")
    configure.add_argument("--profile", default="demo", help=f"a configs/<name>.yaml: {', '.join(PROFILES)} or yours (default demo)")
    configure.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set head.max_epochs=3 (repeatable)")
    configure.add_argument("--out", default=PARAMS_FILE, help="where to write (default params.yaml)")
    show = sub.add_parser("show-config", help="print the resolved config as JSON")
    show.add_argument("--params", default=PARAMS_FILE)
    for name, text in STAGES.items():
        stage = sub.add_parser(name, help=text)
        stage.add_argument("--params", default=PARAMS_FILE, help="resolved config (default params.yaml)")
        if name == "member":  # one DVC matrix item per (member, fold), each cached on its own
            stage.add_argument("--id", dest="member", type=int, default=None, metavar="M",
                               help="train only member M of ensemble.members (default: all)")
        if name in PER_FOLD:
            stage.add_argument("--fold", dest="fold", type=int, default=None, metavar="K",
                               help="train only fold K of split.fold_ids (default: every fold)")
    return parser


def stage_lock(cfg: Config, name: str, options: dict) -> Path:
    """One lock file per stage (per foreach item): each output belongs to one stage."""
    items = [str(options[key]) for key in ("member", "fold") if options.get(key) is not None]
    item = "@" + "-".join(items) if items else ""
    return cfg.paths.root / ".locks" / f"{name}{item}.lock"


def run_stage(name: str, params: str, **options: object) -> dict:
    cfg = load_params(params)
    check_machine(cfg, [name])
    start = time.perf_counter()
    with exclusive_lock(stage_lock(cfg, name, options), f"stage {name}'s outputs"):
        figures = stage_module(name).run(cfg, **options) or {}
    shown = headline(figures)
    if not orchestrated():
        print(f"[{name}] done in {time.perf_counter() - start:.1f}s" + (f": {shown}" if shown else ""), file=sys.stderr,
              flush=True)
    return figures


def note_machine_problems(cfg: Config, path: str) -> None:
    """A config is written whatever machine it is for (a GPU profile on a CPU laptop, for a GPU worker);
    the settings that will not run here are said now, and refused when a stage starts here."""
    problems = machine_problems(cfg, STAGES)
    if problems:
        print(f"note: {path} is written, but some of its stages will not start on this machine (fine if it is "
              "for another one):\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    set_offline_env()
    die_with_parent()
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    try:
        if args.command == "configure":
            cfg = load_profile(args.profile, args.overrides)
            print(f"wrote {write_params(cfg, args.out)} (profile {cfg.profile})")
            note_machine_problems(cfg, args.out)
        elif args.command == "show-config":
            print(json.dumps(load_params(args.params).to_params(), indent=2))
        else:
            options = {key: getattr(args, key) for key in ("member", "fold") if getattr(args, key, None) is not None}
            figures = run_stage(args.command, args.params, **options)
            if figures and verbose():  # always in reports/stages/<stage>.json
                print(json.dumps(figures, indent=2, default=str))
    except (ConfigError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        if args.command in STAGES:
            print(f"[{args.command}] failed: its previous outputs are left in place (every output is written "
                  "atomically); fix the cause and rerun", file=sys.stderr)
        return 2
    return 0
