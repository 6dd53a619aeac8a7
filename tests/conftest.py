"""Shared test fixtures: where the goldens are, TF availability, the regenerated synthetic checkpoints,
the converted d0 model of the bundled goldens and its golden runs (session-scoped: built once)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch.export (effdet-export) and torch.optim import triton through torch._dynamo; loading triton after
# TensorFlow kills the process (measured, torch 2.14.1 + TF 2.21: `import tensorflow; import triton` ->
# SIGSEGV; the reverse order works), so the torch side is loaded here, before any test module imports
# TensorFlow (test_ops_vs_tf does at collection).
try:
    import torch._dynamo  # noqa: F401
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]
PROJECT_GOLDEN = REPO / "golden"
SHARED_GOLDEN = Path(os.environ.get("EFFDET_SHARED_GOLDEN", REPO.parent / "shared" / "golden"))
#: the bundled official d0 recordings (synthetic weights, seed 1234, 256x256): golden/README.md
D0_GOLDEN = PROJECT_GOLDEN / "efficientdet-d0"
D0_GOLDEN_FILES = ("tensors_random.npz", "tensors_chelsea.npz")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("effdet-parity")
    group.addoption("--automl-dir", default=os.environ.get("EFFDET_AUTOML_DIR"),
                    help="a google/automl checkout (its efficientdet/ is imported for live parity tests)")
    group.addoption("--ckpt-dir", default=os.environ.get("EFFDET_CKPT_DIR"),
                    help="folder with official release checkpoints (efficientdet-d0/, *.tar.gz, *.h5)")


@pytest.fixture(scope="session")
def automl_dir(request: pytest.FixtureRequest) -> Path:
    d = request.config.getoption("--automl-dir")
    if not d:
        pytest.skip("needs the official code: pass --automl-dir=DIR (a google/automl checkout)")
    p = Path(d)
    if not (p / "efficientdet").is_dir():
        pytest.skip(f"--automl-dir {p} has no efficientdet/ folder")
    return p


@pytest.fixture(scope="session")
def ckpt_dir(request: pytest.FixtureRequest) -> Path | None:
    d = request.config.getoption("--ckpt-dir")
    return Path(d) if d else None


@pytest.fixture(scope="session")
def shared_golden() -> Path:
    """``../shared/golden`` (official recordings incl. the img1 case); skip when absent."""
    if not SHARED_GOLDEN.is_dir():
        pytest.skip(f"shared goldens not found at {SHARED_GOLDEN} (set EFFDET_SHARED_GOLDEN)")
    return SHARED_GOLDEN


def tf_or_skip():
    """Import TensorFlow or skip the test with the reason."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e .[tf])")


@pytest.fixture(scope="session")
def synth_ckpt_dir(tmp_path_factory: pytest.TempPathFactory):
    """``synth_ckpt_dir(variant)`` → a regenerated official-format checkpoint (cached per session)."""
    from fixtures.synth_ckpt import write_synth_checkpoint

    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            out = tmp_path_factory.mktemp(variant.replace("efficientdet-", ""))
            bn = PROJECT_GOLDEN / "bn_stats" / f"{variant}.npz"
            if not bn.exists():
                bn = SHARED_GOLDEN / "bn_stats" / f"{variant}.npz"
            if not bn.exists():
                pytest.skip(f"no BN side-car for {variant}")
            write_synth_checkpoint(variant, out, seed=1234, bn_stats_path=bn, golden_dir=PROJECT_GOLDEN,
                                   progress=False)
            cache[variant] = out
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def official(automl_dir) -> Path:
    """The official checkout, once TensorFlow and tf-keras are importable (its code runs in a subprocess)."""
    import importlib.util

    for mod in ("tensorflow", "tf_keras", "yaml"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"the official code needs {mod!r} (pip install -e .[tf])")
    return automl_dir


@pytest.fixture(scope="session")
def chelsea_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's ``chelsea`` sample as a PNG file (PNG decodes identically in PIL and TF)."""
    from PIL import Image
    from skimage import data

    p = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(p)
    return p


@pytest.fixture(scope="session")
def d0_model(synth_ckpt_dir):
    """d0 at 256x256 with the regenerated weights the bundled d0 goldens were recorded with.

    One instance for the whole session: a test that changes the model works on ``copy.deepcopy``.
    """
    from effdet_torch.model import create_model

    return create_model("d0", checkpoint=synth_ckpt_dir("efficientdet-d0"), image_size=256)


@pytest.fixture(scope="session")
def d0_golden_results(d0_model) -> dict:
    """``run_golden`` (what ``effdet-parity golden`` runs) of :func:`d0_model` on each bundled d0
    golden, keyed by file name; computed once per session (~8 s on 2 cores) for every test reading it."""
    import torch

    from parity.golden import run_golden

    with torch.no_grad():
        return {npz: run_golden(d0_model, D0_GOLDEN / npz) for npz in D0_GOLDEN_FILES}
