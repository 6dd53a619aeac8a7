"""Every console script follows one convention (effdet_cli/common.py, README "Command-line convention"):
``--variant`` (short or full name, unknown names suggest the nearest), ``--weights`` for what is loaded,
``-o/--output``, ``--device``, errors as ``<prog>: error: ...``, exit 0 ok / 1 bad input or failed check /
2 usage, a real ``--help`` for every subcommand, and the old spellings as hidden aliases."""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import pytest

from effdet_cli import anchors, bench, convert, evaluate, export, infer, parity, train
from effdet_cli.common import parse_args, variant_type

REPO = Path(__file__).resolve().parents[1]

PARSERS = {
    "convert-ckpt": convert.build_parser,
    "effdet-infer": infer.build_parser,
    "effdet-eval": evaluate.build_parser,
    "effdet-train": train.build_parser,
    "effdet-bench": bench.build_parser,
    "effdet-anchors": anchors.build_parser,
}
SUBCOMMANDS = {
    "effdet-parity": (parity.build_parser, ("golden", "compare", "record", "visualize", "synth-ckpt", "train-golden")),
    "effdet-export": (export.build_parser, ("onnx", "torch-export", "tf1", "h5")),
}
MAINS = {"convert-ckpt": convert.main, "effdet-infer": infer.main, "effdet-eval": evaluate.main,
         "effdet-train": train.main, "effdet-bench": bench.main, "effdet-parity": parity.main,
         "effdet-export": export.main, "effdet-anchors": anchors.main}


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(name, make()) for name, make in PARSERS.items()]
    for name, (make, subs) in SUBCOMMANDS.items():
        p = make()
        choices = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
        assert set(subs) == set(choices), f"{name}: subcommands {sorted(choices)}"
        out += [(f"{name} {s}", choices[s]) for s in subs]
    return out


# commands that run no model of ours on a device of the user's choice: the formats writers, the ONNX
# exporter (traced and checked with onnxruntime on the CPU) and train-golden (CPU: its float64 rerun
# measures our rounding there); synth-ckpt writes a checkpoint file by rule
NO_DEVICE = {"effdet-export onnx", "effdet-export tf1", "effdet-export h5", "effdet-parity train-golden",
             "effdet-parity synth-ckpt", "effdet-anchors"}  # effdet-anchors: box geometry on the CPU, no model
NO_OUTPUT = {"effdet-parity golden", "effdet-parity train-golden"}  # they write --json reports only
OLD = {"--ckpt", "--out", "--out-dir", "--load-weights", "--load_weights", "--saved-path", "--saved_path", "--json"}


@pytest.mark.parametrize("name,parser", _all_parsers(), ids=lambda x: x if isinstance(x, str) else "")
def test_options_follow_the_convention_and_hide_old_spellings(name, parser):
    shown = {s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings}
    hidden = {s for a in parser._actions if a.help is argparse.SUPPRESS for s in a.option_strings}
    assert "--variant" in shown, name
    assert "--weights" in shown or name in ("effdet-parity synth-ckpt", "effdet-anchors"), name
    assert {"-o", "--output"} <= shown or name in NO_OUTPUT, name
    assert "--device" in shown or name in NO_DEVICE, name
    assert not (shown & OLD) or name in ("effdet-parity golden", "effdet-parity train-golden"), \
        f"{name}: old spellings shown: {shown & OLD}"
    assert "--ckpt" in hidden or "--weights" not in shown or name == "effdet-train", name
    assert "--out" in hidden or "--output" not in shown, name
    flags = [s for a in parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))
    assert "usage:" in parser.format_help()


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_help_exits_zero_for_every_command(prog, capsys):
    assert MAINS[prog](["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["d0", "D0", "efficientdet-d0", " d0 "])
def test_variant_names_short_or_full(name):
    assert variant_type(name) == "efficientdet-d0"
    assert variant_type("lite3x") == "efficientdet-lite3x" and variant_type("d7x") == "efficientdet-d7x"


@pytest.mark.parametrize("prog,argv", [
    ("convert-ckpt", ["--variant", "d8"]),
    ("effdet-infer", ["x.png", "--variant", "lite9"]),
    ("effdet-eval", ["--variant", "d8", "--weights", "w", "--images", "i", "--annotations", "a"]),
    ("effdet-train", ["--variant", "d8"]),
    ("effdet-bench", ["--variant", "d8"]),
    ("effdet-anchors", ["--variant", "d8", "-p", "x"]),
    ("effdet-parity", ["golden", "--variant", "d8", "--weights", "w", "--golden", "g"]),
    ("effdet-export", ["onnx", "--variant", "d8", "--weights", "w", "-o", "o.onnx"]),
])
def test_unknown_variant_is_a_usage_error_that_suggests(prog, argv, capsys):
    assert MAINS[prog](argv) == 2
    err = capsys.readouterr().err
    assert f"{prog.split()[0]}" in err and "error:" in err and "Did you mean" in err


@pytest.mark.parametrize("prog,argv", [
    ("convert-ckpt", ["--variant", "d0", "--weights", "{tmp}/missing", "-o", "{tmp}/o.pth"]),
    ("effdet-infer", ["{tmp}/missing.png", "--variant", "d0", "--weights", "{tmp}/w.pth", "-o", "{tmp}/out"]),
    ("effdet-eval", ["--variant", "d0", "--weights", "{tmp}/w.pth", "--images", "{tmp}", "--annotations",
                     "{tmp}/missing.json"]),
    ("effdet-train", ["--variant", "d0", "-p", "missing", "--projects-dir", "{tmp}"]),
    ("effdet-bench", ["--variant", "d0", "--weights", "{tmp}/missing.pth", "--no-effdet"]),
    ("effdet-anchors", ["--variant", "d0", "-p", "missing", "--projects-dir", "{tmp}"]),
    ("effdet-parity", ["golden", "--variant", "d0", "--weights", "{tmp}/w", "--golden", "{tmp}/missing.npz"]),
    ("effdet-export", ["onnx", "--variant", "d0", "--weights", "{tmp}/missing.pth", "-o", "{tmp}/o.onnx"]),
])
def test_bad_input_is_one_error_line_and_exit_1(prog, argv, tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(b"not a torch file")
    assert MAINS[prog]([a.format(tmp=tmp_path) for a in argv]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    prefix = f"{prog} golden" if prog == "effdet-parity" else prog
    assert err and err[0].startswith(f"{prefix}: error: "), err


@pytest.mark.parametrize("make,argv,dest,value", [
    (convert.build_parser, ["d0", "--ckpt", "x"], "weights", "x"),
    (convert.build_parser, ["d0", "--ckpt", "x"], "variant_positional", "efficientdet-d0"),
    (evaluate.build_parser, ["--variant", "d0", "--ckpt", "x", "--images", "i", "--annotations", "a", "--out", "r.json"],
     "output", "r.json"),
    (train.build_parser, ["-c", "0", "--load_weights", "last", "--saved_path", "L"], "weights", "last"),
    (train.build_parser, ["-c", "0", "--load-weights", "w.pth", "--saved-path", "L"], "output", "L"),
    (bench.build_parser, ["--json", "b.json"], "output", "b.json"),
])
def test_old_spellings_still_parse(make, argv, dest, value):
    assert getattr(make().parse_args(argv), dest) == value


def test_subcommand_old_spellings_still_parse():
    p = parity.build_parser()
    a = p.parse_args(["compare", "--variant", "d0", "--ckpt", "c", "--golden", "g", "--out", "rep"])
    assert (a.weights, a.output, a.variant) == ("c", "rep", "efficientdet-d0")
    a = p.parse_args(["synth-ckpt", "d0", "--out-dir", "o"])
    assert (a.variant_positional, a.output) == ("d0", "o")
    a = p.parse_args(["record", "--variant", "d0", "--ckpt", "c", "--automl-dir", "A", "-o", "o"])
    assert (a.weights, a.output) == ("c", "o")


@pytest.mark.parametrize("prog,argv,missing", [
    ("effdet-eval", ["--variant", "d0", "--images", "i", "--annotations", "a"], "--weights"),
    ("effdet-parity", ["golden", "--variant", "d0", "--golden", "g"], "--weights"),
    ("effdet-export", ["h5", "--variant", "d0", "--weights", "w"], "-o/--output"),
])
def test_required_options_with_aliases_are_still_required(prog, argv, missing, capsys):
    assert MAINS[prog](argv) == 2
    assert missing in capsys.readouterr().err


_FAULTS = """
import ctypes, resource, sys
from effdet_cli.common import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
n = 64 << 20  # above glibc's largest mmap threshold (32 MiB)
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n)
print(int(kept), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_network_commands_keep_freed_memory():
    """First principles: a freed 64 MiB block is unmapped by default, so allocating it again faults in
    all 16 384 of its 4 KiB pages; kept in the heap, it is reused without a fault. The network-running
    commands set it up (in-process users of the library keep the default)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env,
                             cwd=REPO, check=True).stdout.split()
        faults[mode] = (int(out[0]), int(out[1]))
    if faults["default"][1] < 10_000:
        pytest.skip(f"this machine maps large blocks in huge pages: no fault cost to remove ({faults})")
    assert faults["keep"] == (1, faults["keep"][1]) and faults["keep"][1] < 1_000, faults
    for module in (infer, evaluate, train):
        assert "keep_freed_memory()" in inspect.getsource(module.main), module.__name__


def _readme_commands() -> list[str]:
    """Every command line of the README's code blocks (continuation lines joined, comments dropped),
    and every inline one that names a variant: what a user copies."""
    import re

    text = (REPO / "README.md").read_text()
    progs = tuple(f"{p} " for p in [*PARSERS, *SUBCOMMANDS])
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(progs):
                found.append(line)
    found += [m for m in re.findall(r"`([^`\n]+)`", text) if m.startswith(progs) and "--variant " in m]
    return found


README_COMMANDS = _readme_commands()


def test_readme_has_commands():
    assert len(README_COMMANDS) >= 20 and any(c.startswith("effdet-train ") for c in README_COMMANDS)


@pytest.mark.parametrize("line", README_COMMANDS)
def test_readme_commands_parse(line, capsys):
    """Each command the README shows parses with today's options (documentation drift is a usage
    error here, not a user's first experience)."""
    import shlex

    argv = shlex.split(line, comments=True)
    prog, argv = argv[0], argv[1:]
    make = PARSERS.get(prog) or SUBCOMMANDS[prog][0]
    args = parse_args(make(), argv)
    assert not isinstance(args, int), f"{line!r}: {capsys.readouterr().err.strip()}"


def test_worker_message_unwraps_only_a_loader_workers_reraise():
    """A DataLoader worker's exception comes back with the worker's traceback as its message: the
    original line is taken from it. Any other message, one line or several, stays whole."""
    from torch.utils.data import DataLoader, Dataset

    from effdet_cli.common import worker_message

    class Broken(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, k):
            raise ValueError("images/a.png: cannot decode the image")

    with pytest.raises(ValueError) as e:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "\n" in str(e.value) and worker_message(e.value) == "images/a.png: cannot decode the image"
    assert worker_message(ValueError("first\nsecond")) == "first\nsecond"
    assert worker_message(ValueError("Caught in the act")) == "Caught in the act"
