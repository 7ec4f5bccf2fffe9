# Copyright 2026 The visincontext authors. Licensed under the Apache License, Version 2.0.
"""`visincontext COMMAND ...`: the package's commands under one name (each also has its own entry point)."""

import sys

COMMANDS = {
    "serve": "serve a model with transformers' OpenAI-compatible server",
    "render": "render text into context pages (PNG)",
    "convert-openflamingo": "convert an OpenFlamingo checkpoint.pt into a save_pretrained folder",
}


def usage() -> str:
    lines = [f"  {name:<22} {what}" for name, what in COMMANDS.items()]
    return "usage: visincontext COMMAND [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        try:
            from . import serving
        except ImportError as error:  # no `transformers.cli.serving` in this transformers
            print(f"visincontext serve: error: {error}", file=sys.stderr)
            return 2
        return serving.main(rest)
    if command == "render":
        from .render import main as render_main

        return render_main(rest)
    if command == "convert-openflamingo":
        from .convert_openflamingo_weights_to_hf import main as convert_main

        return convert_main(rest)
    print(f"visincontext: error: unknown command {command!r}\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
