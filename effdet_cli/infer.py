"""``effdet-infer``: detect objects in images, folders of images, or videos.

The official inference path end to end (:class:`effdet_torch.detector.Detector`: the official
pre-processing, the network, ONE class-agnostic Gaussian soft-NMS), then for every input an
annotated copy and a JSON of the detections with COCO class names.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from converters.sources import find_release_file
from effdet_torch.coco_names import coco_class_name
from effdet_torch.config import parse_image_size
from effdet_torch.detector import Detector
from effdet_torch.files import atomic_write, write_json
from effdet_torch.model import compile_network, create_model
from evaluation.coco import ImageDecodeError, read_image_rgb
from parity.visualize import load_font

from .common import add_compile, add_device, add_output, add_variant, add_weights, error, keep_freed_memory, parse_args

__all__ = ["InputError", "build_parser", "detections_to_rows", "draw_detections", "main"]

PROG = "effdet-infer"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp"}
VIDEO_HINT = "pip install effdet-parity[video]"

EPILOG = f"""\
examples:
  effdet-infer cat.jpg --variant d0 --weights efficientdet-d0.pth -o out/
  effdet-infer photos/ --variant d2 --weights efficientdet-d2.tar.gz --threshold 0.3 -o out/
  effdet-infer clip.mp4 --variant lite0 --weights efficientdet-lite0.pth --device cuda --half -o out/

For each input <name> it writes, under -o DIR (default ./effdet-out):
  images: <name>.annotated.png (.jpg for JPEG inputs) and <name>.detections.json
  videos: <name>.annotated.mp4 (H.264) and <name>.detections.json (one entry per frame)
JSON detections: class_id (official 1-based id = COCO category id), class_name, score and box as
[xmin, ymin, xmax, ymax] in the original image's pixels. Only detections with score >= --threshold
are drawn and written. The official post-processing clips boxes to the padded network input
only; here they are also clipped to the image. EXIF orientation is not applied (as the official
decoder). Folders: the image and video files directly inside (by extension).

Files are written under a temporary name and renamed when complete; existing outputs are kept
unless --force. An unreadable, empty or non-image input stops the run before anything is written.
Videos need PyAV ({VIDEO_HINT}).
--half runs float16 on CUDA only; on CPU it is refused (CPU float16/bfloat16 is slow and moves
results beyond the parity tolerances): run float32 there.
exit status: 0 done, 1 bad input / weights / runtime error, 2 usage error.
"""


class InputError(Exception):
    """A fault with one input or the run's set-up; the message is one line naming the file."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    path: Path
    kind: str  # 'image' or 'video'
    annotated: Path | None = None
    json: Path | None = None


def collect_inputs(paths: list[Path]) -> list[Job]:
    jobs: list[Job] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                           and q.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
            if not found:
                raise InputError(f"{p}: no image or video files in this folder "
                                 f"(looked for {', '.join(sorted(IMAGE_EXTS | VIDEO_EXTS))})")
            jobs += [Job(q, "video" if q.suffix.lower() in VIDEO_EXTS else "image") for q in found]
        elif p.is_file():
            jobs.append(Job(p, "video" if p.suffix.lower() in VIDEO_EXTS else "image"))
        elif p.exists():
            raise InputError(f"{p}: not a regular file or folder")
        else:
            raise InputError(f"{p}: no such file or folder")
    return jobs


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")


def load_image(path: Path) -> np.ndarray:
    """``[h, w, 3]`` uint8 RGB, or an :class:`InputError` naming the file and the fault."""
    _check_not_empty(path)
    try:
        arr = read_image_rgb(path)
    except ImageDecodeError as e:
        raise InputError(str(e)) from None
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{path}: the image has no pixels ({arr.shape[1]}x{arr.shape[0]})")
    return arr


def import_av():
    try:
        import av
    except ImportError:
        raise InputError(f"reading videos needs PyAV, which is not installed: {VIDEO_HINT}") from None
    return av


def probe_video(path: Path) -> None:
    """Open the container and decode its first frame, or raise an :class:`InputError`."""
    _check_not_empty(path)
    av = import_av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise InputError(f"{path}: no video stream in this file")
            for _ in c.decode(video=0):
                return
        raise InputError(f"{path}: the video has no frames")
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable video ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def plan_outputs(jobs: list[Job], out_dir: Path, force: bool) -> None:
    """Fill in the output paths; refuse collisions, outputs that are inputs, and existing outputs."""
    seen: dict[Path, Path] = {}
    inputs = {j.path.resolve() for j in jobs}
    for j in jobs:
        stem = j.path.stem
        if j.kind == "video":
            ext = ".mp4"
        else:
            ext = ".jpg" if j.path.suffix.lower() in (".jpg", ".jpeg") else ".png"
        j.annotated = out_dir / f"{stem}.annotated{ext}"
        j.json = out_dir / f"{stem}.detections.json"
        for o in (j.annotated, j.json):
            key = o.resolve()
            if key in seen:
                raise InputError(f"{j.path} and {seen[key]} would both write {o}; run them separately or rename one")
            if key in inputs:
                raise InputError(f"{o}: is an input; choose another --output folder")
            seen[key] = j.path
    existing = [o for j in jobs for o in (j.annotated, j.json) if o.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(f"{existing[0]} already exists{more}; pass --force to overwrite")


# ---------------------------------------------------------------------------------------------
# Detections → rows, pictures
# ---------------------------------------------------------------------------------------------

def detections_to_rows(det: dict[str, np.ndarray], width: int, height: int, threshold: float,
                       names: Callable[[int], str]) -> list[dict]:
    """Valid detection rows (``boxes`` ymin, xmin, ymax, xmax in original pixels) with
    ``score >= threshold`` → ``[{class_id, class_name, score, box: [xmin, ymin, xmax, ymax]}]``,
    boxes clipped to the image, in the official output order (descending score)."""
    rows = []
    for (y0, x0, y1, x1), s, c in zip(det["boxes"].tolist(), det["scores"].tolist(), det["classes"].tolist()):
        if not s >= threshold:
            continue
        box = [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
               min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        rows.append({"class_id": int(c), "class_name": names(int(c)), "score": round(float(s), 6),
                     "box": [round(float(v), 3) for v in box]})
    return rows


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
            (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]


def draw_detections(image: np.ndarray, rows: list[dict]) -> np.ndarray:
    """A copy of ``image`` with every row's box and ``name score`` label drawn."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    h, w = image.shape[:2]
    line = max(1, round(min(h, w) / 250))

    font = load_font(max(10, round(min(h, w) / 40)))
    for r in reversed(rows):  # the best on top
        color = _PALETTE[r["class_id"] % len(_PALETTE)]
        x0, y0, x1, y1 = r["box"]
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=line)
        label = f"{r['class_name']} {r['score']:.2f}"
        tb = draw.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 2 * line if y0 - th - 2 * line >= 0 else y0
        draw.rectangle([x0, ty, x0 + tw + 2 * line, ty + th + 2 * line], fill=color)
        text = (0, 0, 0) if sum(color) > 400 else (255, 255, 255)
        draw.text((x0 + line - tb[0], ty + line - tb[1]), label, fill=text, font=font)
    return np.asarray(im)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------

def write_image(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    im = Image.fromarray(image)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        atomic_write(path, lambda tmp: im.save(tmp, format="JPEG", quality=95))
    else:
        atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Runner:
    """The detector with its device/dtype, and the JSON description of the model."""
    def __init__(self, args: argparse.Namespace, weights: Path, device) -> None:
        import torch


        self.torch = torch
        model = create_model(args.variant, checkpoint=weights, image_size=args.image_size)
        self.dtype = torch.float16 if args.half else torch.float32
        model = model.fuse_for_inference().to(device=device, dtype=self.dtype)  # inference only: see EfficientDet.fuse_for_inference
        if args.compile:
            compile_network(model)
        self.det = Detector(model)
        self.threshold = args.threshold
        ncls = model.config.num_classes
        names = model.config.class_names  # recorded with the weights of a model trained here
        self.names = ((lambda c: names[c - 1]) if names is not None else
                      coco_class_name if ncls == 90 else (lambda c: str(c)))
        self.info = {
            "variant": model.config.name,
            "weights": str(weights),
            "image_size": list(self.det.image_size),
            "num_classes": ncls,
            "device": str(device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "postprocess": "official inference path: global (class-agnostic) Gaussian soft-NMS",
        }

    def rows(self, image: np.ndarray) -> list[dict]:
        x, scales = self.det.preprocess([image])
        d = self.det.detect_tensor(x.to(self.dtype), scales)[0]
        return detections_to_rows(d, image.shape[1], image.shape[0], self.threshold, self.names)


def _find_weights(variant: str) -> Path | None:
    for name in (f"{variant}.pth", f"{variant}.safetensors"):
        if Path(name).is_file():
            return Path(name)

    return find_release_file(variant, Path.cwd())


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


# ---------------------------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------------------------

def process_image(job: Job, runner: Runner, threshold: float) -> int:
    image = load_image(job.path)
    rows = runner.rows(image)
    doc = {"source": str(job.path), "width": int(image.shape[1]), "height": int(image.shape[0]),
           "model": runner.info, "threshold": threshold, "box_format": "xyxy (xmin, ymin, xmax, ymax) pixels",
           "detections": rows}
    write_image(job.annotated, draw_detections(image, rows))
    write_json(job.json, doc)
    return len(rows)


def _encoder(av) -> str:
    from av.codec import Codec

    for name in ("libx264", "h264", "mpeg4"):
        try:
            Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec not built into this FFmpeg
            continue
    raise InputError("this PyAV build has no H.264 or MPEG-4 encoder")


def process_video(job: Job, runner: Runner, threshold: float, progress: bool) -> tuple[int, int]:
    from tqdm import tqdm

    av = import_av()
    codec = _encoder(av)
    frames_doc: list[dict] = []
    meta: dict = {}

    def write(tmp: str) -> None:
        try:
            inp = av.open(str(job.path))
        except (av.FFmpegError, OSError) as e:
            raise InputError(f"{job.path}: not a readable video ({e})") from None
        with inp:
            vs = inp.streams.video[0]
            vs.thread_type = "AUTO"
            rate = vs.average_rate or vs.guessed_rate or Fraction(25)
            rate = Fraction(rate).limit_denominator(1001 * 1000)
            total = vs.frames or None
            w, h = vs.codec_context.width, vs.codec_context.height
            ow, oh = w + (w % 2), h + (h % 2)  # yuv420p needs even sizes
            meta.update(width=w, height=h, fps=float(rate))
            with av.open(tmp, "w", format="mp4") as out:
                os_ = out.add_stream(codec, rate=rate)
                os_.width, os_.height, os_.pix_fmt = ow, oh, "yuv420p"
                if codec == "mpeg4":
                    os_.bit_rate = max(1_000_000, ow * oh * 4)
                bar = tqdm(total=total, unit="frame", desc=job.path.name, disable=not progress, file=sys.stderr)
                try:
                    i = 0
                    for frame in inp.decode(vs):
                        img = frame.to_ndarray(format="rgb24")
                        rows = runner.rows(img)
                        t = float(frame.pts * vs.time_base) if frame.pts is not None and vs.time_base else i / float(rate)
                        frames_doc.append({"frame": i, "time_s": round(t, 6), "detections": rows})
                        ann = draw_detections(img, rows)
                        if (ow, oh) != (img.shape[1], img.shape[0]):
                            ann = np.pad(ann, ((0, oh - img.shape[0]), (0, ow - img.shape[1]), (0, 0)), mode="edge")
                        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(ann), format="rgb24")
                        vf.pts = i
                        vf.time_base = Fraction(1) / rate
                        for pkt in os_.encode(vf):
                            out.mux(pkt)
                        i += 1
                        bar.update(1)
                    for pkt in os_.encode():
                        out.mux(pkt)
                except av.FFmpegError as e:
                    raise InputError(f"{job.path}: cannot decode frame {len(frames_doc)} ({e})") from None
                finally:
                    bar.close()
        if not frames_doc:
            raise InputError(f"{job.path}: the video has no frames")

    atomic_write(job.annotated, write)
    try:
        doc = {"source": str(job.path), **meta, "num_frames": len(frames_doc), "model": runner.info,
               "threshold": threshold, "box_format": "xyxy (xmin, ymin, xmax, ymax) pixels", "frames": frames_doc}
        write_json(job.json, doc)
    except BaseException:
        job.annotated.unlink(missing_ok=True)  # the pair is written together or not at all
        raise
    return len(frames_doc), sum(len(f["detections"]) for f in frames_doc)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _threshold(s: str) -> float:
    v = float(s)
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Detect objects with an EfficientDet (the official pre-/post-processing) in "
                               "images, folders of images or videos; write annotated copies and JSON detections.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="image files, folders of images, or video files")
    add_variant(p, default="efficientdet-d0")
    add_weights(p, required=False, help="converted .pth/.safetensors or any official checkpoint (release dir/tarball, "
                                        ".h5); default: <variant>.pth/.safetensors or the release file in the working "
                                        "directory")
    p.add_argument("--threshold", type=_threshold, default=0.4,
                   help="score threshold for what is drawn and written (default 0.4)")
    add_device(p, default="auto", help="cpu, cuda, cuda:N, or auto: cuda when available")
    add_compile(p)
    p.add_argument("--half", action="store_true", help="float16 on CUDA (refused on CPU)")
    p.add_argument("--image-size", help="network input size: N or the official 'WxH' (default: the variant's)")
    add_output(p, default=Path("effdet-out"), type=Path, help="output folder (default ./effdet-out)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-file lines")
    return p


def _err(msg: str) -> None:
    error(PROG, msg)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    keep_freed_memory()
    try:
        if args.image_size is not None:
            parse_image_size(args.image_size)
    except ValueError as e:
        _err(str(e))
        return 2
    try:
        device = _resolve_device(args.device)
    except InputError as e:  # a device this machine does not have: bad input
        _err(str(e))
        return 1
    if args.half and device.type != "cuda":
        _err(f"--half (float16) needs a CUDA device, and this run is on {device}: drop --half "
             f"(CPU float16/bfloat16 is slow and moves results beyond the parity tolerances)")
        return 2
    weights = args.weights or _find_weights(args.variant)
    if weights is None:
        _err(f"no weights for {args.variant}: pass --weights FILE (a converted .pth/.safetensors or an official "
             f"checkpoint; `convert-ckpt --variant {args.variant.removeprefix('efficientdet-')} --download` makes one)")
        return 1
    # every input is read, and every output planned, before anything is written
    try:
        jobs = collect_inputs(args.inputs)
        for j in jobs:
            if j.kind == "image":
                load_image(j.path)
            else:
                probe_video(j.path)
        plan_outputs(jobs, args.output, args.force)
    except InputError as e:
        _err(str(e))
        return 1
    try:
        runner = Runner(args, weights, device)
    except Exception as e:  # noqa: BLE001 - CheckpointError, ValueError, OSError ... one clear message
        _err(f"cannot load the model: {e}")
        return 1
    progress = not args.quiet and sys.stderr.isatty()
    say = (lambda s: None) if args.quiet else print
    try:
        from tqdm import tqdm

        images = [j for j in jobs if j.kind == "image"]
        bar = tqdm(total=len(images), unit="img", disable=not progress or len(images) < 2, file=sys.stderr)
        for j in jobs:
            if j.kind == "image":
                n = process_image(j, runner, args.threshold)
                bar.update(1)
                msg = f"{j.path}: {n} detection(s) with score >= {args.threshold:g} -> {j.annotated}, {j.json}"
            else:
                nf, n = process_video(j, runner, args.threshold, progress)
                msg = f"{j.path}: {nf} frame(s), {n} detection(s) with score >= {args.threshold:g} -> {j.annotated}, {j.json}"
            if bar.disable:
                say(msg)
            else:
                tqdm.write(msg, file=sys.stdout)
        bar.close()
    except InputError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted; the outputs written so far are complete, nothing half-written was kept")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
