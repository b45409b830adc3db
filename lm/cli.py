"""The ``lm`` command: LightningCLI for ``fit|validate|test|predict``, plus tool subcommands.

``lm fit -c recipes/quickstart.yaml --trainer.max_steps=50`` goes to LightningCLI (so
``--print_config`` and dotted overrides come from jsonargparse); ``lm generate|export|bench``
dispatch to ``lm.tools``. User errors print one line (set ``LM_TRACEBACK=1`` for the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "generate": ("lm.tools.generate", "sample text from a checkpoint with the KV cache"),
    "export": ("lm.tools.export", "export a checkpoint (e.g. --to hf for transformers)"),
    "bench": ("lm.bench", "benchmarks: train, decode, moe, mixers, attention, scaling (ratios)"),
    "launch": ("lm.launch", "run a recipe on SLURM (sbatch) or locally through torchrun"),
}

USAGE = "usage: lm {fit,validate,test,predict} -c RECIPE [--key=value ...] | lm {generate,export,bench,launch} ..."


def _lightning_cli(argv: list[str]) -> None:
    from lm.training.recipe import run_cli

    run_cli(None if argv == sys.argv[1:] else argv)


def summarize_parse_error(msg: str) -> str:
    """One line naming the offending key, from jsonargparse's nested multi-line report."""
    outer = re.match(r'Parser key "([^"]+)"', msg)
    prefix = outer.group(1) + "." if outer else ""
    m = re.search(r"unrecognized arguments: --?([\w.\[\]-]+)(?:=(\S*))?", msg)
    if m:
        key = m.group(1) if not outer or m.group(1).startswith(prefix) else prefix + m.group(1)
        return f"{key}: unknown key (see `lm fit -c RECIPE --print_config` for the accepted ones)"
    m = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", msg)
    if m:
        return f"{prefix}{m.group(1)}.{m.group(2)}: unknown key"
    m = re.search(r"File does not exist: '([^']+)'", msg)
    if m:
        return f"recipe file {m.group(1)!r} does not exist"
    inner = re.findall(r'Parser key "([^"]+)":\s*\n\s*(.+)', msg)
    if inner:
        key, why = inner[-1]
        key = key if key.startswith(prefix) else prefix + key
        return f"{key}: {why.strip()}"
    m = re.search(r"[Kk]ey \"?([\w.]+)\"? is not expected", msg)
    if m:
        return f"{prefix}{m.group(1)}: unknown key"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else "invalid arguments"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        for name, (_, doc) in TOOL_COMMANDS.items():
            print(f"  lm {name:9s} {doc}")
        return 0
    cmd = argv[0]
    from lm.errors import LMError
    from lm.malloc import keep_freed_blocks

    keep_freed_blocks()  # CPU: reuse freed activations instead of re-faulting them (lm/malloc.py)

    try:
        if cmd in TRAINER_COMMANDS:
            _lightning_cli(argv)
            return 0
        if cmd in TOOL_COMMANDS:
            return int(importlib.import_module(TOOL_COMMANDS[cmd][0]).main(argv[1:]) or 0)
        print(f"lm: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as e:
        if os.environ.get("LM_TRACEBACK"):
            raise
        print(f"lm: error: {summarize_parse_error(str(e))}", file=sys.stderr)
        return 2
    except (LMError, ValueError, FileNotFoundError) as e:
        if os.environ.get("LM_TRACEBACK"):
            raise
        print(f"lm: error: {_root_message(e)}", file=sys.stderr)
        return 2


def _root_message(e: BaseException) -> str:
    """The innermost user-facing message (jsonargparse and Lightning wrap ours)."""
    from lm.errors import LMError

    while e.__cause__ is not None and isinstance(e.__cause__, (LMError, ValueError, FileNotFoundError)):
        e = e.__cause__
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
