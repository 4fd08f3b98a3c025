"""Rank functions of the Hugging Face integration tests (module-level: dwdp_comm.testing.launch pickles them)."""

from __future__ import annotations

import torch

from dwdp_comm.integrations.hf_configs import tiny_config  # the one home of the tiny configs


def build(family: str, seed: int, num_experts: int = 5):
    """The same random float32 model on every rank (seeded)."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tiny_config(family, num_experts=num_experts)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-initialises some expert biases: make them random so they are tested
        for n, p in model.named_parameters():
            if "experts" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def compare(group, family: str, seed: int, num_experts: int = 5, method=None):
    """DWDP vs the unmodified HF model: logits, generate() tokens, freed rows, delivered bytes, aborted forward."""
    from dwdp_comm.integrations.transformers import convert, find_experts
    torch.set_num_threads(1)
    dev = group.device  # cpu on sim; the rank's GPU on cuda_ipc
    ref = build(family, seed, num_experts).to(dev)
    model = build(family, seed, num_experts).to(dev)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        want = ref(ids).logits
        want_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    full = {(s.layer, n): getattr(s.module, n).detach().clone() for s in find_experts(ref) for n in s.names}
    # poison the rows this rank does not own: DWDP must never read them from the model
    layout_rows = None
    with torch.no_grad():
        from dwdp_comm.layout import ExpertLayout
        lay = ExpertLayout(num_experts, group.size, group.rank)
        layout_rows = lay.local_experts
        for s in find_experts(model):
            for n in s.names:
                t = getattr(s.module, n)
                keep = t[layout_rows.start:layout_rows.stop].clone()
                t.fill_(float("nan"))
                t[layout_rows.start:layout_rows.stop] = keep
    dm = convert(model, group, depth=2, chunk_nbytes=512, method=method)
    out = {"methods": sorted({s.method for s in dm.sites}), "gates": sorted({str(s.gate)[:20] for s in dm.sites}),
           "memory": dm.memory}
    with dm, torch.no_grad():
        freed = all(getattr(s.module, n).device.type == "meta" for s in dm.sites for n in s.names)
        got = model(ids).logits
        out["logits_max_diff"] = float((got - want).abs().max())
        got_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, min_new_tokens=4)
        out["tokens_equal"] = bool(torch.equal(got_tokens, want_tokens))
        # abort a forward between layers, then a good one
        second = dm.sites[-1].module  # layer 0 ran, the forward dies before the last layer acquires
        real = second.dwdp_run

        def boom(*a):
            raise RuntimeError("abort between layers")
        second.dwdp_run = boom
        try:
            model(ids)
            out["aborted"] = False
        except RuntimeError:
            out["aborted"] = True
        second.dwdp_run = real
        out["after_abort_max_diff"] = float((model(ids).logits - want).abs().max())
        # every delivered row byte-exact
        exact = True
        dm.pipeline.begin()
        for s in dm.sites:
            h = dm.pipeline.acquire(s.layer)
            for n in s.names:
                w = h.weights(n)
                exact &= bool(torch.equal(w.view(torch.uint8), full[(s.layer, n)].view(torch.uint8)))
            dm.pipeline.release(h)
        out["bytes_exact"] = exact
        out["freed"] = freed
        out["stats"] = dm.stats()
    return out


def bad_convert(group, what: str):
    """convert() with bad input on one rank only: every rank must raise."""
    import transformers as tf
    from dwdp_comm.integrations.transformers import convert, find_experts
    model = build("mixtral", 0)
    kwargs = {"free": "everything"} if what == "free" and group.rank == 1 else {}
    if what == "local_rows" and group.rank == 0:  # rows of the wrong shape
        kwargs = {"local_rows": {s.path: {n: torch.zeros(1) for n in s.names} for s in find_experts(model)}}
    if what == "dense":
        model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=16))
    try:
        convert(model, group, **kwargs)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def compare_many(group, cases):
    """:func:`compare` for several ``(family, seed, num_experts, method)`` cases in one launch (saves spawns)."""
    return [compare(group, *case) for case in cases]


# ---- load_model (dwdp_comm.integrations.hf_loading) ------------------------------------------------------------

def _random_model(family: str, seed: int, num_experts: int, **overrides):
    """A tiny random float32 model (random expert biases too: HF zero-initialises some)."""
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, num_experts=num_experts, **overrides),
                                                dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def save_checkpoint(directory, family: str, seed: int, *, num_experts: int = 5, dtype=torch.float32,
                    max_shard_size=None, **overrides) -> str:
    """save_pretrained of a tiny random model (random expert biases too) into ``directory``; returns it."""
    model = _random_model(family, seed, num_experts, **overrides)
    model.to(dtype).save_pretrained(str(directory), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return str(directory)


def save_quantized_checkpoint(directory, family: str, seed: int, weight_format: str, *, block_size=(16, 16),
                              num_experts: int = 5, num_shards: int = 1, scale_fmt: str = "float",
                              **overrides) -> tuple[str, str]:
    """A tiny random model saved quantized into ``directory`` and dequantized into ``directory``-ref (a plain
    checkpoint: the reference); returns both directories."""
    from dwdp_comm.integrations.hf_quant_checkpoint import save_quantized
    model = _random_model(family, seed, num_experts, **overrides)
    ref = f"{directory}-ref"
    save_quantized(model, str(directory), weight_format, block_size=block_size, reference_dir=ref,
                   num_shards=num_shards, scale_fmt=scale_fmt)
    return str(directory), ref


def _checkpoint_reader(directory: str):
    """``read(key)`` of a checkpoint's tensors, opened with safetensors directly (the tests' own reader)."""
    import json
    import os
    from safetensors import safe_open
    index = os.path.join(directory, "model.safetensors.index.json")
    files = json.load(open(index))["weight_map"] if os.path.isfile(index) else None
    handles = {}

    def read(key):
        name = files[key] if files is not None else "model.safetensors"
        if name not in handles:
            handles[name] = safe_open(os.path.join(directory, name), framework="pt", device="cpu")
        return handles[name].get_tensor(key)
    read.keys = set(files) if files is not None else set(
        safe_open(os.path.join(directory, "model.safetensors"), framework="pt").keys())
    return read


def expert_bytes(directory) -> tuple[int, int]:
    """Bytes of every expert tensor (weights, scales, biases) of a checkpoint, from its files, and how many more
    the store holds (ue8m0 byte scales of block-FP8 held as float32)."""
    read = _checkpoint_reader(directory)
    keys = [k for k in read.keys if ".experts." in k]
    widened = sum(3 * read(k).numel() for k in keys if k.endswith("_scale_inv") and read(k).dtype == torch.uint8)
    return sum(read(k).numel() * read(k).element_size() for k in keys), widened


def quantized_truth(directory: str, path: str, name: str, num_experts: int) -> torch.Tensor:
    """``[E, ...]`` of a quantized expert tensor or its scales as the store holds it, rebuilt from the checkpoint
    files by the tests' own reading: per-expert FP8 keys (Qwen2-MoE pattern ``...mlp.experts.<e>.gate_proj``, or
    Mixtral's ``...block_sparse_moe.experts.<e>.w1``; ue8m0 byte scales widened to float32) or GPT-OSS-style fused
    MXFP4 blocks."""
    read = _checkpoint_reader(directory)
    if f"{path}.{name}_blocks" in read.keys:  # [E, N, K/32, 16] -> [E, N, K/2]
        t = read(f"{path}.{name}_blocks")
        return t.reshape(t.shape[0], t.shape[1], -1)
    if f"{path}.{name}" in read.keys:
        return read(f"{path}.{name}")
    scale = name.endswith("_scale_inv")
    base, suffix = (name[:-len("_scale_inv")], ".weight_scale_inv") if scale else (name, ".weight")
    names = {"gate_up_proj": (["gate_proj", "up_proj"], ["w1", "w3"]), "down_proj": (["down_proj"], ["w2"]),
             "up_proj": (["up_proj"], ["w3"])}[base]
    for where in (path, path.replace(".mlp.", ".block_sparse_moe.")):
        for projs in names:
            if f"{where}.0.{projs[0]}{suffix}" in read.keys:
                t = torch.stack([torch.cat([read(f"{where}.{e}.{p}{suffix}") for p in projs])
                                 for e in range(num_experts)])
                return t.view(torch.float8_e8m0fnu).float() if t.dtype == torch.uint8 else t
    raise KeyError(f"{path}.{name}: no such tensor in {directory}")


class _SliceSpy:
    def __init__(self, real, key, log):
        self._real, self._key, self._log = real, key, log

    def __getitem__(self, idx):
        self._log.append((self._key, idx))
        return self._real[idx]

    def __getattr__(self, name):  # get_shape, get_dtype: headers only
        return getattr(self._real, name)


class _FileSpy:
    """A safetensors file handle that records every tensor read (key, index) into ``log``."""

    def __init__(self, real, log):
        self._real, self._log = real, log

    def get_slice(self, key):
        return _SliceSpy(self._real.get_slice(key), key, self._log)

    def get_tensor(self, key):
        self._log.append((key, slice(None)))
        return self._real.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _expert_rows_read(log, num_experts: int) -> dict[str, set]:
    """Per expert checkpoint key read: the global experts its read covered (told from the key names alone)."""
    import re
    out: dict[str, set] = {}
    for key, idx in log:
        m = re.search(r"\.experts\.(\d+)\.", key)
        if m:  # one expert's tensor: the whole read is that expert
            out.setdefault(key, set()).add(int(m.group(1)))
        elif re.search(r"\.experts\.[a-z_]+$", key):  # fused [E, ...]: the rows of the slice
            sl = idx[0] if isinstance(idx, tuple) else idx
            out.setdefault(key, set()).update(range(num_experts)[sl])
    return out


def load_compare(group, cases):
    """load_model vs from_pretrained + unmodified HF, for each ``(checkpoint dir, load dtype, check_tokens)`` or
    ``(..., reference dir)``: a quantized checkpoint against the plain checkpoint of its dequantized values."""
    import safetensors
    import transformers as tf
    from dwdp_comm.integrations.hf_loading import load_model
    from dwdp_comm.kernels import quant
    torch.set_num_threads(1)
    results = []
    for directory, dtype, check_tokens, *reference in cases:
        dev = group.device  # cpu on sim; the rank's GPU on cuda_ipc
        ref = tf.AutoModelForCausalLM.from_pretrained(reference[0] if reference else directory,
                                                      dtype=dtype).to(dev).eval()
        ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            want = ref(ids).logits.float()
            want_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                       do_sample=False) if check_tokens else None
        log: list = []
        real_open = safetensors.safe_open
        safetensors.safe_open = lambda *a, **k: _FileSpy(real_open(*a, **k), log)
        try:
            dm = load_model(directory, group, dtype=dtype, depth=2, chunk_nbytes=512)
        finally:
            safetensors.safe_open = real_open
        model, out = dm.model, {"dir": directory}
        with dm, torch.no_grad():
            local = set(dm.store.layout.local_experts)
            rows = _expert_rows_read(log, dm.store.layout.num_experts)
            out["expert_keys_read"] = len(rows)
            out["remote_rows_read"] = sorted({e for r in rows.values() for e in r} - local)
            out["local_rows_read"] = sorted({e for r in rows.values() for e in r} & local)
            out["local"] = sorted(local)
            out["reported_reads_match"] = len(dm.loading["expert_reads"]) == sum(
                1 for k, _ in log if k in rows)
            experts = {f"{s.path}.{n}" for s in dm.sites for n in s.names}
            ref_sd, got_sd = ref.state_dict(), model.state_dict()
            diffs = []
            for k, v in ref_sd.items():
                if k in experts:
                    continue
                g = got_sd.get(k)
                if g is None or g.dtype != v.dtype or g.device != v.device or not torch.equal(g, v):
                    diffs.append(k)
            for k, v in ref.named_buffers():  # non-persistent ones too (rotary inv_freq, ...)
                g = model.get_buffer(k)
                if g.dtype != v.dtype or not torch.equal(g, v):
                    diffs.append(k)
            for k, p in ref.named_parameters():
                if k not in experts and model.get_parameter(k).requires_grad != p.requires_grad:
                    diffs.append(k + " requires_grad")
            out["non_expert_diffs"] = diffs
            out["tied_same"] = (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight) == \
                (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
            out["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            out["generation_config_same"] = model.generation_config.to_dict() == ref.generation_config.to_dict()
            out["dtypes"] = sorted({str(v.dtype) for v in got_sd.values()})
            out["logits_max_diff"] = float((model(ids).logits.float() - want).abs().max())
            if check_tokens:
                got_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                            min_new_tokens=4, do_sample=False)
                out["tokens_equal"] = bool(torch.equal(got_tokens, want_tokens))
            exact, deq_exact = True, True
            dm.pipeline.begin()
            for s in dm.sites:
                h = dm.pipeline.acquire(s.layer)
                quantized = set(s.scales) | set(s.scales.values())
                for n in s.names:
                    full = quantized_truth(directory, s.path, n, s.num_experts).to(dev) if n in quantized else \
                        ref.get_submodule(s.path).get_parameter(n)
                    w = h.weights(n)
                    exact &= w.dtype == full.dtype and w.shape == full.shape and bool(
                        torch.equal(w.view(torch.uint8), full.view(torch.uint8)))
                for n, sn in s.scales.items():  # each expert's weights with its own scales: the reference's values
                    want = ref.get_submodule(s.path).get_parameter(n)
                    if ref.get_submodule(s.path).is_transposed:
                        want = want.transpose(1, 2)
                    got = quant.dequantize(h.weights(n), h.weights(sn), s.weight_format,
                                           block_size=s.block_size or quant.DEFAULT_BLOCK_SIZE, dtype=want.dtype)
                    deq_exact &= bool(torch.equal(got, want))
                dm.pipeline.release(h)
            out["bytes_exact"], out["dequantized_exact"] = exact, deq_exact
            out["formats"] = sorted({s.weight_format for s in dm.sites})
            out["memory"] = dm.memory
            out["loading"] = {k: v for k, v in dm.loading.items() if k != "expert_reads"}
            out["expert_bytes_read"] = dm.loading["expert_bytes_read"]
        results.append(out)
    return results


def load_errors(group, cases):
    """load_model on bad checkpoints: each ``(label, dir on rank 0, dir on the others, conversion override)``."""
    from dwdp_comm.integrations.hf_loading import load_model
    torch.set_num_threads(1)
    out = []
    for label, dir0, dir_other, override in cases:
        if override:
            from transformers.conversion_mapping import register_checkpoint_conversion_mapping
            from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
            # experts merged along dim 1: rows of the result are not experts, load_model must refuse it
            register_checkpoint_conversion_mapping("mixtral", [
                WeightRenaming(".block_sparse_moe.", ".mlp."),
                WeightConverter([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj",
                                operations=[MergeModulelist(dim=1), Concatenate(dim=1)]),
                WeightConverter([".experts.*.w2.weight"], ".experts.down_proj", operations=[MergeModulelist(dim=0)])],
                overwrite=True)
        try:
            load_model(dir0 if group.rank == 0 else dir_other, group)
            out.append((label, None, ""))
        except Exception as exc:
            out.append((label, type(exc).__name__, str(exc)))
    return out


def many(group, calls):
    """Several rank functions of this module in one launch: ``[(name, *args), ...]`` -> their results.

    Spawning ranks costs far more than these tiny cases (a torch + transformers import per rank),
    so each test file launches once per world size and its tests check their part.
    """
    return [globals()[name](group, *args) for name, *args in calls]


# ---- quantized models (tests/cpu/test_hf_quantized.py) ----------------------------------------------------------

def _fp8_experts_model(quant_dir: str, ref_dir: str, block_size, dev, *, poison: range | None = None,
                       block=True):
    """The model of ``ref_dir`` with every experts module replaced by HF's own ``FP8Experts`` holding the
    checkpoint's FP8 experts (what ``from_pretrained`` of ``quant_dir`` gives on a GPU with HF's FP8
    kernels); rows outside ``poison`` are NaN (never to be read)."""
    import transformers as tf
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation
    from dwdp_comm.integrations.transformers import find_experts
    model = tf.AutoModelForCausalLM.from_pretrained(ref_dir).to(dev).eval()
    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS,
                                     has_bias=False, has_gate=True)
    for s in find_experts(model):
        new = cls(config=s.module.config, block_size=tuple(block_size) if block else None,
                  activation_scheme="dynamic", scale_fmt="float", has_bias=False, has_gate=True)
        with torch.no_grad():
            for n, p in new.named_parameters():
                if block:
                    p.copy_(quantized_truth(quant_dir, s.path, n, s.num_experts))
                if poison is not None:
                    keep = p[poison.start:poison.stop].clone()
                    p.view(torch.uint8).fill_(0xFF)  # NaN in float8_e4m3fn and float32
                    p[poison.start:poison.stop] = keep
        model.set_submodule(s.path, new.to(dev))
    model.config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(block_size)}
    return model


def fp8_experts_compare(group, quant_dir: str, ref_dir: str, block_size):
    """convert() of a model whose experts are HF's FP8Experts vs the model of the dequantized checkpoint."""
    from dwdp_comm.integrations.transformers import convert
    from dwdp_comm.layout import ExpertLayout
    torch.set_num_threads(1)
    import transformers as tf
    dev = group.device
    ref = tf.AutoModelForCausalLM.from_pretrained(ref_dir).to(dev).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.no_grad():
        want = ref(ids).logits
        want_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)
    lay = ExpertLayout(ref.config.n_routed_experts, group.size, group.rank)
    model = _fp8_experts_model(quant_dir, ref_dir, block_size, dev, poison=lay.local_experts)
    dm = convert(model, group, depth=2, chunk_nbytes=512)
    out = {"formats": sorted({s.weight_format for s in dm.sites}), "gates": sorted({str(s.gate) for s in dm.sites}),
           "names": sorted({n for s in dm.sites for n in s.names}), "memory": dm.memory,
           "block_sizes": sorted({s.block_size for s in dm.sites})}
    with dm, torch.no_grad():
        out["freed"] = all(getattr(s.module, n).device.type == "meta" for s in dm.sites for n in s.names)
        out["logits_max_diff"] = float((model(ids).logits - want).abs().max())
        got_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                    do_sample=False)
        out["tokens_equal"] = bool(torch.equal(got_tokens, want_tokens))
        exact = True
        dm.pipeline.begin()
        for s in dm.sites:
            h = dm.pipeline.acquire(s.layer)
            for n in s.names:
                w, full = h.weights(n), quantized_truth(quant_dir, s.path, n, s.num_experts).to(dev)
                exact &= w.dtype == full.dtype and bool(torch.equal(w.view(torch.uint8), full.view(torch.uint8)))
            dm.pipeline.release(h)
        out["bytes_exact"] = exact
    return out


def convert_quant_errors(group, quant_dir: str, ref_dir: str, block_size):
    """convert() of models quantized in formats DWDP does not run: every rank raises, naming the format."""
    import transformers as tf
    from dwdp_comm.integrations.transformers import convert
    torch.set_num_threads(1)
    dev = group.device
    out = []
    for label in ("awq", "per_tensor_fp8", "mxfp4_swizzled", "grouped_mm_fp8"):
        kwargs = {}
        if label == "awq":
            model = tf.AutoModelForCausalLM.from_pretrained(ref_dir).eval()
            model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 128}
        elif label == "per_tensor_fp8":
            model = _fp8_experts_model(quant_dir, ref_dir, block_size, dev, block=False)
        elif label == "mxfp4_swizzled":  # HF's MXFP4 experts as its quantizer builds them (meta: never run)
            from transformers.integrations.mxfp4 import Mxfp4GptOssExperts
            cfg = tiny_config("gpt_oss", intermediate_size=32)
            with torch.device("meta"):
                model = tf.AutoModelForCausalLM.from_config(cfg)
                for i, layer in enumerate(model.model.layers):
                    layer.mlp.experts = Mxfp4GptOssExperts(cfg)
            model.config.quantization_config = {"quant_method": "mxfp4"}
        else:
            model = _fp8_experts_model(quant_dir, ref_dir, block_size, dev)
            kwargs = {"method": "hf_grouped_mm"}
        try:
            convert(model, group, **kwargs).close()
            out.append((label, None, ""))
        except Exception as exc:
            out.append((label, type(exc).__name__, str(exc)))
    return out
