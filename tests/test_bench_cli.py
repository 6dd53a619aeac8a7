"""``effdet-bench`` smoke test (tiny input, one repeat): the table and the JSON it promises.

Times are not asserted (speed is measured in benchmarks/, never in unit tests)."""
from __future__ import annotations

import json

from effdet_cli.bench import main


def test_bench_smoke_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--variant", "d0", "--image-size", "64", "--batch", "1", "2", "--repeats", "1", "--warmup", "0",
               "--no-effdet", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "end-to-end ms" in text and "efficientdet-d0" in text
    printed = [line.split() for line in text.splitlines() if line.startswith("ours ")]
    assert [row[3] for row in printed] == ["1", "2"]  # a line per measured row, under the header
    assert text.index("end-to-end ms") < text.index("\nours ")
    doc = json.loads(out.read_text())
    assert [r["batch"] for r in doc["rows"]] == [1, 2]
    for r in doc["rows"]:
        assert r["impl"] == "ours" and r["image_size"] == [64, 64]
        assert r["network_ms"] > 0 and r["end_to_end_ms"] > 0 and r["peak_memory_mib"] > 0
        assert abs(r["images_per_s"] - r["batch"] * 1000 / r["end_to_end_ms"]) < 1e-9
    assert doc["machine"]["torch"]
    # no overwrite without --force: refused (exit 1, as every command refuses an existing output), file untouched
    before = out.read_text()
    assert main(["--variant", "d0", "--image-size", "64", "--batch", "1", "--repeats", "1", "--no-effdet",
                 "--json", str(out)]) == 1
    assert out.read_text() == before
    assert "exists" in capsys.readouterr().err


def test_bench_usage_errors(capsys):
    assert main(["--variant", "d99", "--no-effdet"]) == 2
    assert "effdet-bench: error:" in capsys.readouterr().err
    assert main(["--variant", "d0", "--batch", "0", "--no-effdet"]) == 2
