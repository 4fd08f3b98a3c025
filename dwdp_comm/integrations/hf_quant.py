"""Quantized MoE checkpoints and experts modules on DWDP: which formats run, and how their tensors are named.

Supported (experts are kept quantized, never dequantized at load):

* **block-FP8** checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8): ``config.json`` has
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [bn, bk]}``; every quantized ``nn.Linear`` weight ``X.weight`` is
  ``float8_e4m3fn [N, K]`` with ``X.weight_scale_inv`` ``float32 [ceil(N/bn), ceil(K/bk)]``
  (``w = q * s`` per block; ``scale_fmt="ue8m0"`` scales are widened to float32, exactly). The
  experts become the store names of HF's ``FP8Experts``: ``gate_up_proj`` ``float8_e4m3fn [E, N, K]``
  and ``gate_up_proj_scale_inv`` ``float32 [E, ceil(N/bn), ceil(K/bk)]`` (format ``"fp8_block"``).
* **MXFP4** checkpoints (GPT-OSS): ``quant_method "mxfp4"``; experts ``X_blocks`` ``uint8 [E, N, K/32, 16]``
  and ``X_scales`` ``uint8 [E, N, K/32]`` (e8m0) become ``gate_up_proj`` ``uint8 [E, N, K/2]`` and
  ``gate_up_proj_scales`` ``uint8 [E, N, K/32]`` (format ``"mxfp4"``, two e2m1 values a byte, element
  2j in the low nibble).

Quantized experts always use the ``"nk"`` layout (per expert ``[N, K]`` as ``nn.Linear``), whatever the
unquantized module's ``is_transposed`` says. FP8 weights outside the experts (DeepSeek's attention,
shared experts and dense MLPs) are replicated on every rank and small next to the experts: they are
dequantized at load to the model dtype (HF's ``FP8Linear`` runs the ``kernels-community/finegrained-fp8``
hub kernel, a download, or DeepGEMM: neither on a CPU nor on an offline GPU machine). That doubles their bytes in bf16: on DeepSeek-V3 the tensors
besides the experts take 32.1 GiB a rank instead of 18.0 GiB as stored (+14.1 GiB), next to 609 GiB
of FP8 experts spread over the group (``perf/quant_memory.py``).

Anything else (NVFP4 / ModelOpt, AWQ, GPTQ, compressed-tensors, bitsandbytes, per-tensor or
per-channel FP8, static activation scales, FP4 experts of ``expert_dtype="fp4"``, HF's swizzled
``Mxfp4GptOssExperts``) raises :class:`~dwdp_comm.kernels.quant.UnsupportedFormatError` (an
``InvalidArgumentError``) naming the format and :data:`SUPPORTED`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import bad_arg
from ..kernels.quant import UnsupportedFormatError

__all__ = ["SUPPORTED", "QuantScheme", "checkpoint_scheme", "check_model_quantization", "split_key",
           "dress_experts", "experts_quantization", "unsupported", "check_checkpoint_dtype", "to_storage",
           "check_block_concat", "dequantize_dense"]

SUPPORTED = ("unquantized (or dequantized) models; block-FP8 (quant_method 'fp8' with weight_block_size, "
             "fmt 'e4m3', activation_scheme 'dynamic': DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8); MXFP4 "
             "(quant_method 'mxfp4' checkpoints: GPT-OSS)")

# HF's names of a quantized experts projection's scales (FP8Experts; GPT-OSS checkpoints)
SCALE_SUFFIXES = {"fp8_block": "_scale_inv", "mxfp4": "_scales"}
_MXFP4_GROUP = 32


def unsupported(arg: str, what: str, detail: str = "") -> UnsupportedFormatError:
    """The error for a quantization format DWDP does not run: names it and lists what is supported."""
    return UnsupportedFormatError(bad_arg(arg, what, f"a supported format: {SUPPORTED}", detail).args[0])


@dataclass(frozen=True)
class QuantScheme:
    """How a checkpoint's quantized tensors are stored.

    Attributes
    ----------
    method : {"fp8", "mxfp4"}
        ``quantization_config.quant_method``.
    weight_format : {"fp8_block", "mxfp4"}
        The experts' format in :mod:`dwdp_comm.kernels.quant`.
    block_size : tuple of int or None
        ``(bn, bk)`` of block-FP8.
    weight_suffix, scale_suffix : str
        Checkpoint key suffixes of a quantized tensor and of its scales, after the unquantized
        name (``("", "_scale_inv")`` for ``X.weight``; ``("_blocks", "_scales")`` for GPT-OSS experts).
    """

    method: str
    weight_format: str
    block_size: tuple | None
    weight_suffix: str
    scale_suffix: str

    @property
    def store_suffix(self) -> str:
        """Suffix of the experts' scale tensors on the module and in the store."""
        return SCALE_SUFFIXES[self.weight_format]


def _as_dict(quant) -> dict:
    if isinstance(quant, dict):
        return quant
    to_dict = getattr(quant, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(vars(quant))


def checkpoint_scheme(quant, arg: str = "checkpoint_dir") -> QuantScheme | None:
    """The scheme of a checkpoint's ``quantization_config`` (None: not quantized).

    Parameters
    ----------
    quant : dict, transformers QuantizationConfigMixin or None
        ``config.quantization_config``.
    arg : str
        The argument errors name.

    Raises
    ------
    UnsupportedFormatError
        A format DWDP does not run (see the module docstring), naming it and what is supported.
    """
    if not quant:
        return None
    q = _as_dict(quant)
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        if block is None:
            raise unsupported(arg, "per-tensor FP8 (quant_method 'fp8' without weight_block_size)")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise bad_arg(arg, f"quantization_config.weight_block_size={block!r}", "two positive ints [bn, bk]")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise unsupported(arg, f"FP8 with activation_scheme {q.get('activation_scheme')!r} (static activation "
                              "scales)")
        if q.get("fmt", "e4m3") != "e4m3":
            raise unsupported(arg, f"FP8 weights of fmt {q.get('fmt')!r} (only e4m3 is supported)")
        if q.get("expert_dtype", "fp8") != "fp8":
            raise unsupported(arg, f"FP8 checkpoints with expert_dtype {q.get('expert_dtype')!r} (FP4-packed experts)")
        if q.get("scale_fmt", "float") not in ("float", "ue8m0", None):
            raise unsupported(arg, f"FP8 scales of scale_fmt {q.get('scale_fmt')!r}")
        if q.get("modules_to_convert"):
            raise unsupported(arg, "FP8 embeddings (quantization_config.modules_to_convert)")
        return QuantScheme("fp8", "fp8_block", (int(block[0]), int(block[1])), "", "_scale_inv")
    if method == "mxfp4":
        return QuantScheme("mxfp4", "mxfp4", None, "_blocks", "_scales")
    raise unsupported(arg, f"quantization_config.quant_method {method!r}",
                      {"modelopt": "NVFP4 / ModelOpt checkpoints", "nvfp4": "NVFP4 checkpoints",
                       "awq": "int4 group quantization", "gptq": "int4 group quantization",
                       "compressed-tensors": "compressed-tensors checkpoints",
                       "bitsandbytes": "bitsandbytes", "fbgemm_fp8": "per-channel FP8 (fbgemm)"}.get(str(method), ""))


def check_model_quantization(model) -> None:
    """Check that a model HF loaded with a quantization config keeps experts DWDP can run. Local.

    Accepted: no ``quantization_config``; a dequantized one (``dequantize=True``: plain weights);
    ``"fp8"`` (HF's ``FP8Experts``, checked per module by :func:`experts_quantization`); ``"mxfp4"``
    whose experts were dequantized or dressed by :func:`dress_experts` (``load_model``).

    Raises
    ------
    UnsupportedFormatError
        Any other format, or HF's ``Mxfp4GptOssExperts`` (weights swizzled for the Triton kernels).
    """
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if not quant:
        return
    q = _as_dict(quant)
    method = q.get("quant_method")
    if q.get("dequantize"):
        return
    if method == "mxfp4":
        for path, m in model.named_modules():
            if type(m).__name__ == "Mxfp4GptOssExperts" or hasattr(m, "gate_up_proj_precision_config"):
                raise unsupported("model", f"{path} is HF's Mxfp4GptOssExperts (MXFP4 weights swizzled for the Triton "
                                  "kernels)", "load the checkpoint with dwdp_comm.integrations.hf_loading.load_model "
                                  "(reads the _blocks/_scales), or from_pretrained(..., quantization_config="
                                  "Mxfp4Config(dequantize=True)) then convert()")
        return
    if method != "fp8":
        checkpoint_scheme(q, arg="model")  # raises, naming the format


def split_key(key: str, scheme: QuantScheme) -> tuple[str, str]:
    """``(unquantized key, role)`` of a checkpoint key: role ``"scale"`` for scales, else ``"weight"``."""
    if key.endswith(scheme.scale_suffix):
        return key[:-len(scheme.scale_suffix)], "scale"
    if scheme.weight_suffix and key.endswith(scheme.weight_suffix):
        return key[:-len(scheme.weight_suffix)], "weight"
    return key, "weight"


def _nk(module, weight: torch.Tensor) -> tuple[int, int]:
    """``(N, K)`` of one expert's projection of an unquantized experts module."""
    _, a, b = weight.shape
    return (b, a) if getattr(module, "is_transposed", False) else (a, b)


def dress_experts(path: str, module: torch.nn.Module, weights: tuple[str, ...], scheme: QuantScheme,
                  arg: str = "checkpoint_dir") -> dict[str, str]:
    """Give an unquantized experts module (on the meta device) the quantized tensors of ``scheme``.

    Replaces each weight in ``weights`` (``gate_up_proj`` / ``up_proj``, ``down_proj``) by a meta
    parameter of its quantized storage and adds its scales beside it (HF's ``FP8Experts`` names:
    ``<weight>_scale_inv``; MXFP4: ``<weight>_scales``), plus ``block_size`` for block-FP8, so that
    :func:`experts_quantization` reads it as HF's quantized experts. Local.

    Returns
    -------
    dict
        ``{weight name: scale name}``.

    Raises
    ------
    InvalidArgumentError
        MXFP4 with K not a multiple of 32.
    """
    scales = {}
    for n in weights:
        p = getattr(module, n)
        E = p.shape[0]
        N, K = _nk(module, p)
        if scheme.weight_format == "fp8_block":
            bn, bk = scheme.block_size
            w = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device="meta")
            s = torch.empty(E, math.ceil(N / bn), math.ceil(K / bk), dtype=torch.float32, device="meta")
        else:
            if K % _MXFP4_GROUP:
                raise bad_arg(arg, f"{path}.{n} with K={K}", f"K a multiple of {_MXFP4_GROUP} (MXFP4 groups)")
            w = torch.empty(E, N, K // 2, dtype=torch.uint8, device="meta")
            s = torch.empty(E, N, K // _MXFP4_GROUP, dtype=torch.uint8, device="meta")
        module._parameters[n] = torch.nn.Parameter(w, requires_grad=False)
        scales[n] = n + scheme.store_suffix
        module.register_parameter(scales[n], torch.nn.Parameter(s, requires_grad=False))
    if scheme.block_size is not None:
        module.block_size = scheme.block_size
    return scales


def experts_quantization(path: str, module: torch.nn.Module, weights: tuple[str, ...]):
    """How an experts module's weights are stored: ``(weight_format, block_size, {weight: scale name})``.

    ``("bf16", None, {})`` for unquantized (float) weights. Reads HF's own attributes: ``FP8Experts``
    (``<weight>_scale_inv`` with ``block_size``) or modules dressed by :func:`dress_experts`. Local.

    Raises
    ------
    UnsupportedFormatError
        Quantized weights of a format DWDP does not run (per-tensor FP8, FP4-packed ``int8`` experts,
        static activation scales, integer weights without scales, ...).
    """
    found = {}
    for n in weights:
        for suffix in SCALE_SUFFIXES.values():
            if isinstance(getattr(module, n + suffix, None), torch.Tensor):
                found[n] = n + suffix
    w = getattr(module, weights[0])
    where = f"{path}.{weights[0]} ({type(module).__name__})"
    if not found:
        if not w.is_floating_point() or w.element_size() == 1:
            raise unsupported("model", f"{where} of dtype {w.dtype} without scales")
        return "bf16", None, {}
    if set(found) != set(weights) or len({found[n][len(n):] for n in weights}) != 1:
        raise unsupported("model", f"{where}: scales for {sorted(found)} of {list(weights)}")
    if any(isinstance(getattr(module, n + "_activation_scale", None), torch.Tensor) for n in weights):
        raise unsupported("model", f"{where} with static activation scales (activation_scheme 'static')")
    scale = getattr(module, found[weights[0]])
    suffix = found[weights[0]][len(weights[0]):]
    if suffix == SCALE_SUFFIXES["fp8_block"] and w.dtype == torch.float8_e4m3fn:
        block = getattr(module, "block_size", None)
        if block is None or scale.dim() != 3:
            raise unsupported("model", f"{where}: per-tensor FP8 experts (block_size None)")
        return "fp8_block", tuple(int(b) for b in block), found
    if suffix == SCALE_SUFFIXES["mxfp4"] and w.dtype == torch.uint8 and scale.dtype == torch.uint8:
        return "mxfp4", None, found
    raise unsupported("model", f"{where}: weights {w.dtype} {tuple(w.shape)} with scales {scale.dtype} "
                      f"{tuple(scale.shape)}", "e.g. FP4-packed experts (expert_dtype 'fp4')"
                      if w.dtype in (torch.int8, torch.uint8) else "")


# safetensors dtypes a quantized checkpoint may store, per (format, role)
_CKPT_DTYPES = {("fp8_block", "weight"): ("F8_E4M3",), ("fp8_block", "scale"): ("F32", "BF16", "F16", "F8_E8M0", "U8"),
                ("mxfp4", "weight"): ("U8",), ("mxfp4", "scale"): ("U8", "F8_E8M0")}


def check_checkpoint_dtype(key: str, dtype: str, role: str, scheme: QuantScheme, directory: str) -> None:
    """Raise unless checkpoint tensor ``key`` (safetensors dtype name ``dtype``) has a dtype of its role."""
    ok = _CKPT_DTYPES[(scheme.weight_format, role)]
    if dtype not in ok:
        raise bad_arg("checkpoint_dir", directory, f"{key} of dtype {' or '.join(ok)} ({scheme.weight_format} "
                      f"{role}s)", f"it is {dtype}: no silent conversion of quantized tensors")


def to_storage(t: torch.Tensor, role: str, scheme: QuantScheme) -> torch.Tensor:
    """A quantized tensor or its scales as read from a checkpoint, in the storage of :mod:`dwdp_comm.kernels.quant`.

    Block-FP8 scales become float32 (``uint8`` / ``float8_e8m0fnu`` ue8m0 bytes exactly); MXFP4
    blocks ``[..., N, K/32, 16]`` become ``[..., N, K/2]``, its scales ``uint8``. Any leading dims.
    """
    if role == "scale":
        if scheme.weight_format == "fp8_block":
            return (t.view(torch.float8_e8m0fnu) if t.dtype == torch.uint8 else t).float()
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    if scheme.weight_format == "mxfp4" and t.dim() >= 3 and t.shape[-1] == 16:
        return t.reshape(*t.shape[:-2], -1)
    return t


def check_block_concat(target: str, rows: int, parts: int, scheme: QuantScheme, directory: str) -> None:
    """Block-FP8 scales of ``parts`` projections concatenated along N (gate and up into ``gate_up_proj``)
    are one uniform grid of blocks only when each projection's rows fill whole blocks."""
    if scheme.weight_format != "fp8_block" or parts <= 1:
        return
    bn = scheme.block_size[0]
    if (rows // parts) % bn:
        raise bad_arg("checkpoint_dir", directory, f"{target}: projections of rows a multiple of the block "
                      f"rows {bn}", f"{parts} projections of {rows // parts} rows: their concatenated block "
                      "scales are not one uniform grid (weight_block_size does not divide the intermediate size)")


def dequantize_dense(weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme,
                     dtype: torch.dtype) -> torch.Tensor:
    """A non-expert block-FP8 weight ``[N, K]`` and its ``weight_scale_inv`` as ``dtype`` (replicated tensors only).

    Computed in float32 and rounded once to ``dtype``, on the tensors' device (the loader's: host memory).
    """
    from ..kernels import quant
    s = to_storage(scale, "scale", scheme)
    return quant.dequantize(weight[None], s[None], scheme.weight_format, block_size=scheme.block_size,
                            dtype=torch.float32)[0].to(dtype)
