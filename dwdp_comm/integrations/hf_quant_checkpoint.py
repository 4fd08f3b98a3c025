"""Write small quantized checkpoints in the real formats (tests, examples, smoke runs; no hub access).

:func:`save_quantized` saves an HF model the way its quantized releases are stored: block-FP8 as
DeepSeek-V3/R1 and Qwen3-FP8 (every ``nn.Linear`` of the decoder and every expert ``float8_e4m3fn``
with ``weight_scale_inv``; embeddings, norms, routers and ``lm_head`` unquantized) or MXFP4 as GPT-OSS
(fused experts as ``_blocks`` / ``_scales``, everything else unquantized), with the
``quantization_config`` HF writes. Next to it, optionally, the same model with every quantized
tensor replaced by its dequantized values, as a plain checkpoint: what a DWDP model loaded from the
quantized checkpoint must match.

The quantized values come from :func:`dwdp_comm.kernels.quant.quantize`; the dequantized twin is
computed here from each format's definition (``w = q * s`` per block; e2m1 codes times
``2 ** (e - 127)``), independently of the library's dequantize, so that tests comparing the two
check the library.

>>> save_quantized(model, "/tmp/ds_fp8", "fp8_block", block_size=(16, 16), reference_dir="/tmp/ds_ref")
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile

import torch

from ..errors import bad_arg
from ..kernels import quant
from .transformers import find_experts

__all__ = ["FORMATS", "save_quantized"]

FORMATS = ("fp8_block", "mxfp4")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of the fp4 codes 0-7; code | 8 is negative


def _quantize(w: torch.Tensor, weight_format: str, block_size, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` (one tensor or experts) quantized by the library's :func:`~dwdp_comm.kernels.quant.quantize`,
    in the checkpoint's storage: block-FP8 ``(q, s)`` (``pow2``: scales rounded up to powers of two and ``q``
    requantized, as ``scale_fmt="ue8m0"`` checkpoints); MXFP4 ``(blocks [..., N, K/32, 16], scales)``."""
    x = w.float().reshape(-1, *w.shape[-2:])
    q, s = quant.quantize(x, weight_format, block_size=block_size)
    if weight_format == "mxfp4":
        q = q.view(*q.shape[:-1], -1, 16)
    elif pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
        n, k = x.shape[-2:]
        full = s.repeat_interleave(block_size[0], dim=-2)[..., :n, :].repeat_interleave(block_size[1], dim=-1)
        q = (x / full[..., :k]).clamp(-quant.FP8_MAX, quant.FP8_MAX).to(quant.FP8_DTYPE)
    return q.reshape(*w.shape[:-2], *q.shape[1:]), s.reshape(*w.shape[:-2], *s.shape[1:])


def _dequantize_fp8_block(q: torch.Tensor, s: torch.Tensor, block_size) -> torch.Tensor:
    N, K = q.shape[-2:]
    full = s.repeat_interleave(block_size[0], dim=-2).repeat_interleave(block_size[1], dim=-1)
    return q.float() * full[..., :N, :K]


def _dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1 + tuple(-m for m in E2M1))
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., N, G, 16, 2]: low nibble first
    vals = lut[codes].reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])  # [..., N, G, 32]
    vals = vals * torch.exp2(scales.float() - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


def _checkpoint_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = os.path.join(directory, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else \
        ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(directory, f)))
    return out


def _write(directory: str, tensors: dict[str, torch.Tensor], config: dict, src: str, num_shards: int) -> None:
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    keys = sorted(tensors)
    if num_shards <= 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:  # contiguous runs of sorted keys: a weight and its scales may land in different files
        per = math.ceil(len(keys) / num_shards)
        weight_map = {}
        for i in range(num_shards):
            name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
            save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if os.path.isfile(os.path.join(src, "generation_config.json")):
        shutil.copy(os.path.join(src, "generation_config.json"), directory)


def _to_quantize(model, keys: list[str], weight_format: str) -> dict[str, str]:
    """Checkpoint keys to quantize -> ``"nk"`` or ``"kn"`` (layout of each expert's ``[N, K]``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    sites = {f"{s.path}.{n}": s for s in find_experts(model) for n in s.names[:2]}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head" and not re.search(r"(^|\.)(gate|router)$", n)}
    out = {}
    for key in keys:
        target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if target in sites:
            per_expert = target != key and re.search(r"\.\d+\.", key) is not None
            if weight_format == "fp8_block" and not per_expert:
                raise bad_arg("model", f"{type(model).__name__} (fused experts {key!r})",
                              "a family saved with one key per expert (block-FP8 releases: DeepSeek-V3, Qwen3)")
            if weight_format == "mxfp4" and per_expert:
                raise bad_arg("model", f"{type(model).__name__} (per-expert key {key!r})",
                              "a family saved with fused experts (MXFP4 releases: GPT-OSS)")
            out[key] = sites[target].weight_layout
        elif weight_format == "fp8_block" and target in linears:
            out[key] = "nk"
    return out


def save_quantized(model, directory, weight_format: str, *, block_size=(128, 128), scale_fmt: str = "float",
                   reference_dir=None, num_shards: int = 1) -> dict:
    """Save ``model`` as a quantized checkpoint in ``directory`` (and its dequantized twin in ``reference_dir``).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An unquantized MoE model (any float dtype; it is not modified).
    directory : str or os.PathLike
        Written: ``config.json`` (with ``quantization_config``), safetensors, ``generation_config.json``.
    weight_format : {"fp8_block", "mxfp4"}
        ``"fp8_block"``: families saved with one key per expert (DeepSeek-V3, Qwen3-MoE, Mixtral, ...);
        ``"mxfp4"``: GPT-OSS (fused experts; K of every projection a multiple of 32).
    block_size : (int, int)
        ``weight_block_size`` of block-FP8.
    scale_fmt : {"float", "ue8m0"}
        Block-FP8 scales as float32, or powers of two stored as ue8m0 bytes (``uint8``), with
        ``quantization_config.scale_fmt = "ue8m0"``.
    reference_dir : str or os.PathLike, optional
        Where to save the same model with every quantized tensor dequantized (a plain checkpoint,
        loadable by ``from_pretrained``).
    num_shards : int
        More than 1: a sharded save (``model.safetensors.index.json``).

    Returns
    -------
    dict
        ``quantized`` (checkpoint keys quantized, sorted), ``quantization_config``.
    """
    if weight_format not in FORMATS:
        raise bad_arg("weight_format", repr(weight_format), f"one of {FORMATS}")
    if scale_fmt not in ("float", "ue8m0"):
        raise bad_arg("scale_fmt", repr(scale_fmt), "'float' or 'ue8m0'")
    directory = os.fspath(directory)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # HF's own key names and reverse conversion rules
        tensors = _checkpoint_tensors(tmp)
        config = json.load(open(os.path.join(tmp, "config.json")))
        todo = _to_quantize(model, sorted(tensors), weight_format)
        reference = dict(tensors)
        for key, layout in todo.items():
            w = tensors[key]
            nk = w.transpose(-1, -2) if layout == "kn" else w
            if weight_format == "fp8_block":
                q, s = _quantize(nk, weight_format, block_size, scale_fmt == "ue8m0")
                stored = s.to(torch.float8_e8m0fnu).view(torch.uint8) if scale_fmt == "ue8m0" else s
                tensors[key], tensors[key + "_scale_inv"] = q, stored
                deq = _dequantize_fp8_block(q, s, block_size)
            else:
                blocks, scales = _quantize(nk, weight_format, block_size, False)
                del tensors[key]
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
                deq = _dequantize_mxfp4(blocks, scales)
            reference[key] = (deq.transpose(-1, -2) if layout == "kn" else deq).to(w.dtype).contiguous()
        if reference_dir is not None:
            _write(os.fspath(reference_dir), reference, config, tmp, 1)
        if weight_format == "fp8_block":
            quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                     "weight_block_size": [int(block_size[0]), int(block_size[1])], "scale_fmt": scale_fmt}
        else:
            quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                          "model.layers.*.mlp.router",
                                                                          "model.embed_tokens", "lm_head"]}
        _write(directory, tensors, dict(config, quantization_config=quant), tmp, num_shards)
    return {"quantized": sorted(todo), "quantization_config": quant}
