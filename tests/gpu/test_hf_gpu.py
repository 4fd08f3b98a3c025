"""Hugging Face MoE models on DWDP over cuda_ipc (2 ranks; they may share one GPU: rank r uses r % device_count).

Same checks as tests/cpu/test_hf_integration.py: logits and generate() tokens vs the unmodified HF model,
freed expert rows (poisoned before conversion), byte-exact delivered rows, aborted forward then a
good one.
"""

import os

import pytest

import dwdp_comm as dc

pytest.importorskip("transformers")

from tests.helpers import hf_rankfns  # noqa: E402

pytestmark = pytest.mark.gpu
TIMEOUT = float(os.environ.get("DWDP_TEST_TIMEOUT", "300"))
TOL = 1e-4  # fp32 on GPU: TF32 is off by default in torch for matmuls, summation order may differ


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
