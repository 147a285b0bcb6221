"""Export round trips: each artefact is loaded in a fresh Python process and must give the model's scores
on a batch whose size and history length differ from the example it was traced with."""
import subprocess
import sys
import time
import warnings

import pytest
import torch

from fastdin import DIN
from fastdin.cli import main
from fastdin.export import example_batch_for, export, load

pytest.importorskip("onnxruntime")

LOADER = """
import sys, torch
from fastdin.export import load
fmt, artefact, batch_file, out_file = sys.argv[1:]
torch.save(load(fmt, artefact)(torch.load(batch_file)).detach(), out_file)
"""


def small_din(**overrides) -> DIN:
    config = dict(num_items=60, num_categories=9, embed_dim=4, user_sparse_sizes=(5,), num_dense=1,
                  attention_activation="dice", attention_hidden=(6, 5), mlp_hidden=(7,), normalization="softmax")
    config.update(overrides)
    model = DIN(**config)
    with torch.no_grad():  # running statistics away from (0, 1), so that eval-mode Dice is not trivial
        for m in model.modules():
            if hasattr(m, "running_var"):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def load_in_fresh_process(fmt, artefact, batch, tmp_path) -> torch.Tensor:
    batch_file, out_file = tmp_path / "batch.pt", tmp_path / "scores.pt"
    torch.save(batch, batch_file)
    subprocess.run([sys.executable, "-c", LOADER, fmt, str(artefact), str(batch_file), str(out_file)],
                   check=True, timeout=300)
    return torch.load(out_file)


def fastdin_warnings(caught):
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "/fastdin/" in w.filename.replace("\\", "/")]


@pytest.mark.parametrize("fmt", ["onnx", "torch-export", "torchscript"])
def test_artefact_matches_the_model_in_a_fresh_process(fmt, tmp_path):
    model = small_din()
    artefact = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(model, fmt, artefact)  # traced with B = 4, T = 6
    assert fastdin_warnings(caught) == []
    assert model.training  # the caller's mode is restored
    batch = example_batch_for(model, batch_size=5, history=9)  # other sizes than traced
    batch["lengths"][0] = 0  # an empty history
    expected = model.eval()(batch)
    got = load_in_fresh_process(fmt, artefact, batch, tmp_path)
    assert got.shape == expected.shape == (5,)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_onnx_inputs_are_the_batch_keys_with_dynamic_dims(tmp_path):
    import onnx

    model = small_din()
    export(model, "onnx", tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(dims) == list(example_batch_for(model))
    assert isinstance(dims["item"][0], str) and all(isinstance(d, str) for d in dims["hist_items"])
    assert dims["hist_items"] == dims["hist_categories"] and dims["item"][0] == dims["hist_items"][0]
    assert dims["user_sparse"][1] == 1 and dims["dense"][1] == 1  # field counts stay fixed


def test_aoti_package_matches_the_model_in_a_fresh_process(tmp_path):
    model = small_din(user_sparse_sizes=(), num_dense=0, normalization=None)
    start = time.perf_counter()
    export(model, "aoti", tmp_path / "model.pt2")
    print(f"AOTInductor compile: {time.perf_counter() - start:.1f} s")
    batch = example_batch_for(model, batch_size=3, history=11)
    got = load_in_fresh_process("aoti", tmp_path / "model.pt2", batch, tmp_path)
    torch.testing.assert_close(got, model.eval()(batch).detach(), rtol=1e-5, atol=1e-6)


def test_cli_exports_a_trained_checkpoint(tmp_path, capsys):
    checkpoint, out = tmp_path / "model.pt", tmp_path / "model.pt2"
    assert main(["train", "--train-size", "200", "--test-size", "200", "--batch-size", "100", "--max-history", "5",
                 "--embed-dim", "4", "--epochs", "1", "--no-progress", "--device", "cpu", "--user-features",
                 "--save", str(checkpoint)]) == 0
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torch-export", "--out", str(out)]) == 0
    assert f"wrote torch-export to {out}" in capsys.readouterr().out
    saved = torch.load(checkpoint)
    model = DIN(**saved["model_config"])
    model.load_state_dict(saved["state_dict"])
    batch = example_batch_for(model, batch_size=7, history=3)
    torch.testing.assert_close(load("torch-export", out)(batch), model.eval()(batch))


def test_bad_arguments_name_the_problem(tmp_path):
    model = small_din()
    with pytest.raises(ValueError, match="format must be one of"):
        export(model, "tflite", tmp_path / "m")
    with pytest.raises(ValueError, match="does not exist"):
        export(model, "onnx", tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="example_batch must be a dict of tensors"):
        export(model, "onnx", tmp_path / "m.onnx", example_batch=[1, 2])
    with pytest.raises(ValueError, match="no such file"):
        load("onnx", tmp_path / "absent.onnx")
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx", "--out", str(tmp_path / "m")])
