"""`lynx-compile`: one argparse front for demo, accuracy, calibrate, dump, bench, train, tune.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs, so
`lynx-compile --help` stays fast and needs no compiler. The tools live in
lynx_compile.tools and need the [demo] or [bench] extra; a missing library ends the command
with one line naming the extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lynx_compile._extras import MissingExtraError

SUBCOMMANDS = {
    "demo": (
        "lynx_compile.tools.demo",
        "greedy batched generation on the embedded model, lynx vs inductor",
    ),
    "accuracy": (
        "lynx_compile.tools.accuracy",
        "accuracy vs experts touched for every routing policy",
    ),
    "calibrate": (
        "lynx_compile.tools.calibrate",
        "choose the cheapest routing policy within a distortion budget, per model",
    ),
    "dump": (
        "lynx_compile.dump",
        "write each graph before/after the lynx pass, a report and a picture",
    ),
    "bench": ("lynx_compile.tools.bench", "compile time, speed and experts touched benchmarks"),
    "train": ("lynx_compile.tools.train", "train the embedded TinyMoE on the stdlib sources"),
    "tune": ("lynx_compile.lowering.tuner", "tune Triton launch configs for this GPU (CUDA only)"),
}
EXIT_MISSING_EXTRA = 1


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; the `chosen` subcommand's module adds its own flags."""
    parser = argparse.ArgumentParser(
        prog="lynx-compile",
        description="lynx_compile: torch.compile backend for batch-aware MoE routing.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        if name == chosen:  # only the chosen subcommand's module is imported
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lynx-compile` console script."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return int(importlib.import_module(args._module).run(args) or 0)
    except MissingExtraError as err:
        print(err, file=sys.stderr)  # names the extra to install; no traceback
        return EXIT_MISSING_EXTRA


if __name__ == "__main__":
    sys.exit(main())
