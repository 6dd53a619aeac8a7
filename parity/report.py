"""Parity reports: a terminal table, ``report.json`` and a self-contained ``report.html``.

The HTML embeds everything (CSS inline, pictures as ``data:`` PNGs drawn with Pillow), so it can be
mailed or attached to an issue as one file. The first divergent tap (the first failure in
execution order) is highlighted with the module of ours and the official layer that produced it.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effdet_torch import files

from .compare import TapStat, family_summary, first_divergence
from .detections import detection_summary

__all__ = ["Report", "error_chart_png", "format_summary", "format_table", "write_html", "write_json"]


@dataclass
class Report:
    variant: str
    mode: str  # 'live' (official model run now) or 'golden' (recorded reference)
    reference: str  # what the reference is (official dir / golden file)
    ckpt: str
    stats: list[TapStat]
    image_size: tuple[int, int] | None = None
    cases: list[str] = field(default_factory=list)
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # official versions, load report, …
    notes: list[str] = field(default_factory=list)
    pictures: dict[str, str] = field(default_factory=dict)  # caption → PNG path

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stats)

    @property
    def first_divergence(self) -> TapStat | None:
        return first_divergence(self.stats)


def _fmt(v: float | None, spec: str = ".2e") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _cos(v: float | None) -> str:
    return "—" if v is None else f"{v:.9f}"


def _shape(s: tuple[int, ...]) -> str:
    return "×".join(map(str, s)) if s else "scalar"


def format_table(stats: list[TapStat], color: bool = False, only_failures: bool = False) -> str:
    """One line per tap: name, shape, max abs err, max rel err, cosine, the rule's tolerance, the
    allowance of our measured noise (parity.rules), verdict."""
    first = first_divergence(stats)
    rows = [s for s in stats if not (only_failures and s.passed)]
    w = max([len(s.key) for s in rows] + [4])
    red, yellow, reset = ("\033[31m", "\033[33;1m", "\033[0m") if color else ("", "", "")
    head = (f"{'#':>4}  {'tap':<{w}}  {'shape':<16}  {'max abs err':>11}  {'max rel err':>11}  "
            f"{'cosine':>11}  {'tolerance':>9}  {'noise tol':>9}  verdict")
    lines = [head, "-" * len(head)]
    for s in rows:
        i = stats.index(s)
        verdict = "pass" if s.passed else "FAIL"
        if s.passed and "fp32 noise" in s.note:
            verdict = "pass*"
        line = (f"{i:>4}  {s.key:<{w}}  {_shape(s.shape):<16}  {_fmt(s.max_abs_err, '11.3e')}  "
                f"{_fmt(s.max_rel_err, '11.2e')}  {_cos(s.cosine):>11}  {_fmt(s.tolerance, '9.2e')}  "
                f"{_fmt(s.noise_tol, '9.2e'):>9}  {verdict}")
        if s is first:
            line = f"{yellow}{line}  <-- first divergence{reset}"
        elif not s.passed:
            line = f"{red}{line}{reset}"
        lines.append(line)
    if any(s.passed and "fp32 noise" in s.note for s in rows):
        lines.append("pass* = over the 1e-4 rule but within the measured fp32 noise (see the note in report.json)")
    return "\n".join(lines)


def format_summary(report: Report) -> str:
    """Per tap family: count, failures, largest abs error (and its tap), max err/tol, min cosine;
    then the first divergence and the verdict."""
    fams = family_summary(report.stats)
    w = max([len(f.family) for f in fams] + [6])
    lines = [f"{'family':<{w}}  {'taps':>4}  {'failed':>6}  {'max abs err':>11}  {'err/tol':>7}  "
             f"{'min cosine':>11}  worst tap"]
    for f in fams:
        lines.append(f"{f.family:<{w}}  {f.n:>4}  {f.n_failed:>6}  {_fmt(f.max_abs_err, '11.3e')}  "
                     f"{_fmt(f.max_ratio, '7.3f')}  {_cos(f.min_cosine):>11}  {f.worst_tap}")
    first = report.first_divergence
    n_fail = sum(not s.passed for s in report.stats)
    lines += [""] + detection_summary(report.stats)
    lines.append("")
    if first is None:
        lines.append(f"PASS: {len(report.stats)} taps compared, all within tolerance")
    else:
        lines.append(f"FAIL: {n_fail} of {len(report.stats)} taps out of tolerance")
        lines.append(f"first divergence: {first.key}  (err {_fmt(first.max_abs_err)} > tol {_fmt(first.tolerance)})")
        lines.append(f"  ours:     {first.module or '?'}")
        lines.append(f"  official: {first.official or '?'}")
        if first.note:
            lines.append(f"  note:     {first.note}")
    if report.timings:
        lines.append("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items()))
    return "\n".join(lines)


def _report_dict(report: Report) -> dict:
    first = report.first_divergence
    return {
        "variant": report.variant,
        "mode": report.mode,
        "reference": report.reference,
        "ckpt": report.ckpt,
        "image_size": list(report.image_size) if report.image_size else None,
        "cases": report.cases,
        "device": report.device,
        "passed": report.passed,
        "n_taps": len(report.stats),
        "n_failed": sum(not s.passed for s in report.stats),
        "first_divergence": _tap_json(first) if first else None,
        "families": [
            {"family": f.family, "n": f.n, "n_failed": f.n_failed,
             "max_abs_err": f.max_abs_err if np.isfinite(f.max_abs_err) else None, "worst_tap": f.worst_tap,
             "max_err_over_tol": f.max_ratio if np.isfinite(f.max_ratio) else None, "min_cosine": f.min_cosine}
            for f in family_summary(report.stats)
        ],
        "detections": detection_summary(report.stats),
        "taps": [_tap_json(s) for s in report.stats],
        "timings_s": report.timings,
        "meta": report.meta,
        "notes": report.notes,
        "tolerances": {
            "rules": "parity/rules.py (one rule for golden, compare, record and the tests)",
            "tensors": "max|ours - ref| <= max(1e-4 * (1 + max|ref|), 5 * gap32), gap32 = our own fp32-vs-fp64 "
                       "difference at that tap (measured unless --strict); float64 references: "
                       "max(2**-50 * (1 + max|ref|), 10 * noise64)",
            "classes0": "equal except argmax near-ties (official logit gap within the class-logit bound)",
            "detections": "one-to-one match, same class; on the official heads |dscore| <= 1e-5 and IoU >= 0.9999; "
                          "end to end within max(1e-5, 8 sigma_score) and max(1e-4 (1 + max|box|), 8 sigma_box), "
                          "sigma = our own detections' fp32-vs-fp64 difference, after taking the official choice "
                          "at class near-ties and soft-NMS order near-ties; up to 2 L rows unmatched per side, "
                          "L = rows our fp32 list loses to our float64 list; noise-dominated (decided by the "
                          "official heads) when 2 L covers every row; both decide (parity/detections.py)",
        },
    }


def _tap_json(s: TapStat) -> dict:
    """A tap of report.json: its key under ``name`` (the report's schema), then the rest."""
    d = s.to_json()
    return {"name": d.pop("key"), **d}


def write_json(report: Report, path: str | os.PathLike) -> None:
    files.write_json(path, _report_dict(report))


def error_chart_png(stats: list[TapStat], width: int = 1100, height: int = 260) -> bytes:
    """A bar per tap (execution order): log10(err / tolerance); the line at 0 is the tolerance.
    Green passes, orange passes as fp32 noise, red fails; the first divergence gets a marker."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, 10, 12, 30
    pw, ph = width - left - right, height - top - bottom
    lo, hi = -6.0, 2.0  # log10 range of err/tol

    def y_of(v: float) -> int:
        v = min(max(v, lo), hi)
        return int(top + (hi - v) / (hi - lo) * ph)

    for v in range(int(lo), int(hi) + 1):
        y = y_of(v)
        d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        d.text((4, y - 6), f"1e{v:+d}", fill=(90, 90, 90))
    d.line([(left, y_of(0)), (width - right, y_of(0))], fill=(200, 0, 0), width=2)
    d.text((left + 4, y_of(0) - 13), "tolerance", fill=(200, 0, 0))
    n = max(len(stats), 1)
    bw = pw / n
    first = first_divergence(stats)
    for i, s in enumerate(stats):
        err = s.max_abs_err
        if s.bound > 0 and np.isfinite(err):
            r = math.log10(max(err / s.bound, 10 ** lo))
        elif s.bound == 0 and s.passed:  # counts judged by rule (valid_len, near-tie argmax flips)
            r = lo
        else:
            r = hi
        color = (46, 160, 67) if s.passed else (215, 38, 56)
        if s.passed and "fp32 noise" in s.note:
            color = (240, 150, 20)
        x0 = left + i * bw
        d.rectangle([x0, y_of(r), max(x0 + bw - 1, x0 + 1), y_of(lo)], fill=color)
        if s is first:
            d.polygon([(x0 + bw / 2, top + ph + 4), (x0 + bw / 2 - 5, top + ph + 14), (x0 + bw / 2 + 5, top + ph + 14)],
                      fill=(215, 38, 56))
            d.text((min(x0, width - 200), top + ph + 15), f"first divergence: {s.key}", fill=(215, 38, 56))
    d.text((left, 0), "log10(max abs err / tolerance) per tap, in execution order", fill=(60, 60, 60))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600} .noise{color:#bc4c00;font-weight:600}
table{border-collapse:collapse;font-size:12.5px} td,th{border:1px solid #d0d7de;padding:3px 7px;text-align:right}
th{background:#f6f8fa} td.l,th.l{text-align:left} tr.failrow{background:#ffebe9}
tr.first{background:#fff8c5;outline:2px solid #d4a72c} .box{border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;
margin:10px 0;background:#f6f8fa} .bad{border-color:#cf222e;background:#fff5f5} code{font-size:12px}
img{max-width:100%;border:1px solid #d0d7de}
"""


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_html(report: Report, path: str | os.PathLike) -> None:
    """A self-contained HTML page: verdict, first divergence, family summary, error chart, every tap."""
    e = html.escape
    first = report.first_divergence
    n_fail = sum(not s.passed for s in report.stats)
    verdict = (f'<span class="pass">PASS</span> — {len(report.stats)} taps, all within tolerance' if first is None
               else f'<span class="fail">FAIL</span> — {n_fail} of {len(report.stats)} taps out of tolerance')
    p = [f"<!doctype html><html><head><meta charset='utf-8'><title>EfficientDet parity: {e(report.variant)}</title>",
         f"<style>{_CSS}</style></head><body>",
         f"<h1>EfficientDet parity — {e(report.variant)}</h1><p>{verdict}</p>",
         "<table>"]
    facts = [("mode", report.mode), ("reference", report.reference), ("checkpoint", report.ckpt),
             ("cases", ", ".join(report.cases)),
             ("image size (H×W)", _shape(tuple(report.image_size)) if report.image_size else "—"),
             ("device (ours)", report.device)]
    facts += [(f"wall time: {k}", f"{v:.1f} s") for k, v in report.timings.items()]
    versions = report.meta.get("versions")
    if versions:
        facts.append(("official side", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if report.meta.get("official_commit"):
        facts.append(("official commit", report.meta["official_commit"]))
    lr = report.meta.get("load_report")
    if lr:
        facts.append(("official loader", f"{lr.get('loader', '')}: {lr.get('n_weights_equal_to_their_EMA_key', '?')} "
                                         f"of {lr.get('n_keras_weights', '?')} weights equal their EMA key"))
    p += [f"<tr><th class='l'>{e(k)}</th><td class='l'>{e(str(v))}</td></tr>" for k, v in facts]
    p.append("</table>")
    if first is not None:
        p.append("<div class='box bad'><b>First divergence:</b> "
                 f"<code>{e(first.key)}</code> — max abs err {_fmt(first.max_abs_err)} &gt; tolerance "
                 f"{_fmt(first.tolerance)} (cosine {_cos(first.cosine)})<br>"
                 f"produced by ours: <code>{e(first.module or '?')}</code>; official: <code>{e(first.official or '?')}</code>"
                 + (f"<br>{e(first.note)}" if first.note else "") + "</div>")
    for note in report.notes + detection_summary(report.stats):
        p.append(f"<div class='box'>{e(note)}</div>")
    p.append("<h2>Error profile</h2>" + _img_tag(error_chart_png(report.stats), "error per tap"))
    p.append("<h2>Largest error per tap family</h2><table><tr><th class='l'>family</th><th>taps</th><th>failed</th>"
             "<th>max abs err</th><th>max err/tol</th><th>min cosine</th><th class='l'>worst tap</th></tr>")
    for f in family_summary(report.stats):
        cls = " class='failrow'" if f.n_failed else ""
        p.append(f"<tr{cls}><td class='l'>{e(f.family)}</td><td>{f.n}</td><td>{f.n_failed}</td>"
                 f"<td>{_fmt(f.max_abs_err)}</td><td>{_fmt(f.max_ratio, '.3f')}</td><td>{_cos(f.min_cosine)}</td>"
                 f"<td class='l'>{e(f.worst_tap)}</td></tr>")
    p.append("</table>")
    for caption, png in report.pictures.items():
        if Path(png).is_file():
            p.append(f"<h2>{e(caption)}</h2>" + _img_tag(Path(png).read_bytes(), caption))
    p.append("<h2>Every tap (execution order)</h2><table><tr><th>#</th><th class='l'>tap</th><th class='l'>shape</th>"
             "<th>max abs err</th><th>max rel err</th><th>cosine</th><th>tolerance</th><th>noise tol</th><th>verdict</th>"
             "<th class='l'>ours</th><th class='l'>official</th><th class='l'>note</th></tr>")
    for i, s in enumerate(report.stats):
        rc = " class='first'" if s is first else (" class='failrow'" if not s.passed else "")
        noise = s.passed and "fp32 noise" in s.note
        v = ("<span class='noise'>pass*</span>" if noise else "<span class='pass'>pass</span>") if s.passed \
            else "<span class='fail'>FAIL</span>"
        p.append(f"<tr{rc}><td>{i}</td><td class='l'><code>{e(s.key)}</code></td><td class='l'>{_shape(s.shape)}</td>"
                 f"<td>{_fmt(s.max_abs_err, '.3e')}</td><td>{_fmt(s.max_rel_err)}</td><td>{_cos(s.cosine)}</td>"
                 f"<td>{_fmt(s.tolerance)}</td><td>{_fmt(s.noise_tol)}</td><td>{v}</td><td class='l'><code>{e(s.module)}</code></td>"
                 f"<td class='l'><code>{e(s.official)}</code></td><td class='l'>{e(s.note)}</td></tr>")
    p.append("</table>")
    p.append("<h2>Tolerances</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>"
                                                  for k, v in _report_dict(report)["tolerances"].items()) + "</ul>")
    p.append("</body></html>")
    files.atomic_write_text(path, "\n".join(p))
