"""The ``compare``, ``record`` and ``visualize`` subcommands of ``effdet-parity`` (parsed in ``effdet_cli/parity.py``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from converters.hparams import parse_hparams
from converters.sources import CheckpointError
from effdet_torch.config import get_config, parse_image_size, resolve_variant_name
from effdet_torch.model import create_model

from .compare import reference_hw, run_ours
from .golden import format_results, golden_cases, run_golden
from .live import Case, OfficialError, case_name, compare_against, load_npz, official_run, sibling_heads
from .references import GoldenError
from .record import is_golden_key, write_golden
from .report import Report, format_summary, format_table, write_html, write_json
from .visualize import render_comparison

__all__ = ["cmd_compare", "cmd_record", "cmd_visualize"]

OFFICIAL_STEPS = ("import", "build", "restore", "case", "eval", "write", "done")


def _err(cmd: str, msg: str, code: int = 1) -> int:
    """``effdet-parity CMD: error: MSG`` on stderr; 1 (bad input) unless ``code`` says 2 (usage)."""
    print(f"effdet-parity {cmd}: error: {msg}", file=sys.stderr)
    return code


class _Progress:
    """A tqdm bar over the stages of a run (official subprocess steps, our model, the comparison)."""
    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, file=sys.stderr, unit="step", leave=False,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")

    def step(self, msg: str, n: int = 1) -> None:
        self.bar.set_description_str(msg[:60])
        self.bar.update(n)

    def official(self, ev: dict) -> None:
        self.step("official: " + ev.get("msg", ev.get("step", "")), 1)

    def close(self) -> None:
        self.bar.close()


def _cases(args):
    cases = []
    for img in args.image or []:
        if not Path(img).is_file():
            raise FileNotFoundError(f"{img}: no such image")
        cases.append(Case(case_name(img), "image", path=str(img)))
    if args.random or not cases:
        cases.insert(0, Case("random", "random", seed=args.seed))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"two inputs would share a case name: {names}")
    return cases


def _pil_decode_note(path: str, official_raw: np.ndarray, case: str) -> str | None:
    from PIL import Image

    try:
        ours = np.asarray(Image.open(path).convert("RGB"))
    except OSError:
        return None
    if ours.shape != official_raw.shape:
        return f"{case}: PIL decodes {path} to {ours.shape}, tf.io.decode_image to {official_raw.shape}"
    diff = int(np.abs(ours.astype(int) - official_raw.astype(int)).max())
    if diff:
        return (f"{case}: PIL and tf.io.decode_image differ by up to {diff} levels on {Path(path).name} "
                "(JPEG decoders); both models were fed the official decode")
    return None


def _dets(run, prefix: str) -> dict[str, np.ndarray]:
    return {k: run[f"{prefix}/{k}"] for k in ("boxes", "scores", "classes", "valid_len")}


def cmd_compare(args: argparse.Namespace) -> int:
    import torch



    t_start = time.time()
    try:
        variant = resolve_variant_name(args.variant)
    except ValueError as e:
        return _err("compare", str(e))
    live = args.automl_dir is not None
    if live == bool(args.golden):
        return _err("compare", "give either --automl-dir DIR (live official model) or --golden FILE (recorded)", 2)
    try:
        hp = parse_hparams(args.hparams, variant) if args.hparams else None
    except (OSError, ValueError) as e:
        return _err("compare", str(e), 2)
    anchors = hp.anchors if hp else None
    hw = parse_image_size(args.image_size) if args.image_size else (hp.image_size if hp else None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    timings: dict[str, float] = {}
    notes: list[str] = []
    meta: dict = {}
    layer_paths = None
    heads_ref = None
    prog = _Progress(len(OFFICIAL_STEPS) + 3 if live else 3, not args.no_progress)
    try:
        if live:
            try:
                cases = _cases(args)
            except (FileNotFoundError, ValueError) as e:
                return _err("compare", str(e))
            hw = hw or get_config(variant).image_size
            try:
                run = official_run(args.automl_dir, variant, args.weights, cases, hw, on_progress=prog.official,
                                   log_path=out / "official_worker.log", anchors=anchors,
                                   num_classes=hp.num_classes if hp else None)
            except (OfficialError, CheckpointError, ValueError) as e:
                return _err("compare", str(e))
            ref, meta, layer_paths = run.tensors, run.meta, run.meta.get("layer_paths")
            if args.coarse:  # the official run records every block/node/repeat; --coarse compares the golden taps
                ref = {k: v for k, v in ref.items() if is_golden_key(k)}
            if args.save_official:  # a golden of this run: compare again later with --golden, no TF

                write_golden(out / "official", ref, meta, detailed=True)
            timings["official model (subprocess)"] = run.secs
            reference = f"official model from {Path(args.automl_dir).resolve()}/efficientdet (live)"
            for c in cases:
                if c.kind == "image":
                    note = _pil_decode_note(c.path, ref[f"input/{c.name}_raw_uint8"], c.name)
                    if note:
                        notes.append(note)
        else:
            ref = {}
            for g in args.golden:
                if not Path(g).is_file():
                    prog.close()
                    return _err("compare", f"{g}: no such file")
                try:
                    ref.update(load_npz(g))
                except GoldenError as e:
                    prog.close()
                    return _err("compare", str(e))
            heads_ref = sibling_heads(Path(args.golden[0]), ref)
            reference = "recorded golden " + ", ".join(map(str, args.golden))
            hw = hw or reference_hw(ref, get_config(variant).image_size)
            if args.image or args.random:
                notes.append("--image/--random are ignored with --golden: every case of the file is compared")
        prog.step("ours: loading the checkpoint")
        t0 = time.time()
        try:
            model = create_model(variant, checkpoint=args.weights, image_size=hw, anchors=anchors)
        except (CheckpointError, ValueError) as e:
            return _err("compare", str(e))
        timings["ours: load + convert"] = time.time() - t0
        prog.step("ours: forward pass and comparison")
        t0 = time.time()
        stats, ours = compare_against(model, ref, image_size=hw, device=args.device, strict=args.strict,
                                      heads_ref=heads_ref, layer_paths=layer_paths, detailed=not args.coarse)
        timings["ours: run + compare"] = time.time() - t0
        prog.step("comparing taps")
    finally:
        prog.close()
    cases_run = golden_cases(list(ref))
    report = Report(variant=variant, mode="live" if live else "golden", reference=reference, ckpt=str(args.weights),
                    stats=stats, image_size=tuple(hw), cases=cases_run, device=args.device, timings=timings,
                    meta=meta, notes=notes)
    for case in cases_run:
        raw_key = f"input/{case}_raw_uint8"
        if raw_key in ref and f"detections/{case}/scores" in ref and not args.no_pictures:
            png = out / f"detections_{case}.png"
            render_comparison(ref[raw_key], _dets(ref, f"detections/{case}"), _dets(ours, f"detections/{case}"), png,
                              title=f"{variant} / {case}")
            report.pictures[f"Detections on {case}: official | ours | overlay"] = str(png)
    timings["total wall time"] = time.time() - t_start
    print(format_table(stats, color=sys.stdout.isatty(), only_failures=args.quiet))
    print()
    print(format_summary(report))
    write_json(report, out / "report.json")
    write_html(report, out / "report.html")
    print(f"wrote {out / 'report.json'} and {out / 'report.html'}")
    return 0 if report.passed else 1


def cmd_record(args: argparse.Namespace) -> int:
    try:
        variant = resolve_variant_name(args.variant)
        cases = _cases(args)
    except (ValueError, FileNotFoundError) as e:
        return _err("record", str(e))
    try:
        hp = parse_hparams(args.hparams, variant) if args.hparams else None
    except (OSError, ValueError) as e:
        return _err("record", str(e), 2)
    anchors = hp.anchors if hp else None
    hw = (parse_image_size(args.image_size) if args.image_size else
          (hp.image_size if hp and hp.image_size else get_config(variant).image_size))
    prog = _Progress(len(OFFICIAL_STEPS), not args.no_progress)
    try:
        run = official_run(args.automl_dir, variant, args.weights, cases, hw, on_progress=prog.official,
                           anchors=anchors, num_classes=hp.num_classes if hp else None)
    except (OfficialError, CheckpointError, ValueError) as e:
        return _err("record", str(e))
    finally:
        prog.close()
    paths = write_golden(args.output, run.tensors, run.meta, detailed=args.detailed)
    print(f"recorded {variant} at {hw[0]}x{hw[1]} (cases: {', '.join(c.name for c in cases)}) in {run.secs:.1f} s:")
    for p in paths.values():
        print(f"  {p}")
    if args.no_check:
        return 0


    try:
        model = create_model(variant, checkpoint=args.weights, image_size=hw, anchors=anchors)
    except (CheckpointError, ValueError) as e:
        print(f"recorded, but our model could not load {args.weights}: {e}", file=sys.stderr)
        return 1
    import torch

    torch.set_grad_enabled(False)
    results = run_golden(model, paths["tensors"], image_size=hw)
    bad = [r for r in results if not r.passed]
    print(f"check: effdet-parity golden on the recording: {len(results) - len(bad)} of {len(results)} taps pass")
    if bad:
        print(format_results(bad))
        return 1
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image



    try:
        variant = resolve_variant_name(args.variant)
    except ValueError as e:
        return _err("visualize", str(e))
    if (args.automl_dir is None) == (args.golden is None):
        return _err("visualize", "give either --automl-dir DIR (live official model) or --golden FILE (recorded)", 2)
    if not Path(args.image).is_file():
        return _err("visualize", f"{args.image}: no such image")
    try:
        hp = parse_hparams(args.hparams, variant) if args.hparams else None
    except (OSError, ValueError) as e:
        return _err("visualize", str(e), 2)
    anchors = hp.anchors if hp else None
    hw = parse_image_size(args.image_size) if args.image_size else (hp.image_size if hp else None)
    if args.automl_dir is not None:
        name = case_name(args.image)
        hw = hw or get_config(variant).image_size
        prog = _Progress(len(OFFICIAL_STEPS), not args.no_progress)
        try:
            run = official_run(args.automl_dir, variant, args.weights, [Case(name, "image", path=str(args.image))], hw,
                               eval_detections=False, on_progress=prog.official, anchors=anchors,
                               num_classes=hp.num_classes if hp else None)
        except (OfficialError, CheckpointError, ValueError) as e:
            return _err("visualize", str(e))
        finally:
            prog.close()
        ref, source = run.tensors, "live official model"
    else:
        if not Path(args.golden).is_file():
            return _err("visualize", f"{args.golden}: no such file")
        try:
            ref = load_npz(args.golden)
        except GoldenError as e:
            return _err("visualize", str(e))
        raw = np.asarray(Image.open(args.image).convert("RGB"))
        cands = [k[len("input/"):-len("_raw_uint8")] for k in ref if k.startswith("input/") and k.endswith("_raw_uint8")]
        if args.case:
            name = args.case
        else:
            same = [c for c in cands if ref[f"input/{c}_raw_uint8"].shape == raw.shape
                    and np.array_equal(ref[f"input/{c}_raw_uint8"], raw)]
            if not same:
                return _err("visualize", f"{args.image} is none of the images recorded in {args.golden} "
                                         f"(cases: {', '.join(cands) or 'none'}); pass --case NAME to pick one")
            name = same[0]
        if f"detections/{name}/scores" not in ref or f"input/{name}_raw_uint8" not in ref:
            return _err("visualize", f"{args.golden} has no detections of case {name!r}")
        if hw is None:
            pre = ref.get(f"input/{name}_preprocessed")
            hw = tuple(pre.shape[1:3]) if pre is not None else get_config(variant).image_size
        source = f"golden {args.golden}"
    try:
        model = create_model(variant, checkpoint=args.weights, image_size=hw, anchors=anchors)
    except (CheckpointError, ValueError) as e:
        return _err("visualize", str(e))
    import torch

    torch.set_grad_enabled(False)
    # the image and the official detections: run_ours then computes only the inference path
    sub = {k: v for k, v in ref.items() if k == f"input/{name}_raw_uint8" or k.startswith(f"detections/{name}/")}
    ours = run_ours(model, sub, image_size=hw, device=args.device, detailed=False).tensors
    out = Path(args.output or f"{name}_{variant}_parity.png")
    info = render_comparison(ref[f"input/{name}_raw_uint8"], _dets(ref, f"detections/{name}"),
                             _dets(ours, f"detections/{name}"), out, title=f"{variant} / {name} ({source})",
                             top=args.top, min_score=args.min_score)
    c = info["counts"]
    print(f"wrote {out} ({info['size'][0]}x{info['size'][1]}): official {c['official']} detections, ours {c['ours']}; "
          f"{c['matched']} matched within tolerance, {c['near']} near, "
          f"{c['official_only']} official-only, {c['ours_only']} ours-only")
    return 0
