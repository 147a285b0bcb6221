"""The benchmark suite: a quick run writes its CSV and PNG, the work counts match hand counts, and
the DeepCTR-Torch peer is loaded with the same weights (same outputs)."""
import argparse
import csv
import sys

import pytest
import torch

from fastdin import AttentionPooling
from fastdin.bench import counts, report, suite
from fastdin.bench.cases import DeepCTRAttention, Workload, select_cases


def run_quick(out_dir, *argv) -> int:
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    # on the CPU even where CUDA exists: these tests check the suite's mechanics, not a device
    return suite.run(parser.parse_args(["--quick", "--no-compile", "--device", "cpu", "--out-dir", str(out_dir), *argv]))


def read_csv(out_dir):
    [csv_path] = out_dir.glob("*.csv")
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.COLUMNS
        return list(reader)


def test_quick_suite_writes_table_csv_and_png(tmp_path, capsys):
    assert run_quick(tmp_path, "--cases", "attention-sigmoid,dice-small,sweep-T10", "--impls", "fastdin,eager") == 0
    assert "attention-sigmoid" in capsys.readouterr().out
    rows = read_csv(tmp_path)
    assert len(rows) == 3 * 2 * 2  # cases x modes x impls
    for row in rows:
        assert float(row["ms"]) > 0 and row["torch"] == torch.__version__ and row["device"] and row["date"]
        assert float(row["tflops"]) == pytest.approx(float(row["gflop"]) / float(row["ms"]), rel=1e-3)
        assert row["peak_mib"] == ""  # not measured on the CPU, and not faked
        dice = row["case"].startswith("dice")
        if row["impl"] == "fastdin":  # on the CPU: attention's packed PyTorch path, Dice's reference
            assert row["backend"] == ("reference" if dice else "torch")
        if row["mode"] == "inference":  # Dice: the same reference code ran; attention: the same math
            assert float(row["rel_err_vs_eager"]) <= (0.0 if dice else 1e-5)
    dice = next(r for r in rows if r["case"] == "dice-small" and r["mode"] == "training")
    assert float(dice["gflop"]) == pytest.approx(counts.dice_flops(256 * 200, training=True) / 1e9, rel=1e-5)
    [png] = tmp_path.glob("*.png")
    assert png.stat().st_size > 10_000


def test_a_failed_measurement_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    prepare = suite._prepare

    def broken_fastdin(work, impl, *args):
        if impl == "fastdin":
            raise RuntimeError("kernel exploded")
        return prepare(work, impl, *args)

    monkeypatch.setattr(suite, "_prepare", broken_fastdin)
    assert run_quick(tmp_path, "--cases", "dice-small", "--impls", "fastdin,eager", "--modes", "inference") == 1
    fastdin, eager = read_csv(tmp_path)
    assert fastdin["note"] == "failed: RuntimeError: kernel exploded" and fastdin["ms"] == ""
    assert float(eager["ms"]) > 0  # the other implementations are still measured


def test_results_go_to_the_working_directory_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    args = parser.parse_args(["--quick", "--no-compile", "--device", "cpu", "--cases", "dice-small",
                              "--impls", "eager", "--modes", "inference"])
    assert suite.run(args) == 0
    assert len(list(tmp_path.glob("*.csv"))) == 1 and len(list(tmp_path.glob("*.png"))) == 1


def test_missing_matplotlib_stops_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(suite, "measure_ceilings", lambda *a: pytest.fail("measured without matplotlib"))
    with pytest.raises(SystemExit, match=r"matplotlib .*pip install matplotlib"):
        run_quick(tmp_path, "--cases", "dice-small")


def test_a_speedup_that_rounds_cannot_reproduce_is_noise(tmp_path, monkeypatch):
    """Rounds of eager 1, 1, 1 ms against fastdin 1, 1, 0.5 ms: ratios 1, 1, 2 are not a speedup; against
    1, 1, 0.95 ms (ratios within 20%) they are."""
    for fastdin_last, noisy in ((0.5, True), (0.95, False)):
        series = {"eager": iter([1.0, 1.0, 1.0]), "fastdin": iter([1.0, 1.0, fastdin_last])}
        monkeypatch.setattr(suite, "median_ms", lambda step, device, budget: next(series[step.impl]))
        prepare = suite._prepare

        def tagged(work, impl, *args):
            row, step = prepare(work, impl, *args)
            return row, type("Step", (), {"impl": impl, "__call__": lambda self: step()})()

        monkeypatch.setattr(suite, "_prepare", tagged)
        out_dir = tmp_path / str(noisy)
        assert run_quick(out_dir, "--cases", "dice-small", "--impls", "fastdin,eager", "--modes", "inference") == 0
        fastdin = next(r for r in read_csv(out_dir) if r["impl"] == "fastdin")
        assert float(fastdin["ms"]) == 1.0 and float(fastdin["ms_spread"]) == pytest.approx(1 - fastdin_last)
        if noisy:
            assert fastdin["speedup_vs_eager"] == "" and "x eager: noise (rounds 1.00-2.00)" in fastdin["note"]
        else:
            assert float(fastdin["speedup_vs_eager"]) == 1.0 and "noise" not in fastdin["note"]
        monkeypatch.setattr(suite, "_prepare", prepare)


def test_attention_counts_by_hand():
    # B=2 users, lengths 1 and 2 (3 valid positions), D=2, one hidden layer of 3.
    # fold per user 4*D*H1 = 24 -> 48; per position: layer 1 2*D*H1 = 12, score 2*H = 6,
    # weighted sum 2*D = 4 -> 22 * 3 = 66; forward 114, training 3x.
    assert counts.attention_flops(2, 3, 2, (3,), training=False) == 114
    assert counts.attention_flops(2, 3, 2, (3,), training=True) == 342
    # params: Linear(8, 3) 27 + Linear(3, 1) 4 = 31 fp32 = 124 B; keys 3 rows*2*4 = 24; query 16;
    # lengths 2 int64 = 16; out 16 -> 196. Training adds dout 16, dkeys (the whole [2, 2, 2]) 32,
    # dquery 16 and the parameters' gradients 124 -> 384.
    assert counts.attention_bytes(2, 2, 2, (3,), 3, 4, 4, training=False) == 196
    assert counts.attention_bytes(2, 2, 2, (3,), 3, 4, 4, training=True) == 384
    # the design notes: 2048x100x32, 80/40 with every position valid is about 2.4 GFLOP
    assert counts.attention_flops(2048, 2048 * 100, 32, (80, 40), training=False) == pytest.approx(2.4e9, rel=0.01)


def test_dice_and_din_counts_by_hand():
    assert counts.dice_flops(10, training=False) == 90
    assert counts.dice_flops(10, training=True) == 3 * 12 * 10
    # 5 rows x 2 features in bf16: read x and write y (40 B) + alpha and the running stats (24 B)
    assert counts.dice_bytes(5, 2, 2, training=False) == 64
    assert counts.dice_bytes(5, 2, 2, training=True) == 4 * 10 * 2 + 6 * 2 * 4
    # B=1, 1 valid behaviour, E=1 (behaviours of 2), attention hidden (1,), top MLP 4 -> (2,) -> 1:
    # attention fold 4*2*1 = 8, per position 2*2*1 + 2*1 + 2*2 = 10; top 2*(4*2 + 2*1) = 20
    assert counts.din_flops(1, 1, 1, (1,), 4, (2,), training=False) == 38
    # ids (2 + 2T with T=3) + lengths: 9 int64 = 72; rows (1 + 1) * 2 * 4 = 16; 5 params 20; logit 4
    assert counts.din_bytes(1, 3, 1, 1, 5, training=False) == 112
    assert counts.din_bytes(1, 3, 1, 1, 5, training=True) == 112 + 4 + 16 + 20


def test_workload_counts_only_valid_positions():
    case = next(c for c in select_cases(quick=True) if c.key == "attention-sigmoid")
    work = Workload(case, "fp32", torch.device("cpu"))
    positions = int(work.lengths.sum())
    assert 0 < positions < case.batch * case.seq_len
    assert work.flops("inference") == counts.attention_flops(case.batch, positions, case.dim, case.hidden, False)
    shared = next(c for c in select_cases(quick=True) if c.key == "attention-one-user")
    work = Workload(shared, "fp32", torch.device("cpu"))
    assert work.keys().stride(0) == 0  # one history expanded to every candidate, not copied
    for mode in ("inference", "training"):  # its T keys are read once, and its key gradient is [1, T, D]
        expected = counts.attention_bytes(shared.batch, shared.seq_len, shared.dim, shared.hidden, shared.seq_len,
                                          shared.seq_len, 4, mode == "training")
        assert work.bytes(mode) == expected


@pytest.mark.parametrize("activation, training", [("sigmoid", False), ("prelu", True), ("dice", True), ("dice", False)])
def test_deepctr_peer_gets_the_same_weights(activation, training):
    pytest.importorskip("deepctr_torch")
    pool = AttentionPooling(6, (7, 5), activation, dice_stats="all", backend="reference")
    with torch.no_grad():
        for p in pool.parameters():
            p.uniform_(-0.5, 0.5)
    peer = DeepCTRAttention(pool)
    pool.train(training)
    peer.train(training)
    query, keys = torch.randn(5, 6), torch.randn(5, 9, 6)
    lengths = torch.tensor([9, 1, 4, 0, 7])
    ours, theirs = pool(query, keys, lengths=lengths), peer(query, keys, lengths)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def run_script(name, *argv):
    """Run one of bench/'s standalone scripts as a user would; returns its stdout."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / name
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_mba_step_script_writes_its_rows(tmp_path):
    path = tmp_path / "mba_step.csv"
    run_script("bench_mba_step.py", "--rows", "1000", "--dim", "8", "--batch", "16", "--min-run-s", "0.01",
               "--csv", str(path))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert {(r["grad"], r["variant"]) for r in rows} == {
        (g, v) for g in ("dense", "sparse") for v in ("none", "mba", "full-l2")}
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_mba_overfit_script_writes_its_rows(tmp_path):
    path = tmp_path / "overfit.csv"
    out = run_script("mba_overfit.py", "--epochs", "1", "--train-size", "256", "--test-size", "256",
                     "--csv", str(path))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["variant"] for r in rows) == ["l2", "l2", "mba", "mba", "mba", "none"], out  # the default grids
    assert all(0.0 <= float(r["test_auc"]) <= 1.0 and float(r["test_logloss"]) > 0 for r in rows)


def test_packed_vs_per_user_script_smoke():
    """The GPU A/B of bench/gpu_check.sh on a tiny shape under the interpreter: both paths run, agree
    (the script checks), and are timed."""
    out = run_script("packed_vs_per_user.py", "--smoke")
    assert "dispatch (packed rows)" in out and "per-user forced (per-user kernels (per-user kernels forced" in out


def test_fp32_paths_script_smoke():
    """The fp32 A/B of bench/gpu_check.sh on a tiny shape under the interpreter: every path runs, the
    TF32-off ones agree (the script checks), and each mode is timed."""
    out = run_script("fp32_paths.py", "--smoke")
    for mode in ("inference", "training"):
        for path in ("triton, TF32 off", "triton, TF32 on", "torch, TF32 off (auto)", "reference, TF32 off"):
            assert f"smoke {mode}: {path}: " in out, out
