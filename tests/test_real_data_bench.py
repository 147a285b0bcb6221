"""bench/real_data.py runs end to end on a small RecBole folder and writes one CSV row per variant."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np


def write_ratings(folder, users=60, per_user=12, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(users):
        for k, item in enumerate(rng.choice(40, per_user, replace=False)):
            lines.append(f"{user}\t{item}\t{rng.integers(1, 6)}\t{1000 + k}")
    (folder / "tiny.inter").write_text("\n".join(lines) + "\n")
    (folder / "tiny.item").write_text("item_id:token\tclass:token_seq\n" +
                                      "".join(f"{i}\tg{i % 4} g{(i + 1) % 4}\n" for i in range(40)))


def test_real_data_script(tmp_path):
    write_ratings(tmp_path)
    script = Path(__file__).resolve().parents[1] / "bench" / "real_data.py"
    done = subprocess.run([sys.executable, str(script), "--path", str(tmp_path), "--epochs", "1", "--batch-size", "64",
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [path] = (tmp_path / "out").glob("real_data_*_cpu.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["basemodel", "din", "din-dice"]
    for row in rows:
        assert 0 <= float(row["test_auc"]) <= 1 and 0 <= float(row["test_gauc"]) <= 1
        assert float(row["test_logloss"]) > 0 and float(row["wall_s"]) > 0
        assert "test AUC" in done.stdout
