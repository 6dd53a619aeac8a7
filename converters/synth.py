"""Regenerate the synthetic official-format EfficientDet "release" checkpoints.

The goldens in ``shared/golden`` were recorded with synthetic weights made by
the rule ``edet-synth-v2`` (``golden/WEIGHTS_RULE.md``): every value follows
from the variable's checkpoint name, its TF shape, a seed and the calibrated
BN-statistics side-car ``bn_stats/<variant>.npz``.  This module implements
that rule in plain numpy (no TensorFlow) so that any variant's checkpoint can
be rebuilt bit-exactly and checked against the recorded sha256 lists.

Public API
----------
:func:`load_manifest`
    read ``manifests/<variant>.json[.gz]`` (by variant name or by path).
:func:`iter_synth_variables`
    yield ``(checkpoint key, array)`` for every key of the rule, lazily.
:func:`synth_variables`
    the same as a ``dict`` (d7x: ~1.2 GB in memory).
:func:`write_synth_checkpoint`
    write ``model.index`` / ``model.data-00000-of-00001`` / ``checkpoint`` /
    ``model.values_sha256.json`` into a directory, streaming one variable at
    a time.
:func:`main`
    the ``effdet-parity synth-ckpt`` command line (``python -m converters.synth``).

The rule in short (see ``WEIGHTS_RULE.md`` for the authoritative text):

* keys: raw variables of the manifest (``kind`` trainable / non_trainable,
  ``in_release_ckpt`` true), one ``<raw>/ExponentialMovingAverage`` per raw
  variable, ``global_step`` (int64 123456) and optionally ``<trainable>/Momentum``;
* ``rng(K) = numpy.random.default_rng(zlib.crc32(K.encode('utf-8')) ^ seed)``,
  exactly one draw call per key with ``size`` = the TF shape;
* raw values drawn in float64 by the last name component (first match wins),
  cast once to float32; EMA = ``(raw64 + 0.1*s*z_e).astype(float32)``;
  Momentum = ``(0.01*s*z_m).astype(float32)``;
* every ``moving_mean`` / ``moving_variance`` key (raw and EMA) is replaced by
  the side-car value when one is given.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import sys
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RULE_VERSION",
    "DEFAULT_SEED",
    "GLOBAL_STEP",
    "EMA_SUFFIX",
    "MOMENTUM_SUFFIX",
    "RawVar",
    "VarRule",
    "SynthVariables",
    "rule_for",
    "key_rng",
    "raw_variables",
    "synth_keys",
    "iter_synth_variables",
    "synth_variables",
    "normalize_variant",
    "default_golden_dirs",
    "find_manifest",
    "load_manifest",
    "find_bn_stats",
    "load_bn_stats",
    "sha256_of",
    "sha256_document",
    "write_synth_checkpoint",
    "add_arguments",
    "run",
    "build_parser",
    "main",
]

RULE_VERSION = "edet-synth-v2"
DEFAULT_SEED = 1234
GLOBAL_STEP = 123456
EMA_SUFFIX = "/ExponentialMovingAverage"
MOMENTUM_SUFFIX = "/Momentum"
EMA_REL = 0.1  # EMA shadow = raw + EMA_REL * s * N(0, 1)
MOMENTUM_REL = 0.01  # Momentum slot = MOMENTUM_REL * s * N(0, 1)
BN_STAT_NAMES = ("moving_mean", "moving_variance")
GOLDEN_ENV = "EFFDET_GOLDEN_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]

_WSM_RE = re.compile(r"WSM(_[0-9]+)?")


# --------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class VarRule:
    """How the raw value of one variable is drawn (rule table of §3).

    ``dist`` is ``"normal"`` (``mu + sigma * z``) or ``"uniform"``
    (``rng.uniform(low, high)``); ``scale`` is the ``s`` of the EMA/Momentum
    formulas.
    """

    dist: str
    scale: float
    mu: float = 0.0
    sigma: float = 0.0
    low: float = 0.0
    high: float = 0.0

    def draw64(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """The float64 raw value: ONE draw call on ``rng`` with ``size=shape``."""
        if self.dist == "normal":
            z = rng.standard_normal(size=shape)
            return self.mu + self.sigma * z  # evaluated exactly in this form (float64)
        return rng.uniform(self.low, self.high, size=shape)


def rule_for(name: str, shape: tuple[int, ...] | list[int]) -> VarRule:
    """The §3 rule of the raw variable ``name`` with TF shape ``shape``.

    Matched on the last path component, first match wins::

        depthwise_kernel             N(0, 1/sqrt(kh*kw))                 s = sigma
        kernel, pointwise_kernel     N(0, 1/sqrt(prod(shape[:-1])))      s = sigma
        .../class-predict/bias       -4.6 + 0.5 z                         s = 0.5
        bias (any other)             0.05 z                               s = 0.05
        gamma                        U(0.8, 1.2)                          s = 0.2
        beta                         0.05 z                               s = 0.05
        moving_mean                  0.05 z  (side-car overrides)         s = 0.05
        moving_variance              U(0.8, 1.2)  (side-car overrides)    s = 0.2
        WSM, WSM_<n>                 U(0.5, 1.5)                          s = 0.5
    """
    shape = tuple(int(d) for d in shape)
    last = name.rsplit("/", 1)[-1]
    if last == "depthwise_kernel":
        if len(shape) != 4:
            raise ValueError(f"{name!r}: depthwise_kernel must be 4-D [kh,kw,cin,1], got shape {list(shape)}")
        sigma = 1.0 / math.sqrt(shape[0] * shape[1])
        return VarRule("normal", sigma, mu=0.0, sigma=sigma)
    if last in ("kernel", "pointwise_kernel"):
        if len(shape) < 2:
            raise ValueError(f"{name!r}: {last} must be at least 2-D, got shape {list(shape)}")
        sigma = 1.0 / math.sqrt(math.prod(shape[:-1]))
        return VarRule("normal", sigma, mu=0.0, sigma=sigma)
    if last == "bias":
        if name.endswith("class-predict/bias"):
            return VarRule("normal", 0.5, mu=-4.6, sigma=0.5)
        return VarRule("normal", 0.05, mu=0.0, sigma=0.05)
    if last == "gamma":
        return VarRule("uniform", 0.2, low=0.8, high=1.2)
    if last == "beta":
        return VarRule("normal", 0.05, mu=0.0, sigma=0.05)
    if last == "moving_mean":
        return VarRule("normal", 0.05, mu=0.0, sigma=0.05)
    if last == "moving_variance":
        return VarRule("uniform", 0.2, low=0.8, high=1.2)
    if _WSM_RE.fullmatch(last):
        return VarRule("uniform", 0.5, low=0.5, high=1.5)
    raise ValueError(
        f"variable {name!r}: last name component {last!r} is not covered by rule {RULE_VERSION} "
        "(depthwise_kernel, kernel, pointwise_kernel, bias, gamma, beta, moving_mean, "
        "moving_variance, WSM[_<n>])"
    )


def key_rng(key: str, seed: int = DEFAULT_SEED) -> np.random.Generator:
    """``numpy.random.default_rng(zlib.crc32(key.encode('utf-8')) ^ seed)``."""
    return np.random.default_rng(zlib.crc32(key.encode("utf-8")) ^ int(seed))


def _is_bn_stat(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in BN_STAT_NAMES


@dataclass(frozen=True)
class RawVar:
    """A raw (non-slot) variable of the release checkpoint."""

    name: str
    shape: tuple[int, ...]
    trainable: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _variables_of(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "tf1_release_ckpt" in manifest:
        manifest = manifest["tf1_release_ckpt"]
    try:
        return list(manifest["variables"])
    except (KeyError, TypeError):
        raise ValueError(
            "not an EfficientDet golden manifest: expected the key tf1_release_ckpt.variables"
        ) from None


def raw_variables(manifest: Mapping[str, Any]) -> list[RawVar]:
    """The raw variables of the rule (§1), in manifest order.

    ``kind`` trainable / non_trainable with ``in_release_ckpt`` true.  Their
    dtype must be float32.
    """
    out = []
    for v in _variables_of(manifest):
        if v.get("kind") not in ("trainable", "non_trainable") or not v.get("in_release_ckpt", False):
            continue
        if v.get("dtype", "float32") != "float32":
            raise ValueError(f"manifest variable {v['name']!r} has dtype {v['dtype']}; rule {RULE_VERSION} is float32 only")
        out.append(RawVar(str(v["name"]), tuple(int(d) for d in v["shape"]), v["kind"] == "trainable"))
    if not out:
        raise ValueError("the manifest lists no raw release-checkpoint variables")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError("the manifest lists a raw variable twice")
    return out


def synth_keys(manifest: Mapping[str, Any], momentum: bool = False) -> list[str]:
    """Every checkpoint key of the rule, sorted (the TensorBundle order)."""
    keys = ["global_step"]
    for r in raw_variables(manifest):
        keys += [r.name, r.name + EMA_SUFFIX]
        if momentum and r.trainable:
            keys.append(r.name + MOMENTUM_SUFFIX)
    return sorted(keys, key=lambda k: k.encode("utf-8"))


def _check_release_listing(manifest: Mapping[str, Any], raws: list[RawVar]) -> None:
    """Every other key the manifest marks ``in_release_ckpt`` must be one the rule makes."""
    made = {"global_step"} | {r.name for r in raws} | {r.name + EMA_SUFFIX for r in raws}
    listed = {str(v["name"]) for v in _variables_of(manifest) if v.get("in_release_ckpt", False)}
    unknown = sorted(listed - made)
    if unknown:
        raise ValueError(
            f"the manifest lists {len(unknown)} release-checkpoint keys that rule {RULE_VERSION} does not "
            f"generate (e.g. {unknown[0]!r})"
        )


def _check_bn_stats(raws: list[RawVar], bn_stats: Mapping[str, Any]) -> None:
    want: dict[str, tuple[int, ...]] = {}
    for r in raws:
        if _is_bn_stat(r.name):
            want[r.name] = r.shape
            want[r.name + EMA_SUFFIX] = r.shape
    have = set(bn_stats.keys())
    missing = sorted(set(want) - have)
    extra = sorted(have - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} BN-statistics keys missing (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} keys that are not BN statistics of this manifest (e.g. {extra[0]!r})")
        raise ValueError(
            "bn_stats side-car does not match the manifest: " + "; ".join(parts) + " -- side-car of another variant?"
        )


def _bn_value(bn_stats: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(bn_stats[key])
    if tuple(arr.shape) != shape:
        raise ValueError(f"bn_stats[{key!r}] has shape {list(arr.shape)}, the manifest says {list(shape)}")
    if arr.dtype.kind != "f":
        raise ValueError(f"bn_stats[{key!r}] has dtype {arr.dtype}, expected float32")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _warn_no_bn_stats(stacklevel: int = 3) -> None:
    warnings.warn(
        "no BN-statistics side-car given: moving_mean/moving_variance keep the raw rule values "
        "(N(0,0.05) / U(0.8,1.2)), so the checkpoint differs from the goldens and the features of the "
        "model will not stay O(1); pass bn_stats/<variant>.npz for the golden weights",
        UserWarning,
        stacklevel=stacklevel,
    )


class _Synth:
    """Shared state: the raw variables, a seed and an optional side-car."""

    def __init__(
        self,
        manifest: Mapping[str, Any],
        bn_stats: Mapping[str, Any] | None,
        seed: int,
        momentum: bool,
    ) -> None:
        self.raws = raw_variables(manifest)
        _check_release_listing(manifest, self.raws)
        self.by_name = {r.name: r for r in self.raws}
        self.seed = int(seed)
        self.momentum = bool(momentum)
        self.bn_stats = bn_stats
        if bn_stats is not None:
            _check_bn_stats(self.raws, bn_stats)

    def raw64(self, r: RawVar) -> tuple[np.ndarray, VarRule]:
        rule = rule_for(r.name, r.shape)
        return rule.draw64(key_rng(r.name, self.seed), r.shape), rule

    def raw(self, r: RawVar, raw64: np.ndarray) -> np.ndarray:
        if self.bn_stats is not None and _is_bn_stat(r.name):
            return _bn_value(self.bn_stats, r.name, r.shape)
        return np.asarray(raw64.astype(np.float32))

    def ema(self, r: RawVar, raw64: np.ndarray, rule: VarRule) -> np.ndarray:
        key = r.name + EMA_SUFFIX
        if self.bn_stats is not None and _is_bn_stat(r.name):
            return _bn_value(self.bn_stats, key, r.shape)
        z_e = key_rng(key, self.seed).standard_normal(size=r.shape)
        return np.asarray((raw64 + EMA_REL * rule.scale * z_e).astype(np.float32))

    def momentum_slot(self, r: RawVar, rule: VarRule) -> np.ndarray:
        z_m = key_rng(r.name + MOMENTUM_SUFFIX, self.seed).standard_normal(size=r.shape)
        return np.asarray((MOMENTUM_REL * rule.scale * z_m).astype(np.float32))

    def one(self, key: str) -> np.ndarray:
        """The value of a single key (recomputes the raw draw it depends on)."""
        if key == "global_step":
            return np.asarray(GLOBAL_STEP, dtype=np.int64)
        r = self.by_name.get(key)
        if r is not None:
            if self.bn_stats is not None and _is_bn_stat(r.name):
                return _bn_value(self.bn_stats, key, r.shape)
            return self.raw(r, self.raw64(r)[0])
        if key.endswith(EMA_SUFFIX):
            r = self.by_name.get(key[: -len(EMA_SUFFIX)])
            if r is not None:
                if self.bn_stats is not None and _is_bn_stat(r.name):
                    return _bn_value(self.bn_stats, key, r.shape)
                return self.ema(r, *self.raw64(r))
        if self.momentum and key.endswith(MOMENTUM_SUFFIX):
            r = self.by_name.get(key[: -len(MOMENTUM_SUFFIX)])
            if r is not None and r.trainable:
                return self.momentum_slot(r, rule_for(r.name, r.shape))
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for r in self.raws:
            raw64, rule = self.raw64(r)
            yield r.name, self.raw(r, raw64)
            yield r.name + EMA_SUFFIX, self.ema(r, raw64, rule)
            if self.momentum and r.trainable:
                yield r.name + MOMENTUM_SUFFIX, self.momentum_slot(r, rule)
            del raw64
        yield "global_step", np.asarray(GLOBAL_STEP, dtype=np.int64)


def iter_synth_variables(
    manifest: Mapping[str, Any],
    bn_stats: Mapping[str, Any] | None,
    seed: int = DEFAULT_SEED,
    momentum: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, array)`` for every checkpoint key of rule ``edet-synth-v2``.

    Per raw variable (manifest order): the raw value, its
    ``/ExponentialMovingAverage`` shadow, and with ``momentum=True`` (trainable
    variables only) its ``/Momentum`` slot; finally ``global_step``.  Only one
    variable's float64 draw is alive at a time.  Arrays are float32 (C order),
    ``global_step`` a 0-d int64.  ``bn_stats`` (e.g. ``np.load(npz)``) must
    hold exactly the raw and EMA moving_mean/moving_variance keys of the
    manifest; ``None`` keeps their rule values and warns.

    The manifest and the side-car are checked before the first item.
    """
    if bn_stats is None:
        _warn_no_bn_stats()
    return iter(_Synth(manifest, bn_stats, seed, momentum))


def synth_variables(
    manifest: Mapping[str, Any],
    bn_stats: Mapping[str, Any] | None,
    seed: int = DEFAULT_SEED,
    momentum: bool = False,
) -> dict[str, np.ndarray]:
    """All keys of :func:`iter_synth_variables` as a dict (insertion = manifest order)."""
    if bn_stats is None:
        _warn_no_bn_stats()
    return dict(_Synth(manifest, bn_stats, seed, momentum))


class SynthVariables(Mapping):
    """A lazy read-only mapping ``key -> array`` of the rule.

    Values are computed on access and not cached, so a checkpoint writer that
    reads each key once holds one variable at a time.  ``on_value(key, arr)``
    is called after each computed value (progress bars, hashing).
    """

    def __init__(
        self,
        manifest: Mapping[str, Any],
        bn_stats: Mapping[str, Any] | None,
        seed: int = DEFAULT_SEED,
        momentum: bool = False,
        on_value: Any = None,
        *,
        _warn: bool = True,
    ) -> None:
        if bn_stats is None and _warn:
            _warn_no_bn_stats()
        self._synth = _Synth(manifest, bn_stats, seed, momentum)
        self._keys = synth_keys(manifest, momentum)
        self._keyset = frozenset(self._keys)
        self.on_value = on_value

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keyset:
            raise KeyError(key)
        arr = self._synth.one(key)
        if self.on_value is not None:
            self.on_value(key, arr)
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keyset

    def num_elements(self) -> int:
        """Total number of array elements over all keys."""
        n = 1  # global_step
        for r in self._synth.raws:
            n += 2 * r.size
            if self._synth.momentum and r.trainable:
                n += r.size
        return n


# --------------------------------------------------------------------------
# locating the manifest / side-car
# --------------------------------------------------------------------------


def normalize_variant(variant: str) -> str:
    """``'d0'`` / ``'D0'`` / ``'lite3x'`` / ``'efficientdet-d0'`` -> ``'efficientdet-…'``."""
    v = variant.strip().lower()
    if not v.startswith("efficientdet-"):
        v = "efficientdet-" + v
    return v


def default_golden_dirs() -> list[Path]:
    """Where to look for the goldens: ``$EFFDET_GOLDEN_DIR`` if set, else
    ``<repo>/golden`` then ``<repo>/../shared/golden``."""
    env = os.environ.get(GOLDEN_ENV)
    if env:
        return [Path(env)]
    return [REPO_ROOT / "golden", REPO_ROOT.parent / "shared" / "golden"]


def _golden_dirs(golden_dir: str | os.PathLike | None) -> list[Path]:
    return [Path(golden_dir)] if golden_dir is not None else default_golden_dirs()


def _looks_like_path(s: str) -> bool:
    return s.endswith((".json", ".json.gz")) or os.sep in s or (os.altsep is not None and os.altsep in s)


def find_manifest(variant_or_path: str | os.PathLike, golden_dir: str | os.PathLike | None = None) -> Path:
    """Resolve a variant name or a manifest path to an existing manifest file.

    A name is looked up as ``manifests/<efficientdet-…>.json.gz`` (then
    ``.json``, then the same directly in the directory) in ``golden_dir``, or
    in :func:`default_golden_dirs`.  Raises ``FileNotFoundError`` naming every
    path tried.
    """
    s = os.fspath(variant_or_path)
    if isinstance(variant_or_path, os.PathLike) or _looks_like_path(s):
        p = Path(s)
        if not p.is_file():
            raise FileNotFoundError(f"manifest file not found: {p}")
        return p
    name = normalize_variant(s)
    tried = []
    for d in _golden_dirs(golden_dir):
        for sub in ("manifests", "."):
            for ext in (".json.gz", ".json"):
                p = (d / sub / (name + ext)) if sub != "." else (d / (name + ext))
                tried.append(p)
                if p.is_file():
                    return p
    raise FileNotFoundError(
        f"no manifest for variant {name!r}; tried: " + ", ".join(str(p) for p in tried)
        + f" (set {GOLDEN_ENV} or pass golden_dir / --golden-dir, or give the manifest path)"
    )


def load_manifest(variant_or_path: str | os.PathLike, golden_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load a golden manifest (``.json`` or ``.json.gz``) by variant name or path.

    ``variant_or_path``: ``'efficientdet-d0'``, ``'d0'``, ``'lite0'`` … or a
    path to a ``.json.gz`` / ``.json`` file.  See :func:`find_manifest` for
    the search order.
    """
    p = find_manifest(variant_or_path, golden_dir)
    try:
        with open(p, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(p, "rt", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read manifest {p}: {exc}") from exc
    _variables_of(manifest)  # shape check
    return manifest


def find_bn_stats(variant: str, golden_dir: str | os.PathLike | None = None) -> Path:
    """``bn_stats/<efficientdet-…>.npz`` in ``golden_dir`` or the default golden dirs."""
    name = normalize_variant(variant)
    tried = []
    for d in _golden_dirs(golden_dir):
        p = d / "bn_stats" / (name + ".npz")
        tried.append(p)
        if p.is_file():
            return p
    raise FileNotFoundError(f"no BN-statistics side-car for {name!r}; tried: " + ", ".join(map(str, tried)))


def load_bn_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a side-car ``.npz`` into a dict (float32 arrays keyed by checkpoint name)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"BN-statistics side-car not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read BN-statistics side-car {p}: {exc}") from exc


# --------------------------------------------------------------------------
# sha256 lists and the checkpoint writer
# --------------------------------------------------------------------------


def sha256_of(arr: np.ndarray) -> str:
    """sha256 of an array's little-endian C-order bytes."""
    a = np.asarray(arr)
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def sha256_document(
    values: Mapping[str, Mapping[str, Any]],
    *,
    variant: str,
    seed: int,
    bn_stats: str | None,
    momentum: bool,
) -> str:
    """The ``<prefix>.values_sha256.json`` text, byte-for-byte in the golden format.

    ``values`` maps key -> ``{"dtype", "shape", "sha256"}``; keys are sorted.
    The golden files are ``json.dumps(doc, indent=0)`` without a final newline.
    """
    doc = {
        "rule_version": RULE_VERSION,
        "variant": variant,
        "seed": int(seed),
        "bn_stats": bn_stats,
        "ema_rel": EMA_REL,
        "momentum": bool(momentum),
        "no_ema": False,
        "n": len(values),
        "values": {k: dict(values[k]) for k in sorted(values)},
    }
    return json.dumps(doc, indent=0)


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a declared dependency
        return None
    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, file=sys.stdout, leave=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def write_synth_checkpoint(
    variant: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = DEFAULT_SEED,
    bn_stats_path: str | os.PathLike | None = None,
    momentum: bool = False,
    golden_dir: str | os.PathLike | None = None,
    *,
    progress: bool | None = None,
) -> Path:
    """Write the rule's checkpoint of ``variant`` into ``out_dir``; return ``out_dir``.

    Files: ``model.index``, ``model.data-00000-of-00001`` (TF TensorBundle,
    prefix ``model``), ``checkpoint`` (the TF state file naming ``model``) and
    ``model.values_sha256.json`` (golden format: sha256 of every array's
    little-endian C-order bytes).  Existing files of those names are replaced.

    ``variant``: a name (``'d0'``, ``'efficientdet-lite0'``) or a manifest
    path (see :func:`load_manifest`).  ``bn_stats_path``: the side-car
    ``.npz``; the string ``'auto'`` looks up ``bn_stats/<variant>.npz`` in the
    golden directories; ``None`` keeps the raw rule values for the BN moving
    statistics (warns).  Variables are generated and hashed one at a time.
    ``progress``: tqdm bar (default: when stdout is a terminal).
    """
    from converters.tensorbundle import write_bundle

    manifest = load_manifest(variant, golden_dir)
    vname = str(manifest.get("variant") or normalize_variant(os.fspath(variant)))
    out = Path(out_dir)

    if bn_stats_path is not None and os.fspath(bn_stats_path) == "auto":
        bn_stats_path = find_bn_stats(vname, golden_dir)
    bn: dict[str, np.ndarray] | None = None
    if bn_stats_path is not None:
        bn = load_bn_stats(bn_stats_path)

    hashes: dict[str, dict[str, Any]] = {}
    bar = None

    def on_value(key: str, arr: np.ndarray) -> None:
        hashes[key] = {"dtype": arr.dtype.name, "shape": [int(d) for d in arr.shape], "sha256": sha256_of(arr)}
        if bar is not None:
            bar.update(arr.size)

    if bn is None:
        _warn_no_bn_stats()
    lazy = SynthVariables(manifest, bn, seed, momentum, on_value=on_value, _warn=False)
    if progress or (progress is None and sys.stdout.isatty()):
        bar = _progress(lazy.num_elements(), f"synth {vname}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_bundle(out / "model", lazy)
    finally:
        if bar is not None:
            bar.close()
    missing = [k for k in lazy if k not in hashes]
    if missing:  # pragma: no cover - write_bundle reads every key
        raise RuntimeError(f"internal error: {len(missing)} keys were not written (e.g. {missing[0]!r})")
    doc = sha256_document(
        hashes,
        variant=vname,
        seed=seed,
        bn_stats=Path(bn_stats_path).name if bn_stats_path is not None else None,
        momentum=momentum,
    )
    _atomic_write_text(out / "model.values_sha256.json", doc)
    _atomic_write_text(out / "checkpoint", 'model_checkpoint_path: "model"\nall_model_checkpoint_paths: "model"\n')
    return out


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

_DESCRIPTION = f"""\
Regenerate a synthetic official-format EfficientDet release checkpoint with the
bit-reproducible rule {RULE_VERSION} (golden/WEIGHTS_RULE.md): raw variables, their
/ExponentialMovingAverage shadows and global_step, optionally /Momentum slots.
No TensorFlow is needed.

Writes into DIR: model.index, model.data-00000-of-00001, checkpoint (TF state
file) and model.values_sha256.json (sha256 of every array, the format of the
golden sha lists, so `diff` against golden/<variant>/ckpt/model.values_sha256.json
checks bit-exactness)."""

_EPILOG = f"""\
examples:
  %(prog)s d0 --bn-stats ../shared/golden/bn_stats/efficientdet-d0.npz -o /tmp/d0
  %(prog)s efficientdet-lite0 --bn-stats auto -o /tmp/lite0
  %(prog)s path/to/manifest.json.gz --seed 7 -o /tmp/x --force

The manifest of a variant name is looked up in --golden-dir, else ${GOLDEN_ENV},
else <repo>/golden, else <repo>/../shared/golden (manifests/<variant>.json[.gz])."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``synth-ckpt`` arguments to ``parser`` (for a subcommand)."""
    parser.add_argument(
        "variant",
        help="variant name (efficientdet-d0 … d7x, lite0 … lite4, lite3x; the 'efficientdet-' "
        "prefix is optional) or a path to a manifest .json/.json.gz",
    )
    parser.add_argument(
        "-o", "--output", "--out-dir", dest="out_dir", metavar="DIR", required=True,
        help="output directory (created if missing; must be empty unless --force)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, metavar="S",
        help=f"rule seed (default {DEFAULT_SEED}, the seed of every golden)",
    )
    parser.add_argument(
        "--bn-stats", metavar="FILE", default=None,
        help="BN-statistics side-car bn_stats/<variant>.npz that replaces every moving_mean/"
        "moving_variance key (raw and EMA), or 'auto' to take it from the golden directory. "
        "Without it the BN statistics keep the raw rule values (NOT the golden weights; "
        "features will not stay O(1))",
    )
    parser.add_argument(
        "--momentum", action="store_true",
        help="also write the <trainable>/Momentum optimizer slots (not in release checkpoints)",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR, replacing the checkpoint files")
    parser.add_argument(
        "--golden-dir", metavar="DIR", default=None,
        help=f"directory with manifests/ and bn_stats/ (default: ${GOLDEN_ENV}, <repo>/golden, <repo>/../shared/golden)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary line")
    return parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """A standalone parser for ``synth-ckpt``."""
    parser = argparse.ArgumentParser(
        prog=prog or "effdet-parity synth-ckpt",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Execute parsed ``synth-ckpt`` arguments; return the exit status."""
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        print(f"error: output path {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(
            f"error: output directory {out} is not empty; refusing to write into it (pass --force to "
            "replace the checkpoint files there)",
            file=sys.stderr,
        )
        return 2
    import time

    t0 = time.perf_counter()
    try:
        path = write_synth_checkpoint(
            args.variant,
            out,
            seed=args.seed,
            bn_stats_path=args.bn_stats,
            momentum=args.momentum,
            golden_dir=args.golden_dir,
            progress=False if args.quiet else None,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        doc = json.loads((path / "model.values_sha256.json").read_text())
        print(
            f"wrote {doc['n']} tensors of {doc['variant']} (rule {RULE_VERSION}, seed {args.seed}, "
            f"bn_stats {doc['bn_stats']}) to {path / 'model'} in {time.perf_counter() - t0:.1f} s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``effdet-parity synth-ckpt`` / ``python -m converters.synth``."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
