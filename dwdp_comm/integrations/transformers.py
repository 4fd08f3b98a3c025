"""Hugging Face transformers MoE models on DWDP: find the experts modules, shard them, run them prefetched.

transformers 5.x routes every MoE family's routed experts through ``ExpertsInterface``
(``fn(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``) and
each experts module describes its layout with ``has_gate``, ``has_bias``, ``is_transposed``,
``is_concatenated``, ``_apply_gate`` and ``act_fn``. :func:`convert` registers each rank's expert
rows in a :class:`~dwdp_comm.WeightStore`, frees the rows, and points the model at a ``"dwdp"``
experts implementation that takes the weights from a :class:`~dwdp_comm.moe.pipeline.DwdpPipeline`.
HF keeps routing, attention, shared experts, KV cache and ``generate``.

>>> dm = convert(model, group, depth=2)          # collective
>>> logits = model(input_ids).logits               # experts prefetched layer-ahead
>>> dm.stats(); dm.close()                          # close is collective
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import DwdpError, MissingDependencyError, bad_arg, bad_type
from ..group import Group
from ..layout import ExpertLayout
from ..moe.experts import experts_forward
from ..moe.pipeline import DwdpPipeline
from ..prefetch import Prefetcher
from ..store import WeightStore
from .hf_quant import check_model_quantization, experts_quantization

try:
    import transformers  # noqa: F401
    from transformers.integrations import moe as _hf_moe
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise MissingDependencyError("dwdp_comm.integrations.transformers needs Hugging Face transformers: "
                                 "pip install 'dwdp_comm[hf]' (transformers>=5.17,<6, safetensors)") from exc

__all__ = ["ExpertsSite", "DwdpModel", "find_experts", "sites_layout", "convert", "IMPLEMENTATION"]

IMPLEMENTATION = "dwdp"
_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
_BIAS_SUFFIX = "_bias"


@dataclass
class ExpertsSite:
    """One HF experts module and how DWDP runs it.

    Attributes
    ----------
    layer : int
        Store layer id (the site's position in forward order).
    path : str
        Module name in ``model.named_modules()``.
    module : torch.nn.Module
    num_experts : int
    names : tuple of str
        The module's expert tensors (HF names, e.g. ``("gate_up_proj", "down_proj", ...)``).
    weight_layout : {"nk", "kn"}
        ``"kn"`` when HF's ``is_transposed``.
    gate : str, callable or None
        What :func:`~dwdp_comm.moe.experts.experts_forward` gets: ``"swiglu"`` (HF's default
        ``_apply_gate``), the module's own ``_apply_gate`` (a family-specific gate), or None (no gate).
    method : {"experts_forward", "hf_grouped_mm"}
        The library's experts forward, or HF's own ``grouped_mm`` experts code fed with the
        prefetched tensors (the fallback for math the library does not cover; unquantized only).
    weight_format : {"bf16", "fp8_block", "mxfp4"}
        How the weights are stored (:mod:`dwdp_comm.kernels.quant`; ``"bf16"``: any float dtype).
        Quantized weights are always ``"nk"``.
    block_size : tuple of int or None
        ``(bn, bk)`` of ``"fp8_block"``.
    scales : dict
        ``{weight name: name of its scales}`` (empty when unquantized); the scale names are in ``names``.
    """

    layer: int
    path: str
    module: torch.nn.Module = field(repr=False)
    num_experts: int
    names: tuple
    weight_layout: str
    gate: Any
    method: str
    weight_format: str = "bf16"
    block_size: tuple | None = None
    scales: dict = field(default_factory=dict)


def _is_experts_module(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")) and \
        isinstance(getattr(m, "down_proj", None), torch.Tensor)


def _gate(m: torch.nn.Module) -> Any:
    """What experts_forward gets as ``gate`` for a gated experts module (see :class:`ExpertsSite`)."""
    apply_gate = getattr(type(m), "_apply_gate", None)
    if apply_gate is _hf_moe._default_apply_gate:
        return "swiglu"
    # HF's FP8Experts brings its own gate, plain SwiGLU unless the config adds clamps or soft caps
    if type(m).__name__ == "FP8Experts" and not any(getattr(m, a, None) for a in (
            "swiglu_alpha", "swiglu_limit", "limit", "limit_after_act", "gate_softcap", "up_softcap")):
        return "swiglu"
    return m._apply_gate  # family-specific gate (e.g. GPT-OSS's clamped interleaved one)


def find_experts(model: torch.nn.Module) -> list[ExpertsSite]:
    """Every experts module of ``model`` (those made by HF's ``@use_experts_implementation``), in forward order.

    Read from HF's own flags, never from module paths. Quantized experts (HF's ``FP8Experts``, or
    modules :func:`~dwdp_comm.integrations.hf_loading.load_model` gave quantized tensors) get their
    scale tensors in ``names`` and ``weight_format`` / ``block_size`` / ``scales`` set. Local, no
    side effect.

    Returns
    -------
    list of ExpertsSite
        Empty when the model has no experts modules.

    Raises
    ------
    InvalidArgumentError
        Experts quantized in a format the library does not run (see
        :mod:`dwdp_comm.integrations.hf_quant`).
    """
    if not isinstance(model, torch.nn.Module):
        raise bad_type("model", model, "a torch.nn.Module (a transformers model)")
    sites = []
    for path, m in model.named_modules():
        if not _is_experts_module(m):
            continue
        first = "gate_up_proj" if m.has_gate else "up_proj"
        names = [first, "down_proj"]
        fmt, block, scales = experts_quantization(path, m, tuple(names))
        if m.has_bias:
            names += [first + _BIAS_SUFFIX, "down_proj" + _BIAS_SUFFIX]
        tensors = [getattr(m, n, None) for n in names]
        covered = all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape[0] == m.num_experts
                      for t in tensors)
        quantized = fmt != "bf16"
        sites.append(ExpertsSite(layer=len(sites), path=path, module=m, num_experts=int(m.num_experts),
                                 names=tuple(names) + tuple(scales.values()),
                                 weight_layout="kn" if m.is_transposed and not quantized else "nk",
                                 gate=_gate(m) if m.has_gate else None,
                                 method="experts_forward" if covered or quantized else "hf_grouped_mm",
                                 weight_format=fmt, block_size=block, scales=scales))
    return sites


class _Prefetched:
    """The experts module seen through a prefetch handle: HF's experts code reads the handle's tensors."""

    def __init__(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_tensors", tensors)

    def __getattr__(self, name: str):
        t = self._tensors.get(name)
        return t if t is not None else getattr(self._module, name)


def _dwdp_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"dwdp"`` experts implementation: acquire the layer's weights, run its experts, release."""
    run = getattr(module, "dwdp_run", None)
    if run is None:
        raise DwdpError(f"{type(module).__name__} runs experts_implementation={IMPLEMENTATION!r} but was not "
                        "converted: call dwdp_comm.integrations.transformers.convert(model, group) first")
    return run(hidden_states, top_k_index, top_k_weights)


class _SiteRunner:
    def __init__(self, site: ExpertsSite, pipeline: DwdpPipeline):
        self.site, self.pipeline = site, pipeline
        self.act_fn = getattr(site.module, "act_fn", None)  # looked up once, not per forward
        self.info: dict = {}

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        s = self.site
        h = self.pipeline.acquire(s.layer, expert_ids=top_k_index)
        try:
            if s.method == "experts_forward":
                # One [E, ...] tensor per name (a composite view, or the gathered slot): the lean path,
                # with no pieces to re-join (weight_segments would be the same bytes, cut by owner).
                w = {n: h.weights(n) for n in s.names}
                first = s.names[0]
                quant = {}
                if s.weight_format != "bf16":  # scales travel in the same handle, served like their weights
                    quant = dict(gate_up_scale=w[s.scales[first]], down_scale=w[s.scales["down_proj"]],
                                 weight_format=s.weight_format)
                    if s.block_size is not None:
                        quant["block_size"] = s.block_size
                out = experts_forward(hidden_states, top_k_index, top_k_weights, w[first], w["down_proj"],
                                      gate_up_bias=w.get(first + _BIAS_SUFFIX),
                                      down_bias=w.get("down_proj" + _BIAS_SUFFIX),
                                      weight_layout=s.weight_layout, gate=s.gate, act_fn=self.act_fn, info=self.info,
                                      **quant)
            else:
                view = _Prefetched(s.module, {n: h.weights(n) for n in s.names})
                out = _hf_moe.grouped_mm_experts_forward(view, hidden_states, top_k_index, top_k_weights)
        finally:
            self.pipeline.release(h)
        return out


class DwdpModel:
    """A transformers model converted to DWDP (from :func:`convert`).

    Attributes
    ----------
    model : torch.nn.Module
        The HF model, running its experts through the ``"dwdp"`` implementation.
    store : WeightStore
    prefetcher : Prefetcher
    pipeline : DwdpPipeline
    sites : list of ExpertsSite
    memory : dict
        ``experts_bytes_before`` (the model's expert tensors before conversion),
        ``experts_bytes_after`` (local rows in the heap + the prefetch slots),
        ``local_bytes``, ``slot_bytes``.
    loading : dict or None
        What :func:`~dwdp_comm.integrations.hf_loading.load_model` read (None after :func:`convert`).
    """

    def __init__(self, model, store, prefetcher, pipeline, sites, memory, previous_impl, hook):
        self.model, self.store, self.prefetcher, self.pipeline, self.sites = model, store, prefetcher, pipeline, sites
        self.memory = memory
        self.loading: dict | None = None
        self._previous_impl, self._hook = previous_impl, hook
        self._closed = False

    def stats(self, reset: bool = False) -> dict[int, dict]:
        """Per store layer: ``path``, ``method``, ``acquires``, ``bytes_pulled``, ``exposed_wait_s`` (syncs on GPU)."""
        per = self.pipeline.layer_stats(reset=reset)
        for s in self.sites:
            per[s.layer].update(path=s.path, method=s.method)
        return per

    def close(self) -> None:
        """Collective: stop the pipeline, close prefetcher and store. The experts' weights are gone after it."""
        if self._closed:
            return
        self._closed = True
        self._hook.remove()
        self.pipeline.close()
        self.prefetcher.close()
        self.store.close()
        for s in self.sites:
            if hasattr(s.module, "dwdp_run"):
                del s.module.dwdp_run

    def __enter__(self) -> "DwdpModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _register_implementation() -> None:
    """Register ``"dwdp"`` in HF's experts interface and in every one that subclasses it with its own
    table (HF's ``FP8ExpertsInterface``: its ``FP8Experts`` dispatch through that one)."""
    todo = [_hf_moe.ExpertsInterface]
    while todo:
        cls = todo.pop()
        cls.register(IMPLEMENTATION, _dwdp_experts_forward)
        todo += cls.__subclasses__()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _free(module: torch.nn.Module, name: str) -> None:
    """Replace a module tensor by a meta tensor of the same shape (frees it; any stray read fails loudly)."""
    t = getattr(module, name)
    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(meta, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = meta
    else:
        setattr(module, name, meta)


def _check_local_rows(local_rows, sites: list[ExpertsSite], layout: ExpertLayout) -> None:
    if not isinstance(local_rows, dict):
        raise bad_type("local_rows", local_rows, "a dict {site path: {tensor name: rows}} or None")
    for s in sites:
        for n in s.names:
            full = getattr(s.module, n)
            rows = local_rows.get(s.path, {}).get(n)
            want = (layout.num_local_experts, *full.shape[1:])
            if not isinstance(rows, torch.Tensor):
                raise bad_arg("local_rows", f"no tensor for {s.path}.{n}", f"a {full.dtype} tensor of shape {want}")
            if tuple(rows.shape) != want or rows.dtype != full.dtype:
                raise bad_arg("local_rows", f"{s.path}.{n} of shape {tuple(rows.shape)}, {rows.dtype}",
                              f"shape {want}, {full.dtype} (this rank's rows)")


def sites_layout(sites: list[ExpertsSite], group: Group, layout: ExpertLayout | None, *, arg: str = "model",
                 source: str = "the model's") -> ExpertLayout:
    """The expert layout for ``sites``: ``layout`` checked against their expert count, or the default split.

    Parameters
    ----------
    sites : list of ExpertsSite
        From :func:`find_experts`; every site must have the same number of experts.
    group : Group
    layout : ExpertLayout or None
        None: ``ExpertLayout(num_experts, group.size, group.rank)``.
    arg, source : str
        How errors name the argument the sites came from, and whose expert count it is.

    Raises
    ------
    InvalidArgumentError
        Sites with different expert counts, or a layout for another count.
    InvalidTypeError
        ``layout`` is not an ExpertLayout.
    """
    counts = {s.num_experts for s in sites}
    if len(counts) != 1:
        raise bad_arg(arg, f"experts modules with {sorted(counts)} experts", "one expert count")
    num_experts = counts.pop()
    if layout is None:
        return ExpertLayout(num_experts, group.size, group.rank)
    if not isinstance(layout, ExpertLayout):
        raise bad_type("layout", layout, "a dwdp_comm.ExpertLayout or None")
    if layout.num_experts != num_experts:
        raise bad_arg("layout", f"num_experts={layout.num_experts}", f"num_experts={num_experts} ({source})")
    return layout


def convert(model: torch.nn.Module, group: Group, *, layout: ExpertLayout | None = None, depth: int = 2,
            schedule: str = "round_robin", chunk_nbytes: int = 8 << 20, free: str = "local",
            engine_options: dict | None = None, method: str | None = None,
            local_rows: dict[str, dict[str, torch.Tensor]] | None = None) -> DwdpModel:
    """Collective: run ``model``'s routed experts on DWDP over ``group``.

    Registers each experts module's local rows (HF names, rows ``layout.local_experts``), commits,
    frees the module tensors (``free="local"``: the model then holds only the store's local rows
    plus ``depth`` prefetch slots), registers the ``"dwdp"`` experts implementation and switches
    the model to it, and builds the prefetcher and pipeline (resynced at each model forward).

    Parameters
    ----------
    model : torch.nn.Module
        A transformers MoE model with the same weights on every rank (at least the local rows;
        rows this rank does not own are never read). With ``local_rows`` its expert tensors may
        be on the meta device (see :func:`dwdp_comm.integrations.hf_loading.load_model`).
    group : Group
    layout : ExpertLayout, optional
        Default: experts split evenly (contiguous, the first ``E % size`` ranks one more).
    depth, schedule, chunk_nbytes, engine_options
        As :class:`~dwdp_comm.Prefetcher`.
    free : {"local", "none"}
        ``"none"`` keeps the module tensors (debugging only; memory does not drop).
    method : {"experts_forward", "hf_grouped_mm"}, optional
        Force one experts path on every site (default: per site, see :class:`ExpertsSite`).
    local_rows : dict, optional
        ``{site path: {tensor name: rows}}``: this rank's rows ``[layout.num_local_experts, ...]``
        of every expert tensor (same dtype as the module's; on any device, host memory included:
        the store copies them into its heap), registered instead of slicing the module's tensors,
        which are then never read.

    Returns
    -------
    DwdpModel

    Raises
    ------
    CollectiveMismatchError
        On every rank, when any rank's arguments are bad (no experts modules, mismatched layout, ...).
    """
    if not isinstance(group, Group):
        raise bad_type("group", group, "a dwdp_comm.Group (from dwdp_comm.init)")
    group.check_open()
    error = None
    sites: list[ExpertsSite] = []
    try:
        if free not in ("local", "none"):
            raise bad_arg("free", repr(free), "'local' or 'none'")
        if method not in (None, "experts_forward", "hf_grouped_mm"):
            raise bad_arg("method", repr(method), "None, 'experts_forward' or 'hf_grouped_mm'")
        check_model_quantization(model)
        sites = find_experts(model)
        for s in sites:
            if method == "hf_grouped_mm" and s.weight_format != "bf16":
                raise bad_arg("method", repr(method), "None or 'experts_forward' for quantized experts "
                              f"({s.path} holds {s.weight_format} weights)")
            s.method = method or s.method
        if not sites:
            raise bad_arg("model", type(model).__name__,
                          "a transformers MoE model with experts modules (@use_experts_implementation)")
        layout = sites_layout(sites, group, layout, arg="model", source="the model's")
        if local_rows is None:
            for s in sites:
                for n in s.names:
                    if getattr(s.module, n).device.type == "meta":
                        raise bad_arg("model", f"{s.path}.{n} on the meta device",
                                      "materialised expert tensors, or their local rows as local_rows=")
        else:
            _check_local_rows(local_rows, sites, layout)
    except Exception as exc:  # report on every rank, not only this one
        error = f"{type(exc).__name__}: {exc}"
    group.comm.agree(error, "convert(model, group)")

    before = 0
    store = WeightStore(group, layout)
    local = layout.local_experts
    for s in sites:
        for n in s.names:
            t = getattr(s.module, n).detach()
            before += _nbytes(t)  # meta tensors know their size too
            rows = t[local.start:local.stop] if local_rows is None else local_rows[s.path][n]
            if s.weight_format == "fp8_block" and n in s.scales.values():
                rows = rows.float()  # ue8m0 (float8_e8m0fnu) block scales, widened exactly
            store.register(s.layer, n, rows)  # commit() copies it into the heap, from any device
    store.commit()
    if free == "local" and local_rows is None:
        for s in sites:
            for n in s.names:
                _free(s.module, n)
    prefetcher = Prefetcher(store, depth=depth, schedule=schedule, chunk_nbytes=chunk_nbytes,
                            engine_options=engine_options)
    pipeline = DwdpPipeline(prefetcher, [s.layer for s in sites])
    for s in sites:
        s.module.dwdp_run = _SiteRunner(s, pipeline)
    _register_implementation()
    previous = getattr(model.config, "_experts_implementation", None)
    model.set_experts_implementation(IMPLEMENTATION)
    hook = model.register_forward_pre_hook(lambda mod, args: pipeline.begin())
    local_bytes = sum(_nbytes(store.local(s.layer, n)) for s in sites for n in s.names)
    memory = {"experts_bytes_before": before, "local_bytes": local_bytes,
              "slot_bytes": depth * prefetcher.slot_nbytes,
              "experts_bytes_after": local_bytes + depth * prefetcher.slot_nbytes}
    return DwdpModel(model, store, prefetcher, pipeline, sites, memory, previous, hook)
