"""perf/bench_sizes.py runs end to end on CPU (tiny shapes): every family's experts and the model parts."""
import json

import pytest

pytest.importorskip("transformers")


def test_bench_sizes_smoke(tmp_path):
    from perf import bench_sizes
    out = tmp_path / "sizes.json"
    assert bench_sizes.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    eager = {(r["family"], r["tokens"]) for r in res["results"]
             if r.get("part") == "experts" and r.get("mode") == "eager" and r["variant"] == "ours"}
    assert {f for f, _ in eager} == set(bench_sizes.FAMILIES)
    assert all(c["ok"] for c in res["checks"])
    modes = {r.get("mode") for r in res["results"] if r.get("part") == "model"}
    assert modes == {"prefill", "decode"}
    assert any(c["part"] == "model_decode" and c["greedy_equal"] for c in res["checks"])
    assert "commit" in res["env"]["git"]


def test_random_model_buffers_are_computed_not_left_uninitialised():
    """The random-weight model's buffers (rotary ``inv_freq``) are the ones the module computes: built
    on meta and materialised with ``to_empty`` they were uninitialised memory (NaN logits, some seeds)."""
    import torch
    import transformers
    from perf import bench_sizes
    m = bench_sizes.qwen3_model(1, torch.device("cpu"), True)
    want = transformers.Qwen3MoeForCausalLM(m.config).model.rotary_emb.inv_freq
    assert torch.equal(m.model.rotary_emb.inv_freq, want)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(torch.isfinite(b).all() for b in m.buffers())
