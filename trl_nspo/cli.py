"""The `trl-nspo` command: `calibrate`, `train`, `demo` and `front` (defined in `commands.py`). Only the chosen
command's module is imported, so that `trl-nspo --help` answers at once, without torch, transformers or TRL."""

import sys
from collections.abc import Sequence

USAGE = """usage: trl-nspo {calibrate,train,demo,front} [--help] [options]

  calibrate   compute and save null-space projectors for a model and a general-task dataset
  train       safety GRPO with the null-space constraint (NSPOTrainer), then save (and push) the adapter
  demo        offline end-to-end run on SmolLM2-135M-Instruct with embedded prompts; prints a before/after table
  front       safety gain against general drift of trained adapters, each scaled back by factors α, on held-out prompts

Each command takes `--config file.yaml` and `--help`."""

COMMANDS = ("calibrate", "train", "demo", "front")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from . import commands

    getattr(commands, argv[0])(argv[1:])


if __name__ == "__main__":
    main()
