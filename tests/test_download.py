"""``convert-ckpt --download`` against a loopback HTTP server, and ``convert-ckpt --verify``.

The server (``http.server`` on 127.0.0.1, a random free port, in a thread) serves a synthetic
release tarball made from a regenerated checkpoint; it honours ``Range``, can fail with 500, drop
the connection once, or serve a truncated/corrupted file. It stops at the end of the module and,
at the latest, by itself after ``SERVER_LIFETIME_S``. Nothing here reaches the real network.
"""
from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import download as dl
from converters.download import RELEASE_URLS
from effdet_cli import convert as cli
from effdet_cli.convert import main as convert_main
from converters.convert import convert_checkpoint, load_state_dict_file

from .conftest import PROJECT_GOLDEN

SERVER_LIFETIME_S = 120
TARBALL = "efficientdet-d0.tar.gz"


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/<mode>/<file>``: ok | err500 | err404 | drop_once | truncated | corrupt | norange."""

    files: dict[str, bytes] = {}
    log: list[tuple[str, str | None]] = []  # (path, Range header)
    dropped: set[str] = set()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        type(self).log.append((self.path, rng))
        m = re.fullmatch(r"/(\w+)/([\w.-]+)", self.path)
        if not m or m.group(2) not in self.files:
            self.send_error(404)
            return
        mode, name = m.groups()
        data = self.files[name]
        if mode == "err500":
            self.send_error(500, "Internal Server Error")
            return
        if mode == "err404":
            self.send_error(404)
            return
        if mode == "truncated":
            data = data[: len(data) // 2]
        elif mode == "corrupt":
            b = bytearray(data)
            b[len(b) // 2] ^= 0xFF
            data = bytes(b)
        start = 0
        if rng and mode != "norange":
            r = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(r.group(1)) if r else 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop_once" and name not in self.dropped:
            type(self).dropped.add(name)
            self.wfile.write(body[: len(body) // 3])  # then close: the client sees a short body
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def d0_dir(synth_ckpt_dir) -> Path:
    return synth_ckpt_dir("efficientdet-d0")


@pytest.fixture(scope="module")
def tarball(d0_dir, tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("release") / TARBALL
    with tarfile.open(p, "w:gz", compresslevel=1) as tar:
        tar.add(d0_dir, arcname="efficientdet-d0")
    return p.read_bytes()


@pytest.fixture(scope="module")
def server(tarball):
    _Handler.files = {TARBALL: tarball}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    stopper = threading.Timer(SERVER_LIFETIME_S, srv.shutdown)  # stops by itself whatever happens
    stopper.daemon = True
    stopper.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        stopper.cancel()
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture
def use(server, monkeypatch, tmp_path):
    """``use(mode)``: point EFFDET_RELEASE_BASE_URL at ``<server>/<mode>``, cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.0)
    _Handler.log.clear()
    _Handler.dropped.clear()

    def set_mode(mode: str) -> str:
        base = f"{server}/{mode}"
        monkeypatch.setenv(dl.BASE_URL_ENV, base)
        return base

    return set_mode


@pytest.fixture(scope="module")
def d0_state(d0_dir):
    return convert_checkpoint(d0_dir, "d0").state_dict


def _same_state(path: Path, ref: dict) -> bool:
    sd = load_state_dict_file(path)
    return sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_release_url_override(monkeypatch):
    official = RELEASE_URLS["efficientdet-lite0"]
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)
    assert dl.release_url("efficientdet-lite0", official) == official
    monkeypatch.setenv(dl.BASE_URL_ENV, "http://127.0.0.1:9/mirror/")
    assert dl.release_url("efficientdet-lite0", official) == "http://127.0.0.1:9/mirror/efficientdet-lite0.tgz"


def test_download_and_convert(use, tmp_path, tarball, d0_state, capsys):
    use("ok")
    assert convert_main(["d0", "--download", "-q"]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(tarball).hexdigest()
    assert (tmp_path / TARBALL).read_bytes() == tarball
    assert (tmp_path / f"{TARBALL}.sha256").read_text() == f"{digest}  {TARBALL}\n"
    assert digest in out and "3,880,067" in out
    assert not (tmp_path / f"{TARBALL}.part").exists()
    assert _same_state(tmp_path / "efficientdet-d0.pth", d0_state)
    assert [r for _, r in _Handler.log] == [None]  # one plain request
    # a second run finds the tarball: no request, the stored sha256 is checked
    _Handler.log.clear()
    assert convert_main(["d0", "--download", "-q", "-o", "again.safetensors"]) == 0
    assert "not fetched again" in capsys.readouterr().out and not _Handler.log
    assert _same_state(tmp_path / "again.safetensors", d0_state)


def test_resume_from_part(use, tmp_path, tarball, d0_state, capsys):
    use("ok")
    half = len(tarball) // 2
    (tmp_path / f"{TARBALL}.part").write_bytes(tarball[:half])
    assert convert_main(["d0", "--download", "-q"]) == 0
    assert [r for _, r in _Handler.log] == [f"bytes={half}-"]
    assert (tmp_path / TARBALL).read_bytes() == tarball
    assert hashlib.sha256(tarball).hexdigest() in capsys.readouterr().out
    assert _same_state(tmp_path / "efficientdet-d0.pth", d0_state)


def test_dropped_connection_is_resumed(use, tmp_path, tarball):
    use("drop_once")
    assert convert_main(["d0", "--download", "-q"]) == 0
    ranges = [r for _, r in _Handler.log]
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:-1]) > 0
    assert (tmp_path / TARBALL).read_bytes() == tarball


def test_server_ignoring_range_restarts_cleanly(use, tmp_path, tarball):
    use("norange")
    (tmp_path / f"{TARBALL}.part").write_bytes(b"x" * 1000)  # stale bytes that must not survive
    assert convert_main(["d0", "--download", "-q", "-o", "x.pth"]) == 0
    assert (tmp_path / TARBALL).read_bytes() == tarball


def _nothing_written(d: Path) -> bool:
    return sorted(p.name for p in d.iterdir()) == []


def test_server_error_is_clear_and_writes_nothing(use, tmp_path, capsys):
    base = use("err500")
    assert convert_main(["d0", "--download", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{base}/{TARBALL}" in err and "HTTP 500" in err and f"after {dl.ATTEMPTS} attempt" in err
    assert len(_Handler.log) == dl.ATTEMPTS
    assert _nothing_written(tmp_path)


def test_not_found_is_not_retried(use, tmp_path, capsys):
    use("err404")
    assert convert_main(["d0", "--download", "-q"]) == 1
    assert "HTTP 404" in capsys.readouterr().err and len(_Handler.log) == 1
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("mode", ["truncated", "corrupt"])
def test_bad_tarball_is_clear_and_writes_nothing(use, tmp_path, capsys, mode):
    use(mode)
    assert convert_main(["d0", "--download", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "corrupt or truncated" in err and TARBALL in err and len(err.splitlines()) == 1
    assert _nothing_written(tmp_path)


def test_changed_file_is_refused(use, tmp_path, capsys):
    use("ok")
    (tmp_path / TARBALL).write_bytes(b"something else")
    (tmp_path / f"{TARBALL}.sha256").write_text("0" * 64 + f"  {TARBALL}\n")
    assert convert_main(["d0", "--download", "-q"]) == 1
    assert "differs from the stored" in capsys.readouterr().err
    assert not _Handler.log and not (tmp_path / "efficientdet-d0.pth").exists()


def test_download_refusals(use, tmp_path, capsys):
    use("ok")
    assert convert_main(["d0", "--download", "--ckpt", "x"]) == 2
    assert "cannot be combined with --weights" in capsys.readouterr().err
    (tmp_path / "efficientdet-d0.pth").write_bytes(b"keep")
    assert convert_main(["d0", "--download", "-q"]) == 1  # output exists: refused before downloading
    assert "--force" in capsys.readouterr().err and not _Handler.log
    assert (tmp_path / "efficientdet-d0.pth").read_bytes() == b"keep"


# ---------------------------------------------------------------------------------------------
# --verify
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def in_ckpt_dir(d0_dir, tmp_path, monkeypatch):
    shutil.copytree(d0_dir, tmp_path / "efficientdet-d0")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_verify_passes_on_the_golden_weights(in_ckpt_dir, capsys):
    """A golden in ./golden/<variant>/ with its weights' sha256 list beside it (the random case:
    the cheapest; the project's chelsea golden is checked by tests/test_golden_parity.py)."""
    d = in_ckpt_dir / "golden" / "efficientdet-d0"
    d.mkdir(parents=True)
    for name in ("tensors_random.npz", cli.WEIGHTS_SHA_NAME):
        shutil.copy(PROJECT_GOLDEN / "efficientdet-d0" / name, d / name)
    assert convert_main(["d0", "-q", "--verify"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("verify")]
    assert len(lines) == 1 and "tensors_random.npz: PASS, " in lines[0] and " 0 failed" in lines[0]


def test_verify_other_weights_is_not_applicable(in_ckpt_dir, capsys):
    assert convert_main(["d0", "-q", "--verify", "--no-ema"]) == 0
    out = capsys.readouterr().out
    assert "not applicable, these are the raw weights (--no-ema)" in out
    assert "not verified" in out
    golden = PROJECT_GOLDEN / "efficientdet-d0" / "tensors_random.npz"
    assert convert_main(["d0", "-q", "--golden", str(golden), "--no-ema", "-o", "y.pth", "--force"]) == 1
    assert "cannot verify with it" in capsys.readouterr().err


def test_verify_without_a_golden_says_so(in_ckpt_dir, monkeypatch, capsys):
    monkeypatch.setenv("EFFDET_GOLDEN_DIR", str(in_ckpt_dir / "nowhere"))
    assert convert_main(["d0", "-q", "--verify"]) == 0
    assert "no golden recorded for efficientdet-d0" in capsys.readouterr().out


def test_verify_failure_exits_non_zero(in_ckpt_dir, capsys):
    """A golden in ./golden/<variant>/ (found before the project's) whose recorded taps are off."""
    src = np.load(PROJECT_GOLDEN / "efficientdet-d0" / "tensors_random.npz")
    data = {k: src[k] for k in src.files}
    data["random/class_net/level3"] = data["random/class_net/level3"] * 1.01
    d = in_ckpt_dir / "golden" / "efficientdet-d0"
    d.mkdir(parents=True)
    np.savez(d / "tampered.npz", **data)
    assert convert_main(["d0", "-q", "--verify"]) == 1
    cap = capsys.readouterr()
    assert "tampered.npz: FAIL" in cap.out and "random/class_net/level3" in cap.err
    assert "--verify failed" in cap.err
    assert (in_ckpt_dir / "efficientdet-d0.pth").is_file()  # written, and said so
