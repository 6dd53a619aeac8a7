"""What the installed commands need ships in the wheel: the golden manifests (synth-ckpt), the BN
side-cars (--bn-stats auto) and the bundled d0 goldens (convert-ckpt --verify) are package data of the
``golden`` package, found through ``golden.find`` / ``golden.golden_dirs`` outside a checkout too."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "demo-out",
                                                              "__pycache__", ".pytest_cache", ".hypothesis"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1:]}")
    (whl,) = out.glob("effdet_parity-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_ships_the_recorded_data(wheel):
    names = set(wheel.namelist())
    needed = [p.relative_to(ROOT).as_posix() for p in (ROOT / "golden").rglob("*")
              if p.is_file() and p.suffix in (".gz", ".npz", ".json") and "__pycache__" not in p.parts]
    assert len(needed) >= 15 + 3 + 3, needed  # 15 manifests, 3 BN side-cars, the d0 goldens and their sha list
    missing = [n for n in needed if n not in names]
    assert not missing, f"not in the wheel: {missing}"


def test_wheel_has_every_layer_and_no_tests(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if "/" in n and not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"golden", "effdet_torch", "converters", "fixtures", "parity", "evaluation", "export", "training",
                    "effdet_cli"}
    entry = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    text = wheel.read(entry).decode()
    assert "[effdet_torch.checkpoint_loaders]" in text and "official = converters.convert:load_official" in text
    for script in ("convert-ckpt", "effdet-parity", "effdet-infer", "effdet-eval", "effdet-train", "effdet-bench",
                   "effdet-export"):
        assert f"{script} = effdet_cli." in text


def test_golden_find_names_every_place_tried(tmp_path, monkeypatch):
    import golden

    monkeypatch.setenv(golden.GOLDEN_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "manifests" / "x.json.gz")):
        golden.find("manifests/x.json.gz", what="manifest")
    monkeypatch.delenv(golden.GOLDEN_ENV)
    assert golden.find("manifests/efficientdet-d0.json.gz").is_file()
