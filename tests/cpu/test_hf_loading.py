"""load_model: a tiny checkpoint saved by HF, loaded with only each rank's experts, vs from_pretrained + HF.

Sim backend, uneven splits (5 experts over 2 and 3 ranks), single-file and sharded saves, tied
embeddings, fp32 / bf16 and the checkpoint's own dtype. Every expert read is watched through
safetensors itself: no rank reads a row it does not own.
"""

import json
import os

import pytest
import torch

import dwdp_comm as dc

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tests.helpers import hf_rankfns  # noqa: E402

TOL = 1e-5  # fp32: the experts sum may run in another order than HF's


def _check(r, tol=TOL, tokens=True):
    assert r["remote_rows_read"] == [], r
    assert r["local_rows_read"] == r["local"], r  # every local expert was read (and nothing else)
    assert r["reported_reads_match"], r
    assert r["non_expert_diffs"] == [], r
    assert r["tied_same"] and r["generation_config_same"], r
    assert r["bytes_exact"], r
    assert r["logits_max_diff"] <= tol, r
    if tokens:
        assert r["tokens_equal"], r
    mem = r["memory"]
    assert mem["local_bytes"] < mem["experts_bytes_before"]


# (family, save options, load dtype, check greedy tokens); one launch per world size runs them all
SPECS = {
    3: [("mixtral", {}, None, True), ("deepseek_v3", {}, None, True),
        # bf16 from an fp32 save: dtypes as from_pretrained (DeepSeek keeps e_score_correction_bias in fp32)
        ("deepseek_v3", {}, torch.bfloat16, False)],
    2: [("qwen3_moe", {"tie_word_embeddings": True, "max_shard_size": "20KB"}, None, True),
        # saved in bf16, loaded with dtype=None: the checkpoint's dtype, as from_pretrained's "auto"
        ("gpt_oss", {"dtype": torch.bfloat16, "max_shard_size": "20KB"}, None, False)]}
ERRORS = {"dir": "checkpoint_dir", "no_key": "missing key", "more_experts": "experts [5] absent",
          "narrower": "config.json and the weights do not match", "unknown": "match no model tensor",
          "no_norm": "missing key: 1 absent and not tied, e.g. ['model.norm.weight']",
          "quantized": "per-tensor FP8", "ops": "does not keep experts on dim 0"}


def _rewrite(src, dst, drop=None, rename=None, config=None):
    """A copy of a single-file checkpoint with one key dropped, keys renamed, or config.json fields changed."""
    os.makedirs(dst)
    tensors = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
    if drop:
        del tensors[drop]
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    safetensors_torch.save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(config or {})
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def _error_cases(tmp):
    good = hf_rankfns.save_checkpoint(tmp / "good", "mixtral", 3)
    # expert 4 is rank 1's: rank 0 must fail too (the check reads headers of every expert, not their data)
    no_key = _rewrite(good, tmp / "nokey", drop="model.layers.1.block_sparse_moe.experts.4.w3.weight")
    more_experts = _rewrite(good, tmp / "six", config={"num_local_experts": 6})
    narrower = _rewrite(good, tmp / "narrow", config={"intermediate_size": 12})
    unknown = _rewrite(good, tmp / "unknown", rename=(".w1.weight", ".w_in.weight"))
    no_norm = _rewrite(good, tmp / "nonorm", drop="model.norm.weight")
    quantized = _rewrite(good, tmp / "fp8", config={"quantization_config": {"quant_method": "fp8"}})
    return [("dir", str(tmp / "nowhere"), good, False),  # rank 0 only: the others must not hang
            ("no_key", no_key, no_key, False), ("more_experts", more_experts, more_experts, False),
            ("narrower", narrower, narrower, False), ("unknown", unknown, unknown, False),
            ("no_norm", no_norm, no_norm, False), ("quantized", quantized, quantized, False),
            ("ops", good, good, True)]  # a conversion rule that is not row-local (last: it changes HF's table)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world_size, specs in SPECS.items():
        tmp = tmp_path_factory.mktemp(f"w{world_size}")
        cases = []
        for i, (family, kw, load_dtype, tokens) in enumerate(specs):
            d = hf_rankfns.save_checkpoint(tmp / f"{family}{i}", family, 10 + i, **kw)
            if "max_shard_size" in kw:
                index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
                assert len(set(index["weight_map"].values())) > 1
            cases.append((d, load_dtype, tokens))
        calls = [("load_compare", cases)] + ([("load_errors", _error_cases(tmp))] if world_size == 2 else [])
        out[world_size] = dc.testing.launch(hf_rankfns.many, world_size, calls, timeout=300)
    return out


@pytest.mark.parametrize("world_size", sorted(SPECS))
def test_load_matches_from_pretrained(results, world_size):
    specs = SPECS[world_size]
    res = [per_rank[0] for per_rank in results[world_size]]
    for i, (family, kw, load_dtype, tokens) in enumerate(specs):
        low = load_dtype is torch.bfloat16 or kw.get("dtype") is torch.bfloat16
        for rank, per in enumerate(res):
            r = per[i]
            _check(r, tol=5e-2 if low else TOL, tokens=tokens)
            assert r["expert_keys_read"] > 0, (family, rank)
        assert res[0][i]["tied"] == bool(kw.get("tie_word_embeddings")), family
        if low:
            assert "torch.bfloat16" in res[0][i]["dtypes"], res[0][i]["dtypes"]
        if family == "deepseek_v3" and load_dtype is torch.bfloat16:
            assert "torch.float32" in res[0][i]["dtypes"]  # the keep-in-fp32 router bias
        # the ranks together read every expert exactly once
        assert sorted(e for per in res for e in per[i]["local_rows_read"]) == list(range(5))


def test_bad_checkpoints_raise_on_every_rank(results):
    res = [per_rank[1] for per_rank in results[2]]
    for rank, per in enumerate(res):
        assert [c[0] for c in per] == list(ERRORS), per
        for i, (label, name, msg) in enumerate(per):
            assert name is not None, (rank, label)
            assert ERRORS[label] in msg, (rank, label, msg)
            # a problem every rank saw is raised as itself on every rank; one rank's as a CollectiveError naming it
            assert (name, msg) == res[0][i][1:] or issubclass(getattr(dc.errors, name), dc.errors.CollectiveError)
    assert res[1][0][1] == "CollectiveFailedError" and "rank 0" in res[1][0][2], res[1][0]
