"""Quantized HF checkpoints on DWDP: block-FP8 (DeepSeek-V3 layout) and MXFP4 (GPT-OSS layout), sim backend.

The tests write tiny checkpoints themselves in the real formats (``hf_quant_checkpoint.save_quantized``:
per-expert ``...experts.{e}.{gate,up,down}_proj.weight`` float8_e4m3fn with ``weight_scale_inv``, or
fused ``...experts.{gate_up,down}_proj_{blocks,scales}``; the same ``quantization_config`` fields), and
next to each the plain checkpoint of its dequantized values. ``load_model`` of the quantized one, at
G=3 and G=2 (5 experts: uneven splits; sharded files at G=2, a scale in another file than its
weight), must match ``from_pretrained`` of the dequantized one: logits, greedy tokens, every non-expert
tensor bit for bit (DeepSeek's FP8 attention and shared experts are dequantized at load), the
delivered expert bytes and scales equal to the checkpoint's, and each rank reading through
safetensors only its own expert rows and their scales (about 1/G of the expert bytes). For MXFP4 the
dequantized reference is checked against HF's own dequantizing loader. ``convert`` of a model whose
experts are HF's ``FP8Experts`` runs the same checks; formats DWDP does not run raise on every rank.
One launch per world size (spawns cost far more than these tiny cases).
"""

import json
import os
import re

import pytest
import torch

import dwdp_comm as dc

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tests.helpers import hf_rankfns  # noqa: E402

# float32 models; the quantized experts run their GEMMs on bf16 inputs (the hidden states are cast to bf16)
# on weights dequantized to bf16: seen <= 5e-3. Wiring (each expert's weights with its own scales,
# the layout) is checked exactly by dequantizing what the prefetch delivered.
TOL = 2e-2
NUM_EXPERTS = 5

# (family, weight_format, block_size, files, writer options and config overrides)
SPECS = {3: [("deepseek_v3", "fp8_block", (16, 16), 1, {}), ("gpt_oss", "mxfp4", None, 1, {"intermediate_size": 32}),
             # Mixtral's names: checkpoint keys ...block_sparse_moe.experts.<e>.w1/w3/w2 renamed by HF's rules
             ("mixtral", "fp8_block", (16, 16), 1, {})],
         2: [("deepseek_v3", "fp8_block", (8, 24), 3, {}),  # partial blocks along K (32 = 24 + 8)
             ("gpt_oss", "mxfp4", None, 2, {"intermediate_size": 32}),
             # power-of-two scales stored as ue8m0 bytes (scale_fmt "ue8m0"), widened to float32 at load
             ("qwen3_moe", "fp8_block", (16, 16), 1, {"scale_fmt": "ue8m0"})]}
ERRORS = {"nvfp4": "quant_method 'modelopt'", "awq": "quant_method 'awq'", "gptq": "quant_method 'gptq'",
          "compressed": "quant_method 'compressed-tensors'", "bnb": "quant_method 'bitsandbytes'",
          "per_tensor": "per-tensor FP8", "static": "static activation scales", "e5m2": "no silent conversion",
          "block_concat": "does not divide the intermediate size", "no_expert_scale": "missing key",
          "orphan_scale": "without the weight", "no_scale": "without scales"}
UNSUPPORTED = ("nvfp4", "awq", "gptq", "compressed", "bnb", "per_tensor", "static")
CONVERT_ERRORS = {"awq": "quant_method 'awq'", "per_tensor_fp8": "per-tensor FP8 experts",
                  "mxfp4_swizzled": "Mxfp4GptOssExperts", "grouped_mm_fp8": "for quantized experts"}


def _rewrite(src, dst, drop=(), config=None, retype=None):
    """A copy of a single-file checkpoint with keys dropped, one key's dtype changed, or config fields changed."""
    os.makedirs(dst)
    tensors = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
    for k in drop:
        del tensors[k]
    if retype:
        key, dtype = retype
        tensors[key] = tensors[key].float().to(dtype)
    safetensors_torch.save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(config or {})
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def _error_cases(tmp, good):
    def quant(**q):
        return {"quantization_config": q}
    e = "model.layers.1.mlp.experts.4"
    dirs = {"nvfp4": _rewrite(good, tmp / "nvfp4", config=quant(quant_method="modelopt", quant_algo="NVFP4")),
            "awq": _rewrite(good, tmp / "awq", config=quant(quant_method="awq", bits=4, group_size=128)),
            "gptq": _rewrite(good, tmp / "gptq", config=quant(quant_method="gptq", bits=4, group_size=128)),
            "compressed": _rewrite(good, tmp / "ct", config=quant(quant_method="compressed-tensors")),
            "bnb": _rewrite(good, tmp / "bnb", config=quant(quant_method="bitsandbytes", load_in_4bit=True)),
            "per_tensor": _rewrite(good, tmp / "pt", config=quant(quant_method="fp8", activation_scheme="dynamic")),
            "static": _rewrite(good, tmp / "static", config=quant(quant_method="fp8", weight_block_size=[16, 16],
                                                                  activation_scheme="static")),
            # expert 4 is rank 1's: rank 0 must fail too (dtypes are checked from every expert's header)
            "e5m2": _rewrite(good, tmp / "e5m2", retype=(f"{e}.up_proj.weight", torch.float8_e5m2)),
            "block_concat": hf_rankfns.save_quantized_checkpoint(tmp / "b12", "deepseek_v3", 1, "fp8_block",
                                                                 block_size=(12, 16))[0],
            "no_expert_scale": _rewrite(good, tmp / "noes", drop=[f"{e}.down_proj.weight_scale_inv"]),
            "orphan_scale": _rewrite(good, tmp / "orph", drop=["model.layers.0.self_attn.o_proj.weight"]),
            "no_scale": _rewrite(good, tmp / "nos", drop=["model.layers.0.self_attn.o_proj.weight_scale_inv"])}
    return [(label, dirs[label], dirs[label], False) for label in ERRORS]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out, dirs = {}, {}
    for world_size, specs in SPECS.items():
        tmp = tmp_path_factory.mktemp(f"q{world_size}")
        cases = []
        for i, (family, fmt, block, files, kw) in enumerate(specs):
            q, ref = hf_rankfns.save_quantized_checkpoint(tmp / f"{family}{i}", family, 20 + i, fmt,
                                                          block_size=block, num_experts=NUM_EXPERTS,
                                                          num_shards=files, **kw)
            cases.append((q, None, True, ref))
        dirs[world_size] = cases
        calls = [("load_compare", cases)]
        fp8 = cases[0]
        if world_size == 3:
            calls.append(("fp8_experts_compare", fp8[0], fp8[3], SPECS[3][0][2]))
        else:
            good = hf_rankfns.save_quantized_checkpoint(tmp / "good", "deepseek_v3", 1, "fp8_block")[0]
            calls += [("load_errors", _error_cases(tmp, good)),
                      ("convert_quant_errors", fp8[0], fp8[3], SPECS[2][0][2])]
        out[world_size] = dc.testing.launch(hf_rankfns.many, world_size, calls, timeout=300)
    return out, dirs


@pytest.mark.parametrize("world_size", sorted(SPECS))
def test_quantized_load_matches_dequantized_hf(results, world_size):
    res, dirs = results
    per_rank = [r[0] for r in res[world_size]]
    for i, (family, fmt, block, _, kw) in enumerate(SPECS[world_size]):
        total, widened = hf_rankfns.expert_bytes(dirs[world_size][i][0])
        assert (widened > 0) == (kw.get("scale_fmt") == "ue8m0"), family
        read = []
        for rank, per in enumerate(per_rank):
            r = per[i]
            assert r["remote_rows_read"] == [] and r["local_rows_read"] == r["local"], (family, rank, r)
            assert r["reported_reads_match"] and r["expert_keys_read"] > 0, (family, rank)
            assert r["non_expert_diffs"] == [], (family, rank, r["non_expert_diffs"])
            assert r["tied_same"] and r["generation_config_same"], (family, rank)
            assert r["bytes_exact"], (family, rank)  # every expert weight and scale as in the checkpoint
            assert r["dequantized_exact"], (family, rank)  # ... and each with its own scales: the reference's values
            assert r["formats"] == [fmt] and r["loading"]["weight_format"] == fmt, (family, rank, r["formats"])
            assert r["loading"]["block_size"] == (list(block) if block else None)
            assert r["logits_max_diff"] <= TOL, (family, rank, r["logits_max_diff"])
            assert r["tokens_equal"], (family, rank)
            # each rank read its share of the expert bytes (weights, scales, biases) and holds it, quantized
            share, more = (total * len(r["local"]) // NUM_EXPERTS, widened * len(r["local"]) // NUM_EXPERTS)
            assert r["expert_bytes_read"] == share, (family, rank, r["expert_bytes_read"], share)
            assert r["memory"]["local_bytes"] == share + more, (family, rank, r["memory"], share, more)
            assert r["memory"]["experts_bytes_before"] == total + widened  # a replicated quantized model's
            read += r["local_rows_read"]
        assert sorted(read) == list(range(NUM_EXPERTS))  # together the ranks read every expert once
        deq = per_rank[0][i]["loading"]["dequantized"]
        if fmt == "fp8_block":  # the FP8 attention (and DeepSeek's shared experts), dequantized at load
            assert any("self_attn.o_proj" in k for k in deq), deq
            assert family != "deepseek_v3" or any("shared_experts" in k for k in deq), deq
            assert "float8_e4m3fn" in str(per_rank[0][i]["dtypes"])
        else:
            assert deq == []


def test_mxfp4_reference_is_hfs_own_dequantization(tmp_path):
    """The MXFP4 writer's dequantized twin equals what HF's own loader dequantizes from the same files."""
    import transformers as tf
    q, ref = hf_rankfns.save_quantized_checkpoint(tmp_path / "go", "gpt_oss", 3, "mxfp4", intermediate_size=32)
    hf = tf.AutoModelForCausalLM.from_pretrained(q, quantization_config=tf.Mxfp4Config(dequantize=True))
    want = tf.AutoModelForCausalLM.from_pretrained(ref).state_dict()
    got = hf.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():  # HF may dequantize to bf16 (transformers 5.17): compare in its dtype
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    assert any(re.search(r"experts\.gate_up_proj$", k) for k in want)


def test_hf_fp8_experts_convert(results):
    """convert() of a model whose experts are HF's FP8Experts (as HF loads an FP8 checkpoint on a GPU)."""
    res, _ = results
    for rank, per in enumerate(res[3]):
        r = per[1]
        assert r["formats"] == ["fp8_block"] and r["gates"] == ["swiglu"], r
        assert r["block_sizes"] == [SPECS[3][0][2]], r
        assert {"gate_up_proj_scale_inv", "down_proj_scale_inv"} <= set(r["names"]), r["names"]
        assert r["freed"] and r["bytes_exact"] and r["tokens_equal"], (rank, r)
        assert r["logits_max_diff"] <= TOL, (rank, r["logits_max_diff"])
        assert r["memory"]["local_bytes"] < r["memory"]["experts_bytes_before"]


def test_unsupported_formats_raise_on_every_rank(results):
    res, _ = results
    for rank, per in enumerate(res[2]):
        got = per[1]
        assert [c[0] for c in got] == list(ERRORS), got
        for label, name, msg in got:
            assert name is not None and ERRORS[label] in msg, (rank, label, name, msg)
            # a format DWDP does not run is an UnsupportedFormatError; a broken checkpoint an InvalidArgumentError
            assert name == ("UnsupportedFormatError" if label in UNSUPPORTED else "InvalidArgumentError"), (label, name)
            assert (name, msg) == next(c[1:] for c in res[2][0][1] if c[0] == label), (rank, label)
        conv = per[2]
        assert [c[0] for c in conv] == list(CONVERT_ERRORS), conv
        for label, name, msg in conv:
            assert name in ("CollectiveMismatchError", "CollectiveFailedError") and CONVERT_ERRORS[label] in msg, \
                (rank, label, name, msg)


def test_scheme_and_storage_rules():
    """The config parsing and the storage rules, in process (no ranks)."""
    from dwdp_comm.integrations import hf_quant as Q
    s = Q.checkpoint_scheme({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128], "scale_fmt": "ue8m0"})
    assert (s.weight_format, s.block_size, s.store_suffix) == ("fp8_block", (128, 128), "_scale_inv")
    assert Q.checkpoint_scheme(None) is None and Q.checkpoint_scheme({}) is None
    m = Q.checkpoint_scheme({"quant_method": "mxfp4"})
    assert Q.split_key("a.experts.gate_up_proj_blocks", m) == ("a.experts.gate_up_proj", "weight")
    assert Q.split_key("a.experts.gate_up_proj_scales", m) == ("a.experts.gate_up_proj", "scale")
    assert Q.split_key("a.o_proj.weight_scale_inv", s) == ("a.o_proj.weight", "scale")
    assert Q.split_key("a.o_proj.weight", s) == ("a.o_proj.weight", "weight")
    from dwdp_comm.kernels.quant import UnsupportedFormatError
    for bad, msg, cls in (({"quant_method": "fp8", "weight_block_size": [128]}, "two positive ints",
                           dc.InvalidArgumentError),
                          ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt 'e5m2'",
                           UnsupportedFormatError),
                          ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"}, "FP4",
                           UnsupportedFormatError),
                          ({"quant_method": "nvfp4"}, "NVFP4", UnsupportedFormatError)):
        with pytest.raises(cls, match=msg):
            Q.checkpoint_scheme(bad)
    # ue8m0 bytes and float8_e8m0fnu scales widen to float32 exactly; MXFP4 blocks flatten to [..., N, K/2]
    pow2 = torch.tensor([[0.5, 2.0 ** -20], [1.0, 64.0]])
    e8 = pow2.to(torch.float8_e8m0fnu)
    assert torch.equal(Q.to_storage(e8.view(torch.uint8), "scale", s), pow2)
    assert torch.equal(Q.to_storage(e8, "scale", s), pow2)
    blocks = torch.randint(0, 256, (3, 4, 2, 16), dtype=torch.uint8)
    assert torch.equal(Q.to_storage(blocks, "weight", m), blocks.reshape(3, 4, 32))
    assert Q.to_storage(e8, "scale", m).dtype == torch.uint8
