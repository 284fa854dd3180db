"""`compress.profile` and `compress.py profile`: ORT kernel times of an exported file, per op type and per node."""

import pytest
import torch
from conftest import one_line_error

from compress.cli import main
from compress.export import export_onnx
from compress.profile import ProfileError, profile_onnx
from repvgg import LayerSpec, PlainRepVGG, RepVGG


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    model = PlainRepVGG([LayerSpec(3, 8, 2), LayerSpec(8, 16, 2), LayerSpec(16, 16, 1)], num_classes=10)
    path = tmp_path_factory.mktemp("profile") / "tiny.onnx"
    return export_onnx(model, path, torch.zeros(1, 3, 16, 16))


def test_profile_shares_and_stem(tiny_onnx):
    result = profile_onnx(tiny_onnx, threads=1, batch=2, image_size=16, runs=3, warmup=1)
    assert result["total_us"] > 0
    for key in ("by_op", "by_node"):
        rows = result[key]
        assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-6)
        assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)
    assert sum(r["us"] for r in result["by_op"]) == pytest.approx(result["total_us"])
    assert any("Conv" in r["op"] for r in result["by_op"])
    stem = result["stem"]
    stem_row = next(r for r in result["by_node"] if r["node"] == stem["node"])
    assert "Conv" in stem_row["op"] and stem["us"] > 0 and 0 < stem["share"] <= 1


def test_profile_gives_each_conv_of_a_plain_stack_its_macs_in_run_order(tiny_onnx, capsys):
    result = profile_onnx(tiny_onnx, threads=1, batch=2, image_size=16, runs=3, warmup=1)
    # batch 2 at 16x16: 3->8 stride 2 (8x8 out), 8->16 stride 2 (4x4), 16->16 stride 1 (4x4), 3x3 kernels
    assert [c["macs"] for c in result["convs"]] == [2 * 8 * 8 * 8 * 3 * 9, 2 * 16 * 4 * 4 * 8 * 9, 2 * 16 * 4 * 4 * 16 * 9]
    assert result["convs"][0]["node"] == result["stem"]["node"]
    for conv in result["convs"]:
        assert conv["gmacs"] == pytest.approx(conv["macs"] / conv["us"] / 1e3)
    assert main(["profile", str(tiny_onnx), "--threads", "1", "--batch", "2", "--runs", "3"]) == 0
    assert "GMAC/s" in capsys.readouterr().out


def test_profile_leaves_out_macs_where_convs_branch(tmp_path, one_thread):
    # a multi-branch block: its 3x3 and 1x1 convs read the same input, so no run order maps kernels to nodes
    torch.manual_seed(0)
    path = export_onnx(RepVGG([1, 1, 1, 1], widths=[8, 8, 8, 8, 8], num_classes=10).eval(), tmp_path / "branches.onnx",
                       torch.zeros(1, 3, 16, 16))
    result = profile_onnx(path, threads=1, batch=1, runs=1, warmup=0)
    assert result["convs"] and all("macs" not in c for c in result["convs"])


def test_profile_reads_the_input_size_from_the_file(tiny_onnx):
    result = profile_onnx(tiny_onnx, threads=1, batch=1, runs=1, warmup=0)
    assert result["stem"]["us"] > 0


def test_profile_rejects_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ProfileError, match="not an ONNX file"):
        profile_onnx(bad, runs=1, warmup=0)


def test_cli_profile_prints_the_table(tiny_onnx, capsys):
    assert main(["profile", str(tiny_onnx), "--threads", "1", "--batch", "2", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "share" in out and "stem:" in out and "Conv" in out


def test_cli_profile_errors_are_one_line(tmp_path, capsys):
    assert "no such file" in one_line_error(capsys, ["profile", str(tmp_path / "missing.onnx")])
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04not onnx")
    assert "not an ONNX file" in one_line_error(capsys, ["profile", str(bad)])
