"""Hugging Face MoE models on DWDP over cuda_ipc (2 ranks; they may share one GPU: rank r uses r % device_count).

Same checks as tests/cpu/test_hf_integration.py, test_hf_loading.py and test_hf_quantized.py: logits and
generate() tokens vs the unmodified HF model (for quantized checkpoints, the model of their dequantized
values), freed expert rows (poisoned before conversion), byte-exact delivered rows, aborted forward
then a good one.
"""

import os

import pytest

import dwdp_comm as dc

pytest.importorskip("transformers")

from tests.helpers import hf_rankfns  # noqa: E402

pytestmark = pytest.mark.gpu
TIMEOUT = float(os.environ.get("DWDP_TEST_TIMEOUT", "300"))
TOL = 1e-4  # fp32 on GPU: TF32 is off by default in torch for matmuls, summation order may differ
QUANT_TOL = 5e-2  # quantized experts: bf16 GEMM inputs, fp8 activations on the block-FP8 path (CPU: <= 5e-3)


def test_hf_families_on_cuda_ipc():
    cases = [("mixtral", 7, 5, None), ("qwen3_moe", 7, 5, None), ("deepseek_v3", 7, 5, None),
             ("gpt_oss", 7, 5, None), ("gpt_oss", 3, 5, "hf_grouped_mm")]
    res = dc.testing.launch(hf_rankfns.compare_many, 2, cases, backend="cuda_ipc", timeout=TIMEOUT)
    for i, case in enumerate(cases):
        for rank, r in enumerate(res):
            r = r[i]
            assert r["freed"] and r["bytes_exact"], (case, rank)
            assert r["logits_max_diff"] <= TOL and r["after_abort_max_diff"] <= TOL, (case, rank, r)
            assert r["aborted"] and r["tokens_equal"], (case, rank)
            assert r["memory"]["local_bytes"] < r["memory"]["experts_bytes_before"]


def test_hf_load_model_on_cuda_ipc(tmp_path):
    """load_model on cuda_ipc: each rank reads only its experts; same checks as tests/cpu/test_hf_loading.py."""
    import torch
    specs = [("mixtral", {}, None, True), ("qwen3_moe", {"tie_word_embeddings": True, "max_shard_size": "20KB"},
                                          None, True),
             ("deepseek_v3", {}, torch.bfloat16, False), ("gpt_oss", {"dtype": torch.bfloat16}, None, False)]
    cases = [(hf_rankfns.save_checkpoint(tmp_path / f"{f}{i}", f, 10 + i, **kw), dt, tok)
             for i, (f, kw, dt, tok) in enumerate(specs)]
    res = dc.testing.launch(hf_rankfns.load_compare, 2, cases, backend="cuda_ipc", timeout=TIMEOUT)
    for i, (family, kw, dt, tokens) in enumerate(specs):
        low = dt is not None or "dtype" in kw
        for rank, per in enumerate(res):
            r = per[i]
            assert r["remote_rows_read"] == [] and r["local_rows_read"] == r["local"], (family, rank, r)
            assert r["non_expert_diffs"] == [] and r["tied_same"] and r["bytes_exact"], (family, rank, r)
            assert r["logits_max_diff"] <= (5e-2 if low else TOL), (family, rank, r)
            assert not tokens or r["tokens_equal"], (family, rank)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_hf_example_cuda_graph_on_cuda_ipc(family, capsys, tmp_path):
    """examples/hf_moe.py --cuda-graph: a captured DWDP forward replayed on new inputs equals eager."""
    import json
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from examples import hf_moe  # a module of the package: the spawned ranks unpickle its rank_main
    out = tmp_path / "r.json"
    rc = hf_moe.main(["--model", family, "--backend", "cuda_ipc", "--world-size", "2",
                                                 "--cuda-graph", "--replays", "10", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for r in json.loads(out.read_text())["per_rank"]:
        g = r["cuda_graph"]
        assert g["replays"] == 10 and g["ok"] and g["max_replay_vs_eager"] <= 1e-4, g


def test_hf_quantized_load_on_cuda_ipc(tmp_path):
    """load_model of block-FP8 (DeepSeek-V3 layout) and MXFP4 (GPT-OSS) checkpoints on cuda_ipc, the experts run
    quantized on the GPU; same checks as tests/cpu/test_hf_quantized.py, in float32 and bfloat16."""
    import torch
    specs = [("deepseek_v3", "fp8_block", (16, 16), 3, {}, None), ("gpt_oss", "mxfp4", None, 2,
                                                                   {"intermediate_size": 32}, None),
             ("deepseek_v3", "fp8_block", (8, 24), 1, {}, torch.bfloat16),
             ("gpt_oss", "mxfp4", None, 1, {"intermediate_size": 32}, torch.bfloat16)]
    cases = []
    for i, (family, fmt, block, files, kw, dtype) in enumerate(specs):
        q, ref = hf_rankfns.save_quantized_checkpoint(tmp_path / f"{family}{i}", family, 20 + i, fmt, block_size=block,
                                                      num_shards=files, **kw)
        cases.append((q, dtype, False, ref))  # greedy tokens: checked on CPU; fp8 activations may flip a near tie
    res = dc.testing.launch(hf_rankfns.load_compare, 2, cases, backend="cuda_ipc", timeout=TIMEOUT)
    for i, (family, fmt, block, _, _, dtype) in enumerate(specs):
        for rank, per in enumerate(res):
            r = per[i]
            assert r["remote_rows_read"] == [] and r["local_rows_read"] == r["local"], (family, rank, r)
            assert r["non_expert_diffs"] == [] and r["bytes_exact"] and r["formats"] == [fmt], (family, rank, r)
            assert r["dequantized_exact"], (family, rank)  # each expert's weights with its own scales
            total, _ = hf_rankfns.expert_bytes(cases[i][0])  # this rank read its share of the expert bytes
            assert r["expert_bytes_read"] == total * len(r["local"]) // len(res[0][i]["local"] + res[1][i]["local"]), \
                (family, rank, r["expert_bytes_read"], total)
            # quantized experts compute with bf16 GEMM inputs (and fp8 activations on the block-FP8 fast path)
            assert r["logits_max_diff"] <= QUANT_TOL, (family, fmt, dtype, rank, r["logits_max_diff"])


def test_hf_fp8_experts_convert_on_cuda_ipc(tmp_path):
    """convert() of a model whose experts are HF's own FP8Experts (block-FP8), on cuda_ipc."""
    q, ref = hf_rankfns.save_quantized_checkpoint(tmp_path / "ds", "deepseek_v3", 21, "fp8_block", block_size=(16, 16))
    res = dc.testing.launch(hf_rankfns.fp8_experts_compare, 2, q, ref, (16, 16), backend="cuda_ipc", timeout=TIMEOUT)
    for rank, r in enumerate(res):
        assert r["formats"] == ["fp8_block"] and r["freed"] and r["bytes_exact"], (rank, r)
        assert r["logits_max_diff"] <= QUANT_TOL, (rank, r)  # tokens: fp8 activations may flip a near tie


@pytest.mark.parametrize("fmt", ["fp8-block", "mxfp4"])
def test_hf_example_quantized_checkpoint_on_cuda_ipc(fmt, capsys, tmp_path):
    """examples/hf_moe.py --make-checkpoint FMT DIR --backend cuda_ipc: a tiny quantized checkpoint, checked."""
    import json
    from examples import hf_moe  # a module of the package: the spawned ranks unpickle its rank_main
    out = tmp_path / "r.json"
    rc = hf_moe.main(["--make-checkpoint", fmt, str(tmp_path / "q"), "--backend", "cuda_ipc",
                                                 "--world-size", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "check passed" in printed, printed
    for r in json.loads(out.read_text())["per_rank"]:
        assert r["loading"]["weight_format"] == {"fp8-block": "fp8_block", "mxfp4": "mxfp4"}[fmt]
