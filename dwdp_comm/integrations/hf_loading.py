"""Load a transformers MoE model from a local safetensors checkpoint with only this rank's experts.

:func:`load_model` builds the model on the meta device from the checkpoint's config, reads every
non-expert tensor and, of each experts module, only the rows this rank owns, then converts the
model as :func:`~dwdp_comm.integrations.transformers.convert` does. No rank ever reads (or
allocates) an expert row it does not own.

transformers 5.x checkpoints store experts either fused (``...experts.gate_up_proj [E, ...]``,
GPT-OSS) or per expert (``...experts.<e>.w1.weight`` for Mixtral, ``...experts.<e>.gate_proj.weight``
for the Qwen2-MoE pattern: Qwen3-MoE, DeepSeek-V3, OLMoE, ...), which HF's loader merges through
the family's conversion rules (``transformers.conversion_mapping``). This module resolves keys
with HF's own rules and applies the merge to the local experts only; a rule whose operations it
cannot restrict to rows (anything but stacking experts, concatenating or transposing inside an
expert) raises instead of loading wrong rows. Quantized checkpoints (block-FP8, MXFP4) keep their
experts quantized: each expert's scales are read beside its rows (:mod:`.hf_quant`).

>>> dm = load_model("/ckpt/Qwen3-30B-A3B", group, dtype=torch.bfloat16)   # collective
>>> dm.model.generate(ids, max_new_tokens=8); dm.close()
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..errors import DwdpError, MissingDependencyError, bad_arg, bad_type
from ..comm import describe
from ..group import Group
from ..layout import ExpertLayout
from .hf_quant import (QuantScheme, check_block_concat, check_checkpoint_dtype, checkpoint_scheme, dequantize_dense,
                       dress_experts, split_key, to_storage, unsupported)
from .transformers import DwdpModel, ExpertsSite, convert, find_experts, sites_layout

try:
    import safetensors
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, Transpose, WeightConverter,
                                                 WeightRenaming, rename_source_key)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("dwdp_comm.integrations.hf_loading needs transformers>=5.17 and safetensors: "
                                 "pip install 'dwdp_comm[hf]'") from exc

__all__ = ["Checkpoint", "build_meta_model", "load_model"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# checkpoint keys HF itself drops without a word (old persistent rotary / position buffers)
_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


class Checkpoint:
    """The tensors of a local safetensors checkpoint directory, read lazily; every read is recorded.

    Honours ``model.safetensors.index.json`` (sharded saves) or a single ``model.safetensors``.
    Local, not collective.

    Parameters
    ----------
    directory : str or os.PathLike

    Attributes
    ----------
    reads : list of (str, tuple or None, int)
        ``(key, (first row, stop row) or None for the whole tensor, bytes)`` of every read, in order.
    """

    def __init__(self, directory):
        if not isinstance(directory, (str, os.PathLike)):
            raise bad_type("checkpoint_dir", directory, "a str or os.PathLike (a local checkpoint directory)")
        directory = os.fspath(directory)
        self._handles: dict[str, object] = {}
        if not os.path.isdir(directory):
            raise bad_arg("checkpoint_dir", directory, "an existing local directory (save_pretrained output)")
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise bad_arg("checkpoint_dir", directory, f"an {INDEX_FILE} with a non-empty weight_map")
            self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
            path = os.path.join(directory, SINGLE_FILE)
            self._file_of = {k: path for k in self._open(path).keys()}
        else:
            found = sorted(os.listdir(directory))[:8]
            raise bad_arg("checkpoint_dir", directory, f"a directory with {SINGLE_FILE} or {INDEX_FILE}",
                          f"it holds {found}; only safetensors checkpoints are supported")
        self.directory = directory
        self.reads: list[tuple] = []
        for path in sorted(set(self._file_of.values())):
            if not os.path.isfile(path):
                raise bad_arg("checkpoint_dir", directory, f"every file of {INDEX_FILE} present",
                              f"{os.path.basename(path)} is missing")

    def _open(self, path: str):
        if path not in self._handles:
            # looked up at call time, so a test can watch every read through safetensors
            self._handles[path] = safetensors.safe_open(path, framework="pt", device="cpu")
        return self._handles[path]

    def keys(self) -> list[str]:
        """Every tensor key, sorted."""
        return sorted(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple:
        """The tensor's shape (reads the header only)."""
        return tuple(self._open(self._file_of[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The tensor's safetensors dtype name (``"BF16"``, ``"F32"``, ...; reads the header only)."""
        return self._open(self._file_of[key]).get_slice(key).get_dtype()

    def read(self, key: str, rows: range | None = None) -> torch.Tensor:
        """The whole tensor, or only its rows ``rows`` (first dimension; only those bytes are read)."""
        f = self._open(self._file_of[key])
        t = f.get_tensor(key) if rows is None else f.get_slice(key)[rows.start:rows.stop]
        self.reads.append((key, None if rows is None else (rows.start, rows.stop), t.numel() * t.element_size()))
        return t

    def close(self) -> None:
        """Drop the open file handles."""
        self._handles.clear()


def _resolve_dtype(dtype, config, checkpoint_dir) -> torch.dtype:
    """As ``from_pretrained(dtype=None)`` ("auto"): the config's dtype, else the first float tensor's."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise bad_arg("dtype", dtype, "a torch.dtype, its name ('bfloat16', ...) or None (the checkpoint's)")
        dtype = getattr(torch, dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise bad_type("dtype", dtype, "a torch.dtype, its name or None")
    if dtype is not None:
        return dtype
    cfg = getattr(config, "dtype", None)
    if cfg is not None:
        return getattr(torch, cfg) if isinstance(cfg, str) else cfg
    ckpt = Checkpoint(checkpoint_dir)
    floats = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    for key in ckpt.keys():
        t = ckpt.dtype(key)
        if t in floats:  # not F8_*: quantized tensors say nothing of the model dtype
            return floats[t]
    return torch.get_default_dtype()


def build_meta_model(checkpoint_dir, *, dtype=None, model_cls=None):
    """The checkpoint's model built on the meta device (no tensor allocated), unquantized. Local.

    Parameters
    ----------
    checkpoint_dir : str
        A local directory with ``config.json``.
    dtype : torch.dtype, str or None
        None: as ``from_pretrained`` (the config's ``dtype``, else the checkpoint's).
    model_cls : type, optional
        Default ``transformers.AutoModelForCausalLM``; anything with ``from_config``.

    Returns
    -------
    (model, dtype)

    Raises
    ------
    InvalidArgumentError
        No ``config.json``, or a ``quantization_config`` of a format load_model cannot read
        (:mod:`dwdp_comm.integrations.hf_quant`).
    """
    if not os.path.isfile(os.path.join(os.fspath(checkpoint_dir), "config.json")):
        raise bad_arg("checkpoint_dir", os.fspath(checkpoint_dir), "a directory with config.json")
    config = transformers.AutoConfig.from_pretrained(checkpoint_dir)
    # raises for a format load_model cannot read; the model itself is built unquantized (load_model
    # gives its experts the quantized tensors: hf_quant.dress_experts)
    checkpoint_scheme(getattr(config, "quantization_config", None))
    dtype = _resolve_dtype(dtype, config, checkpoint_dir)
    model_cls = model_cls or transformers.AutoModelForCausalLM
    if not hasattr(model_cls, "from_config"):
        raise bad_type("model_cls", model_cls, "a transformers model class (with from_config)")
    config.name_or_path = os.fspath(checkpoint_dir)
    with torch.device("meta"):
        model = model_cls.from_config(config, dtype=dtype)
    return model, dtype


def _fp32_patterns(model, dtype: torch.dtype) -> list[str]:
    """HF's keep-in-fp32 rule (``_keep_in_fp32_modules`` for fp16, ``..._strict`` for fp16/bf16)."""
    pats = []
    if getattr(model, "_keep_in_fp32_modules", None) and dtype == torch.float16:
        pats += list(model._keep_in_fp32_modules)
    if getattr(model, "_keep_in_fp32_modules_strict", None) and dtype in (torch.float16, torch.bfloat16):
        pats += list(model._keep_in_fp32_modules_strict)
    return [p.replace("*", ".*") for p in pats]


class _ExpertSource:
    """Where one fused expert tensor comes from: one fused key, or one key per (source pattern, expert)."""

    def __init__(self, converter=None):
        self.converter = converter
        self.fused: str | None = None
        self.per_expert: dict[str, dict[int, str]] = {}


def _check_ops(converter, target: str, quantized: bool) -> list:
    """The converter's operations, if every one keeps experts on dim 0 (so rows can be loaded alone) and,
    for quantized tensors, keeps them ``[N, K]`` (no transpose)."""
    ops = list(getattr(converter, "operations", []) or [])
    for i, op in enumerate(ops):
        ok = (isinstance(op, MergeModulelist) and op.dim == 0 and i == 0) or \
             (isinstance(op, Concatenate) and op.dim >= 1) or \
             (isinstance(op, Transpose) and min(op.dim0, op.dim1) >= 1 and not quantized)
        if not ok:
            why = ("transposes quantized weights or their scales, which stay [N, K]" if quantized
                   and isinstance(op, Transpose) else "does not keep experts on dim 0")
            raise DwdpError(f"load_model: {target} is built by the conversion rule {converter!r} with operation "
                            f"{type(op).__name__}({vars(op)}), which {why}; cannot load "
                            "only this rank's rows (load the model with from_pretrained and use convert())")
    return ops


def _plan(model, sites: list[ExpertsSite], ckpt: Checkpoint, scheme: QuantScheme | None):
    """Map checkpoint keys to the model.

    Returns ``(plain {model key: ckpt key}, plain scales {model key of the weight: ckpt key of its
    scales}, experts {target: _ExpertSource})``; the experts' scales are targets of their own (the
    scale names of the sites).
    """
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_sd = model.state_dict()
    prefix = model.base_model_prefix
    targets = {f"{s.path}.{n}" for s in sites for n in s.names}
    scale_of = {f"{s.path}.{w}": f"{s.path}.{n}" for s in sites for w, n in s.scales.items()}
    plain, plain_scales, experts, unexpected = {}, {}, {}, []
    for key in ckpt.keys():
        # a quantized tensor or its scales resolve through HF's rules as the unquantized tensor would
        base, role = split_key(key, scheme) if scheme is not None else (key, "weight")
        renamed, pattern = rename_source_key(base, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and base in meta_sd:  # as HF: maybe only the base-model prefix differs
            renamed, pattern = rename_source_key(base, [], [], prefix, meta_sd)
        if renamed in targets:
            target = renamed if role == "weight" else scale_of.get(renamed)
            if target is None:
                raise bad_arg("checkpoint_dir", ckpt.directory, "scales only for quantized expert weights",
                              f"{key!r} holds scales of {renamed}")
            conv = by_pattern.get(pattern)
            src = experts.setdefault(target, _ExpertSource(conv))
            if conv is not None and any(isinstance(op, MergeModulelist) for op in conv.operations):
                pre, _ = rename_source_key(base, renamings, [])
                m = re.search(pattern.replace("*", r"(\d+)"), pre)
                if m is None:
                    raise DwdpError(f"load_model: cannot tell the expert index of checkpoint key {key!r} "
                                    f"(conversion pattern {pattern!r})")
                src.per_expert.setdefault(pattern, {})[int(m.group(1))] = key
            else:
                if src.fused is not None:
                    raise DwdpError(f"load_model: {target} is in the checkpoint twice ({src.fused!r}, {key!r})")
                src.fused = key
        elif renamed in meta_sd:
            if pattern is not None:
                raise DwdpError(f"load_model: checkpoint key {key!r} needs the conversion rule "
                                f"{by_pattern[pattern]!r}, which load_model applies to expert tensors only")
            (plain_scales if role == "scale" else plain)[renamed] = key
        elif not any(re.search(p, key) for p in _IGNORED_UNEXPECTED + tuple(
                getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())):
            unexpected.append(key)
    if unexpected:
        raise bad_arg("checkpoint_dir", ckpt.directory, "tensors that all belong to the model its config builds",
                      f"{len(unexpected)} checkpoint keys match no model tensor, e.g. {unexpected[:3]}: "
                      "config.json and the weights do not match")
    orphans = sorted(set(plain_scales) - set(plain))
    if orphans:
        raise bad_arg("checkpoint_dir", ckpt.directory, "scales next to their quantized weights",
                      f"missing key: scales of {orphans[:3]} without the weight")
    return plain, plain_scales, experts


def _check_expert_source(target: str, src: _ExpertSource | None, full: torch.Tensor, ckpt: Checkpoint,
                         quant: tuple | None) -> list:
    """Every expert of ``target`` is in the checkpoint with consistent shapes (headers only); its ops.
    ``quant``: ``(scheme, role)`` of a quantized tensor or its scales (their dtypes are checked too)."""
    num_experts = full.shape[0]
    if src is None or (src.fused is None and not src.per_expert):
        raise bad_arg("checkpoint_dir", ckpt.directory, f"a tensor for {target} (fused or per expert)",
                      "missing key: the checkpoint does not hold this experts tensor")
    ops = _check_ops(src.converter, target, quant is not None) if src.converter is not None else []
    if quant is not None:
        for key in [src.fused] if src.fused is not None else [k for d in src.per_expert.values() for k in d.values()]:
            check_checkpoint_dtype(key, ckpt.dtype(key), quant[1], quant[0], ckpt.directory)
    suffix = quant[0].scale_suffix if quant is not None and quant[1] == "scale" else ""
    if src.fused is not None:
        shape = ckpt.shape(src.fused)
        if src.per_expert or not shape or shape[0] != num_experts:
            raise bad_arg("checkpoint_dir", ckpt.directory, f"{src.fused} with {num_experts} experts on dim 0",
                          f"it has shape {shape}: config.json and the weights do not match")
        return ops
    for pattern in src.converter.source_patterns:
        keys = src.per_expert.get(pattern, {})
        missing = sorted(set(range(num_experts)) - set(keys))
        extra = sorted(set(keys) - set(range(num_experts)))
        if missing or extra:
            raise bad_arg("checkpoint_dir", ckpt.directory, f"experts 0..{num_experts - 1} of {target} "
                          f"(pattern {pattern!r})", f"missing key: experts {missing} absent (no key like "
                          f"{pattern.replace('*', str(missing[0])) + suffix!r})" if missing else
                          f"experts {extra} beyond the config's {num_experts}")
        shapes = {ckpt.shape(k) for k in keys.values()}
        if len(shapes) != 1:
            raise bad_arg("checkpoint_dir", ckpt.directory, f"one shape for every expert of {pattern!r}",
                          f"shapes {sorted(shapes)}")
    return ops


def _read_local(src: _ExpertSource, ops: list, rows: range, ckpt: Checkpoint, want: tuple) -> torch.Tensor:
    """This rank's rows of one expert tensor, merged as HF's rule does for all of them."""
    if src.fused is not None:
        parts = [ckpt.read(src.fused, rows)]
    else:
        parts = [torch.stack([ckpt.read(src.per_expert[p][e]) for e in rows])
                 for p in src.converter.source_patterns]
    for op in ops:
        if isinstance(op, Concatenate):
            parts = [torch.cat(parts, dim=op.dim)]
        elif isinstance(op, Transpose):
            t = parts[0]
            if not (op.check_dims and tuple(t.shape) == want):  # HF: check_dims transposes only on a mismatch
                t = t.transpose(op.dim0, op.dim1).contiguous()
            parts = [t]
    if len(parts) != 1:
        raise DwdpError(f"load_model: conversion rule {src.converter!r} yields {len(parts)} tensors, expected one")
    return parts[0]


def _dtype_for(key: str, meta: torch.Tensor, fp32: list[str]) -> torch.dtype:
    if meta.is_floating_point() and any(re.search(p, key) for p in fp32):
        return torch.float32
    return meta.dtype  # the dtype the model was built with (HF loads every tensor in its meta tensor's dtype)


def _set(model, key: str, value: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if name not in module._buffers:
        value = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
    value._is_hf_initialized = True  # HF's flag: initialize_weights() leaves loaded tensors alone
    setattr(module, name, value)


def _set_buffer(model, key: str, value: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    setattr(model.get_submodule(path) if path else model, name, value)


def _quantize_sites(model, sites: list[ExpertsSite], scheme: QuantScheme | None):
    """The experts sites of a quantized checkpoint: every experts module given its quantized tensors
    (:func:`~dwdp_comm.integrations.hf_quant.dress_experts`), then found again; ``{target: role}`` of
    the quantized tensors and their scales."""
    if scheme is None:
        return sites, {}
    for s in sites:
        dress_experts(s.path, s.module, s.names[:2], scheme)
    sites = find_experts(model)
    roles = {f"{s.path}.{n}": role for s in sites for w, sc in s.scales.items() for n, role in ((w, "weight"),
                                                                                                 (sc, "scale"))}
    return sites, roles


def _check_plain(ck: str, scale_key: str | None, meta: torch.Tensor, ckpt: Checkpoint,
                 scheme: QuantScheme | None) -> None:
    """One non-expert tensor's headers: its shape, and a block-FP8 one's dtypes and scale shape."""
    if ckpt.shape(ck) != tuple(meta.shape):
        raise bad_arg("checkpoint_dir", ckpt.directory, f"{ck} of shape {tuple(meta.shape)}",
                      f"it has shape {ckpt.shape(ck)}: config.json and the weights do not match")
    if scale_key is None:
        if ckpt.dtype(ck).startswith("F8"):
            raise bad_arg("checkpoint_dir", ckpt.directory, f"{ck} with its scales", f"an {ckpt.dtype(ck)} tensor "
                          "without scales (missing key)")
        return
    if scheme.weight_format != "fp8_block":
        raise unsupported("checkpoint_dir", f"{scheme.weight_format} tensors outside the experts ({ck})")
    check_checkpoint_dtype(ck, ckpt.dtype(ck), "weight", scheme, ckpt.directory)
    check_checkpoint_dtype(scale_key, ckpt.dtype(scale_key), "scale", scheme, ckpt.directory)
    bn, bk = scheme.block_size
    want = (-(-meta.shape[0] // bn), -(-meta.shape[1] // bk)) if meta.dim() == 2 else None
    if want is None or ckpt.shape(scale_key) != want:
        raise bad_arg("checkpoint_dir", ckpt.directory, f"{scale_key} of shape {want} (weight_block_size "
                      f"{list(scheme.block_size)})", f"it has shape {ckpt.shape(scale_key)}")


def _read_plain(ck: str, scale_key: str | None, dtype: torch.dtype, ckpt: Checkpoint,
                scheme: QuantScheme | None) -> torch.Tensor:
    """One non-expert tensor, in ``dtype``: block-FP8 ones are dequantized (replicated, small next to the experts)."""
    if scale_key is None:
        return ckpt.read(ck).to(dtype)
    return dequantize_dense(ckpt.read(ck), ckpt.read(scale_key), scheme, dtype)


def _load_local(checkpoint_dir, group: Group, layout, dtype, model_cls):
    """Everything of :func:`load_model` before the collective conversion (local, may raise)."""
    ckpt = Checkpoint(checkpoint_dir)
    model, dtype = build_meta_model(checkpoint_dir, dtype=dtype, model_cls=model_cls)
    scheme = checkpoint_scheme(getattr(model.config, "quantization_config", None))
    sites = find_experts(model)
    if not sites:
        raise bad_arg("checkpoint_dir", ckpt.directory, "an MoE model (experts modules)",
                      f"{type(model).__name__} has none")
    layout = sites_layout(sites, group, layout, arg="checkpoint_dir", source="the config's")
    sites, quant_roles = _quantize_sites(model, sites, scheme)
    plain, plain_scales, experts = _plan(model, sites, ckpt, scheme)
    meta_sd = model.state_dict()
    fp32 = _fp32_patterns(model, dtype)
    dev = group.device
    # headers first: a bad checkpoint fails before anything is read
    targets = {f"{s.path}.{n}": (s, n) for s in sites for n in s.names}
    ops = {t: _check_expert_source(t, experts.get(t), getattr(s.module, n), ckpt,
                                   (scheme, quant_roles[t]) if t in quant_roles else None)
           for t, (s, n) in targets.items()}
    for t in (t for t, role in quant_roles.items() if role == "weight"):
        conv = experts[t].converter
        check_block_concat(t, getattr(targets[t][0].module, targets[t][1]).shape[1],
                           len(conv.source_patterns) if conv is not None and experts[t].fused is None else 1,
                           scheme, ckpt.directory)
    for key, ck in plain.items():
        _check_plain(ck, plain_scales.get(key), meta_sd[key], ckpt, scheme)
    local_rows: dict[str, dict[str, torch.Tensor]] = {}
    for t, (s, n) in targets.items():
        full = getattr(s.module, n)
        want = (layout.num_local_experts, *full.shape[1:])
        rows = _read_local(experts[t], ops[t], layout.local_experts, ckpt, want)
        if t in quant_roles:  # kept quantized, in the storage the kernels take (never a silent cast)
            rows = to_storage(rows, quant_roles[t], scheme)
        if tuple(rows.shape) != want:
            raise bad_arg("checkpoint_dir", ckpt.directory, f"{t} rows of shape {want}",
                          f"the checkpoint gives {tuple(rows.shape)}: config.json and the weights do not match")
        # staged in host memory: the store copies them into the heap at commit, so the device never
        # holds them twice (staged + heap)
        local_rows.setdefault(s.path, {})[n] = rows.to(full.dtype if t in quant_roles else _dtype_for(t, full, fp32))
    for key, ck in plain.items():
        _set(model, key, _read_plain(ck, plain_scales.get(key), _dtype_for(key, meta_sd[key], fp32), ckpt,
                                     scheme).to(dev))
    for t, (s, n) in targets.items():
        getattr(s.module, n)._is_hf_initialized = True  # stays on meta: convert() registers local_rows instead
    missing = set(meta_sd) - set(plain) - set(targets)
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    non_persistent = dict(model.named_non_persistent_buffers())
    missing -= set(non_persistent)
    still = sorted(k for k in missing if model.get_parameter_or_buffer(k).device.type == "meta")
    if still:
        raise bad_arg("checkpoint_dir", ckpt.directory, "a tensor for every model parameter",
                      f"missing key: {len(still)} absent and not tied, e.g. {still[:3]}")
    # as HF: allocate, then initialize_weights() computes them; on the CPU and then moved, so they equal
    # from_pretrained(...).to(device)'s bit for bit (rotary inv_freq computed on a GPU may differ in the last ulp)
    for key, buf in non_persistent.items():
        _set_buffer(model, key, torch.empty_like(buf, device="cpu"))
    model.initialize_weights()
    for key in non_persistent:
        _set_buffer(model, key, model.get_buffer(key).to(dev))
    model.eval()
    if model.can_generate() and os.path.isfile(os.path.join(ckpt.directory, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(ckpt.directory)
    expert_keys = {k for src in experts.values() for k in [src.fused, *(k for d in src.per_expert.values()
                                                                         for k in d.values())] if k}
    report = {"checkpoint": ckpt.directory, "dtype": str(dtype).replace("torch.", ""),
              "weight_format": scheme.weight_format if scheme else "bf16",
              "block_size": list(scheme.block_size) if scheme and scheme.block_size else None,
              "dequantized": sorted(plain_scales),
              "local_experts": [layout.local_experts.start, layout.local_experts.stop],
              "expert_reads": [r for r in ckpt.reads if r[0] in expert_keys],
              "expert_bytes_read": 0, "other_bytes_read": 0}
    report["expert_bytes_read"] = sum(r[2] for r in report["expert_reads"])
    report["other_bytes_read"] = sum(r[2] for r in ckpt.reads) - report["expert_bytes_read"]
    ckpt.close()
    return model, layout, local_rows, report


def load_model(checkpoint_dir, group: Group, *, layout: ExpertLayout | None = None, dtype=None, model_cls=None,
               **convert_kwargs) -> DwdpModel:
    """Collective: build a transformers MoE model from a local checkpoint, each rank reading only its own experts.

    Builds the model on the meta device from ``config.json`` (``model_cls.from_config``), reads every
    non-expert tensor onto ``group.device`` and, of every experts module, only the rows
    ``layout.local_experts`` (per-expert keys of the local experts, or a row slice of a fused
    key), then converts as :func:`~dwdp_comm.integrations.transformers.convert`. Tied weights,
    non-persistent buffers (rotary ``inv_freq``, ...), dtypes (``keep_in_fp32`` modules included)
    and the generation config come out as ``from_pretrained`` gives them.

    Quantized checkpoints (:mod:`~dwdp_comm.integrations.hf_quant`): block-FP8 (DeepSeek-V3/R1,
    Kimi-K2, Qwen3-FP8) and MXFP4 (GPT-OSS). Each rank reads its own expert rows and their scales,
    and the experts stay quantized (store names ``gate_up_proj`` + ``gate_up_proj_scale_inv`` /
    ``gate_up_proj_scales``, ...); block-FP8 tensors outside the experts (attention, shared
    experts) are replicated and dequantized to ``dtype``. Other formats raise on every rank.

    Parameters
    ----------
    checkpoint_dir : str or os.PathLike
        A local directory written by ``save_pretrained`` (``config.json`` and
        ``model.safetensors`` or a sharded ``model.safetensors.index.json``), the same on every rank.
    group : Group
    layout : ExpertLayout, optional
        Default: experts split evenly (as :func:`convert`).
    dtype : torch.dtype, str or None
        None: as ``from_pretrained`` (the config's ``dtype``, else the checkpoint's).
    model_cls : type, optional
        Default ``transformers.AutoModelForCausalLM``.
    **convert_kwargs
        ``depth``, ``schedule``, ``chunk_nbytes``, ``engine_options``, ``method`` of :func:`convert`.

    Returns
    -------
    DwdpModel
        Its ``loading`` dict: ``checkpoint``, ``dtype``, ``weight_format`` (``"bf16"``, ``"fp8_block"``,
        ``"mxfp4"``), ``block_size``, ``dequantized`` (model keys of the non-expert tensors dequantized
        at load), ``local_experts`` ``[first, stop)``, ``expert_reads`` (``(key, rows or None, bytes)``
        of every expert read, scales included), ``expert_bytes_read``, ``other_bytes_read``.

    Raises
    ------
    CollectiveError
        On every rank, when any rank failed (no such directory, a missing or unexpected key, shapes
        that do not match ``config.json``, a conversion rule that cannot be applied to rows alone, a
        quantization format load_model cannot read); the message names each failing rank and its error.
    """
    if not isinstance(group, Group):
        raise bad_type("group", group, "a dwdp_comm.Group (from dwdp_comm.init)")
    group.check_open()
    error, cause, result = None, None, None
    try:
        bad = sorted(set(convert_kwargs) & {"local_rows", "free"})
        if bad:
            raise bad_arg("convert_kwargs", bad, "convert() options other than local_rows/free (load_model sets them)")
        result = _load_local(checkpoint_dir, group, layout, dtype, model_cls)
    except Exception as exc:  # every rank learns of it (a mismatch on one rank would hang the others)
        error, cause = describe(exc), exc
    group.comm.agree(error, "load_model(checkpoint_dir, group)", cause=cause)
    model, layout, local_rows, report = result
    dm = convert(model, group, layout=layout, local_rows=local_rows, **convert_kwargs)
    dm.loading = report
    return dm
