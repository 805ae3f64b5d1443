"""The ``cellsynth`` command line: subcommands over the same functions the widgets call.

Each domain package registers its subcommands; heavy imports happen only when a
subcommand runs. Errors a person can fix (bad values, missing or existing
files) are printed as one ``error:`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import signal
import sys
from typing import Optional, Sequence

from . import __version__

# Modules that provide ``register(subparsers)``, with the subcommands each registers (a test keeps the two
# in step); those not present are skipped.
_COMMAND_MODULES = {
    "cellsynth.layouts._cli": ("layouts",),
    "cellsynth.count._cli": ("count", "train-counter", "evaluate-counter", "export-counter"),
    "cellsynth.stylize._cli": ("stylize", "stylize-dataset", "train-style", "import-token"),
    "cellsynth.stain._cli": ("nsc", "stain", "simulate-stain-pairs", "train-stain", "evaluate-stain"),
    "cellsynth.adapt._cli": ("adapt-counter", "retrain-counter"),
    "cellsynth.batch._cli": ("count-batch",),
}


def _command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand a command line starts with, or None (no words, or a top-level option such as ``-h`` first).

    >>> _command(["count-batch", "in/", "--out", "o"]), _command(["-h", "count"]), _command([])
    ('count-batch', None, None)
    """
    return argv[0] if argv and not argv[0].startswith("-") else None


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or only of ``command`` when a module registers it.

    Importing a subcommand's module can take most of a second (numpy, scipy), and
    a command line names one: ``main`` builds the parser of that one alone (a
    batch then starts its workers sooner). Help and unknown commands get all.
    """
    parser = argparse.ArgumentParser(
        prog="cellsynth",
        description="Synthetic cell layouts, stylization, virtual staining and cell counting.",
    )
    parser.add_argument("--version", action="version", version=f"cellsynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    if command in ("demo", "settings"):
        modules = []
    else:
        modules = [m for m, names in _COMMAND_MODULES.items() if command in names] or list(_COMMAND_MODULES)
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    demo = sub.add_parser("demo", help="open napari with the plugin's widgets and sample data",
                          description="Open napari with the CellSynth widgets docked and the sample layout loaded.")
    demo.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window once drawn, then exit")
    demo.add_argument("--seed", type=int, default=0, help="seed of the sample layout")
    demo.set_defaults(func=_demo)
    st = sub.add_parser("settings", help="show or change the settings shared with napari",
                        description="Show the settings (default device, model cache folder, default counter, "
                                    "downloads without asking) and where each value comes from, or change them "
                                    "in the settings file that napari's Preferences > CellSynth page also edits.")
    st.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="change a setting in the settings file (repeatable), e.g. --set device=cpu")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=_settings)
    return parser


def _demo(args) -> int:
    from ._napari.demo import run_demo

    return run_demo(screenshot=args.screenshot, seed=args.seed)


def _settings(args) -> int:
    import json

    from .settings import ENV, save_settings, setting_sources, settings_path

    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in ENV:
            raise ValueError(f"--set expects NAME=VALUE with NAME one of {sorted(ENV)}, got {item!r}")
        changes[name.strip()] = value.strip()
    if changes:
        save_settings(**changes)
    sources = setting_sources()
    if args.json:
        print(json.dumps({"file": str(settings_path()),
                          "settings": {k: {"value": v, "source": s} for k, (v, s) in sources.items()}}))
    else:
        print(f"settings file: {settings_path()}")
        for name, (value, source) in sources.items():
            print(f"{name} = {json.dumps(value)}  ({source})")
    return 0


def _ask_on_terminal(what: str) -> bool:
    """Ask on the terminal before a download (the ``download_without_asking`` setting skips this)."""
    try:
        answer = input(f"download {what}? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks remove unfinished files."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_unfinished() -> None:
    """After an interrupt: remove the temporary files of writes it cut short outside their ``finally``."""
    from .io import remove_unfinished

    remove_unfinished()


#: Library arguments named in error messages, and the flags a person types instead.
_FLAGS = (("call with offline=False", "run without --offline"), ("offline=False", "no --offline"),
          ("offline=True", "--offline"), ("overwrite=True", "--overwrite"), ("resume=True", "--resume"),
          ("(synthetic=...)", "(--synthetic)"), ("(train=...)", "(TRAIN)"),
          ("workers=", "--workers "), ("num_train_timesteps must", "--timesteps must"), ("block_out_channels must", "--block-out-channels must"))


def _cli_wording(message: str) -> str:
    """An error message with library arguments replaced by the command-line flags."""
    for arg, flag in _FLAGS:
        message = message.replace(f"{arg} ({flag})", flag).replace(arg, flag)
    return message


def _one_line(message: str) -> str:
    """A message on one line (a library may add lines of detail)."""
    return " ".join(message.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if sys.stdin is not None and sys.stdin.isatty():
        from .settings import set_download_confirmer

        set_download_confirmer(_ask_on_terminal)
    try:
        if getattr(args, "command", None) not in (None, "settings"):  # `settings` is where a bad one is fixed
            from .settings import load_settings

            load_settings()  # a setting that cannot work stops every command, not only those that read it
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {_one_line(_cli_wording(str(exc)))}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        what = f"{exc.filename}: " if exc.filename else ""
        print(f"error: cannot read or write {what}{(exc.strerror or str(exc)).lower()}; check the path and "
              "its permissions", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: ran out of memory; use a smaller image, crop, tile or batch size", file=sys.stderr)
        return 2
    except _Terminated:
        _remove_unfinished()
        print("error: terminated (SIGTERM); unfinished files were removed, a re-run resumes where it can",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        _remove_unfinished()
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


def run() -> int:
    """The ``cellsynth`` program: :func:`main`, then an exit without the final garbage collection.

    Every file is written and closed when ``main`` returns; the interpreter's last
    collection of the objects numpy, scipy, dask and matplotlib leave behind takes
    0.2-0.6 s, and ``gc.freeze()`` leaves them to the end of the process instead.
    (``main`` itself is also called in-process, e.g. by tests, so it does not freeze.)
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
