"""The one convention of every console script.

- ``--variant NAME``: ``d0``…``d7x``, ``lite0``…``lite4``, ``lite3x`` or the full official name; an
  unknown name is a usage error that suggests the nearest names.
- ``--weights PATH``: what is loaded (a converted ``.pth``/``.safetensors`` or an official checkpoint).
- ``-o/--output PATH``: what is written; ``--device``: ``cpu``, ``cuda``, ``cuda:N`` (some tools: ``auto``).
- Errors: one line ``<prog>: error: <what>`` on stderr (argparse's own format).
- Exit status: 0 done, 1 bad input or a failed check, 2 usage error.
- The commands that run the network over many images (``effdet-infer``, ``effdet-eval``,
  ``effdet-train``) own their process, so they let glibc keep freed memory (:func:`keep_freed_memory`).

Old spellings keep working as hidden aliases (``--ckpt`` for ``--weights``, ``--out`` for ``--output``,
convert-ckpt's positional variant), so earlier commands and users' scripts keep running.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

from effdet_torch.config import resolve_variant_name

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "VARIANT_HELP", "variant_type", "add_variant", "add_weights",
           "add_output", "add_device", "parse_args", "error", "count_or_auto", "keep_freed_memory"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
VARIANT_HELP = "d0..d7, d7x, lite0..lite4, lite3x, or the full official name (efficientdet-d0)"


def variant_type(name: str) -> str:
    """argparse ``type=``: the full official name of ``name``; unknown names name the nearest ones."""
    try:
        return resolve_variant_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory in the process for reuse (``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` 2 GiB).

    By default glibc maps every allocation above 32 MiB afresh and unmaps it when freed, so each large
    activation is page-faulted in again on every forward: measured, default path, one image, d7x at
    1536²: 2.4 M faults and 6.5 s, kept 0 faults and 4.7 s (peak RSS 1.9 → 2.5 GB); d4 0.97 → 0.83 s;
    d0 unchanged. Process-wide, so only for the commands that own their process; the library leaves the
    allocator alone. Not where ``GLIBC_TUNABLES`` sets malloc tunables itself, and not off glibc.
    Returns whether it was set.
    """
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def count_or_auto(value: str) -> int | str:
    """``auto`` or a whole number ``>= 0`` (process counts)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 0, got {value!r}")
    return n


def add_variant(p: argparse.ArgumentParser, required: bool = True, default: str | None = None,
                nargs: str | None = None, help: str | None = None) -> None:
    """``--variant NAME`` (resolved to the full official name)."""
    kw = {"nargs": nargs} if nargs else {}
    text = help or VARIANT_HELP
    if default is not None:
        text += f" (default {default})"
    p.add_argument("--variant", type=variant_type, required=required and default is None, default=default,
                   metavar="NAME", help=text, **kw)


def add_weights(p: argparse.ArgumentParser, required: bool = True, help: str | None = None,
                aliases: tuple[str, ...] = ("--ckpt",)) -> None:
    """``--weights PATH``; ``aliases`` (default ``--ckpt``) are accepted and hidden from ``--help``."""
    p.add_argument("--weights", metavar="PATH", dest="weights",
                   help=help or "a converted .pth/.safetensors or an official checkpoint "
                   "(TF1 folder/prefix, release tarball, Keras .h5)")
    for a in aliases:
        p.add_argument(a, dest="weights", metavar="PATH", help=argparse.SUPPRESS)
    if required:  # checked by parse_args: argparse's own check would refuse the hidden alias
        _require(p, "weights", "--weights")


HPARAMS_HELP = ("what an official checkpoint was trained with, in the official --hparams forms: the run's "
                "config.yaml, or a string such as 'aspect_ratios=1.0*2.0*0.5,num_scales=3,anchor_scale=4.0,"
                "num_classes=7' (lists spelled with *; aspect-ratio pairs [x, y] only in YAML): its anchors, "
                "classes and image size")


def add_hparams(p: argparse.ArgumentParser, help: str = HPARAMS_HELP) -> None:
    """``--hparams FILE|STRING`` (read by :func:`hparams_of`)."""
    p.add_argument("--hparams", metavar="FILE|STRING", help=help)


def hparams_of(args: argparse.Namespace, variant: str):
    """The parsed ``--hparams`` (:class:`converters.hparams.OfficialHparams`) of ``variant``, or None;
    ``ValueError`` naming the field at fault."""
    from converters.hparams import parse_hparams

    return parse_hparams(args.hparams, variant) if getattr(args, "hparams", None) else None


def add_output(p: argparse.ArgumentParser, required: bool = False, default=None, help: str = "output path",
               type=None) -> None:
    """``-o/--output PATH``; the old ``--out`` is accepted and hidden from ``--help``."""
    kw = {"type": type} if type else {}
    p.add_argument("-o", "--output", dest="output", default=default, metavar="PATH", help=help, **kw)
    p.add_argument("--out", dest="output", metavar="PATH", help=argparse.SUPPRESS, **kw)
    if required:
        _require(p, "output", "-o/--output")


def _require(p: argparse.ArgumentParser, dest: str, flag: str) -> None:
    """Record on ``p`` (as parser defaults, so a subcommand's parser brings its own) that ``dest`` must be given."""
    p.set_defaults(_required=(*(p.get_default("_required") or ()), (dest, flag)), _parser=p)


def add_device(p: argparse.ArgumentParser, default: str = "cpu", help: str | None = None) -> None:
    """``--device``: cpu, cuda or cuda:N (``auto``: cuda when available)."""
    p.add_argument("--device", default=default, metavar="DEVICE",
                   help=(help or "cpu, cuda or cuda:N") + f" (default {default})")


def add_compile(p: argparse.ArgumentParser) -> None:
    """``--compile``: ``torch.compile`` the network (see :func:`effdet_torch.model.compile_network`)."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (inductor; needs a C++ compiler on the CPU): the first batch "
                        "compiles for a minute or more, later ones run faster; outputs equal up to fp32 rounding "
                        "(tests/test_compile.py)")


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """``p.parse_args(argv)`` with the "required" check of options that have hidden aliases (argparse's
    own check would refuse the alias); a usage error or ``--help`` returns its exit status instead of raising."""
    try:
        args = p.parse_args(argv)
        required, owner = vars(args).pop("_required", ()), vars(args).pop("_parser", p)
        missing = [flag for dest, flag in required if getattr(args, dest, None) is None]
        if missing:  # reported by the parser (subcommand) that declared them, as argparse would
            owner.error("the following arguments are required: " + ", ".join(missing))
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    return args


def worker_message(e: BaseException) -> str:
    """``e``'s own message. An exception re-raised from a DataLoader worker carries the worker's
    traceback in its message ("Caught X in DataLoader worker process 0.\nOriginal Traceback ..."),
    whose last line holds the original message after the exception's name; any other message is
    returned as it is."""
    text = str(e).strip()
    if not (text.startswith("Caught ") and "in DataLoader worker process" in text.partition("\n")[0]):
        return text
    last = text.splitlines()[-1]
    _, sep, message = last.partition(f"{type(e).__name__}: ")
    return message if sep else last


def error(prog: str, message: str, code: int = EXIT_FAILED) -> int:
    """Print ``<prog>: error: <message>`` on stderr and return ``code`` (1: bad input or a failed check)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
