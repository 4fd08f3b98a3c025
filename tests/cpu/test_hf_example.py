"""examples/hf_moe.py runs on CPU (sim backend) and checks itself against the unmodified HF model.

Two runs: a tiny random config through convert(), and a sharded checkpoint the test saves itself
through load_model(). The example's main() runs in this process (its ranks are spawned as usual),
which spares a Python + torch + transformers start per run.
"""

import json

import pytest

pytest.importorskip("transformers")

from tests.helpers import hf_rankfns  # noqa: E402


def _example():
    from examples import hf_moe  # a module of the package, so the spawned ranks unpickle the same rank_main
    return hf_moe


def _run(capsys, tmp_path, *argv):
    out = tmp_path / "r.json"
    rc = _example().main([*argv, "--world-size", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "check passed (tolerance" in printed
    res = json.loads(out.read_text())
    assert len(res["per_rank"]) == 2
    assert res["record"]["date"] and res["record"]["machine"]  # results carry where and when they were made
    for r in res["per_rank"]:
        assert r["backend"] == "sim" and r["tokens_equal"] and r["bytes_pulled"] > 0
        assert r["memory"]["local_bytes"] < r["memory"]["experts_bytes_before"]
    return res, printed


def test_hf_example_tiny_config(capsys, tmp_path):
    res, _ = _run(capsys, tmp_path, "--model", "olmoe", "--layers", "3")
    assert all(r["loading"] is None for r in res["per_rank"])


def test_hf_example_checkpoint(capsys, tmp_path):
    ckpt = hf_rankfns.save_checkpoint(tmp_path / "ckpt", "olmoe", 0, num_layers=3, max_shard_size="30KB")
    res, printed = _run(capsys, tmp_path, "--checkpoint", ckpt)
    assert "of experts read from the checkpoint" in printed
    for r in res["per_rank"]:  # each rank read exactly its local rows of the experts
        assert r["loading"]["expert_bytes_read"] == r["memory"]["local_bytes"]


def test_hf_example_cuda_graph_needs_a_gpu_backend():
    with pytest.raises(SystemExit, match="--cuda-graph: needs CUDA GPUs"):
        _example().main(["--model", "olmoe", "--cuda-graph"])


@pytest.mark.parametrize("fmt", ["fp8-block", "mxfp4"])
def test_hf_example_quantized_checkpoint(fmt, capsys, tmp_path):
    """--make-checkpoint writes a tiny quantized checkpoint (DeepSeek-V3 block-FP8, GPT-OSS MXFP4) and its
    dequantized twin, then --checkpoint runs on it: experts kept quantized, checked against the twin."""
    ckpt = tmp_path / "q"
    res, printed = _run(capsys, tmp_path, "--make-checkpoint", fmt, str(ckpt), "--layers", "2")
    want = {"fp8-block": "fp8_block", "mxfp4": "mxfp4"}[fmt]
    assert f"({want}, scales included)" in printed
    assert (tmp_path / "q-reference" / "config.json").is_file()
    for r in res["per_rank"]:
        assert r["loading"]["weight_format"] == want and r["loading"]["checkpoint"] == str(ckpt)
        assert r["loading"]["expert_bytes_read"] == r["memory"]["local_bytes"]  # stored as read: quantized
