"""What the copy-plane model knows of a fabric: per-GPU port caps and per-copy costs, per GPU kind.

:class:`Fabric` is the description :func:`dwdp_comm.bench.model.simulate` runs on. Its numbers come
from one of three places, and every caller says which:

* a **preset** of ``fabrics.json`` (packaged next to this module), one per GPU kind, each with its
  basis: ``h200`` is *measured* (the 4 x H200 table of ``DEVICE_NOTES.md``, per-copy costs on
  2 x H200); ``h100``, ``b200`` and ``nvl72`` (GB200 NVL72) are *published* link rates with H200's
  measured efficiency assumed, not measured. Each lists its sources and numbers;
* a **fabric file** a user measured on their own GPUs with ``dwdp-bench calibrate --write FILE``
  (:func:`save_fabric`, :func:`load_fabric_file`), schema :data:`FILE_SCHEMA`;
* ``--fabric auto`` (:func:`choose_fabric`): the preset of the GPU this process sees
  (``torch.cuda.get_device_name()``), or, with none or an unknown one, a stated borrowing.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from importlib import resources
from typing import Any

import numpy as np

from ..errors import bad_arg

__all__ = ["Fabric", "FabricChoice", "PRESETS", "FILE_SCHEMA", "preset", "preset_info", "h200", "h100", "b200",
           "nvl72", "detect_preset", "local_gpu_name", "choose_fabric", "save_fabric", "load_fabric_file"]

FILE_SCHEMA = "dwdp-bench/fabric/v1"
_PRESETS_FILE = "fabrics.json"
# The fields of a fabric file's and a preset's "values" (every Fabric field but group_size, name, notes).
_VALUE_FIELDS = ("egress_Bps", "ingress_Bps", "duplex_Bps", "local_Bps", "copy_overhead_s", "batch_call_overhead_s",
                 "batch_copy_overhead_s", "graph_copy_overhead_s", "flag_latency_s", "harness_copy_overhead_s",
                 "max_streams")
_BASIS_TEXT = {"measured": "measured", "published": "published link rates, not measured"}


@dataclass(frozen=True)
class Fabric:
    """Caps and overheads of one group of GPUs (bytes/s and seconds).

    Attributes
    ----------
    group_size : int
    egress_Bps, ingress_Bps : float
        Per-GPU caps of what a copy engine moves out of / into one GPU over the fabric.
    duplex_Bps : float or None
        Cap on egress + ingress of one GPU (None: no such cap).
    local_Bps : float
        Device-local copy rate (copies with ``src == dst``).
    copy_overhead_s : float
        Fixed cost of one ``cudaMemcpyAsync`` on a stream (no bytes move meanwhile), GPU side.
    batch_call_overhead_s, batch_copy_overhead_s : float
        ``cudaMemcpyBatchAsync``: per call, and per copy inside a call.
    graph_copy_overhead_s : float
        Per memcpy node of a captured graph.
    flag_latency_s : float
        From the last copy of a slot to the release of a stream waiting on its flag.
    harness_copy_overhead_s : float or None
        Per copy in the ``issue_fifo`` executor (one host thread issuing every copy: the host's
        cost per call included). None: ``copy_overhead_s``.
    max_streams : int
        Hardware queues a GPU gives one process (``CUDA_DEVICE_MAX_CONNECTIONS``, default 8):
        lanes beyond it share a queue (lane ``l`` runs on queue ``l mod max_streams``, in plan order).
    name, notes : str
    """

    group_size: int
    egress_Bps: float
    ingress_Bps: float
    duplex_Bps: float | None
    local_Bps: float
    copy_overhead_s: float
    batch_call_overhead_s: float
    batch_copy_overhead_s: float
    graph_copy_overhead_s: float
    flag_latency_s: float
    harness_copy_overhead_s: float | None = None
    max_streams: int = 8
    name: str = ""
    notes: str = ""

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)) \
                or self.group_size < 1:
            raise bad_arg("group_size", self.group_size, "an int >= 1")
        for k in ("egress_Bps", "ingress_Bps", "local_Bps"):
            if not getattr(self, k) > 0:
                raise bad_arg(k, getattr(self, k), "a rate in bytes/s > 0")
        if isinstance(self.max_streams, bool) or not isinstance(self.max_streams, (int, np.integer)) \
                or self.max_streams < 1:
            raise bad_arg("max_streams", self.max_streams, "an int >= 1")
        if self.duplex_Bps is not None and not self.duplex_Bps > 0:
            raise bad_arg("duplex_Bps", self.duplex_Bps, "None or a rate in bytes/s > 0")
        for k in ("copy_overhead_s", "batch_call_overhead_s", "batch_copy_overhead_s",
                  "graph_copy_overhead_s", "flag_latency_s"):
            if not getattr(self, k) >= 0:
                raise bad_arg(k, getattr(self, k), "a time in seconds >= 0")
        if self.harness_copy_overhead_s is not None and not self.harness_copy_overhead_s >= 0:
            raise bad_arg("harness_copy_overhead_s", self.harness_copy_overhead_s, "None or a time in seconds >= 0")

    def with_(self, **changes: Any) -> "Fabric":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def pair_Bps(self) -> float:
        """The bandwidth of one large copy between two GPUs (overhead excluded)."""
        return min(self.egress_Bps, self.ingress_Bps)


@functools.lru_cache(maxsize=1)
def _presets() -> dict:
    """``fabrics.json``'s presets, read once (callers must not change what they get)."""
    return json.loads(resources.files(__package__).joinpath(_PRESETS_FILE).read_text())["presets"]


PRESETS = tuple(_presets())


def preset_info(name: str) -> dict:
    """The entry of preset ``name`` in ``fabrics.json``: ``gpu``, ``system``, ``basis``, ``domain_gpus``,
    ``notes``, ``values``, ``sources``, ``device_name_regex``."""
    table = _presets()
    if name not in table:
        raise bad_arg("fabric", name, f"a preset in {list(table)}")
    return table[name]


def _from_values(values: dict, group_size: int, name: str, notes: str) -> Fabric:
    unknown = set(values) - set(_VALUE_FIELDS)
    if unknown:
        raise bad_arg("fabric values", sorted(unknown), f"fields of {list(_VALUE_FIELDS)}")
    return Fabric(group_size=group_size, name=name, notes=notes, **values)


def preset(name: str, group_size: int) -> Fabric:
    """The preset ``name`` (:data:`PRESETS`) for ``group_size`` GPUs, named ``f"{name}x{group_size}"``.

    Groups above a preset's NVLink domain (``domain_gpus``) get the same per-GPU caps: the switch is
    assumed non blocking (:func:`choose_fabric` says so when it picks one).
    """
    info = preset_info(name)
    return _from_values(info["values"], group_size, f"{name}x{group_size}", info["notes"])


def h200(group_size: int = 4) -> Fabric:
    """H200 SXM GPUs on NVSwitch (NVLink4, 18 links): the calibrated caps, ``group_size`` GPUs.

    Group sizes above 4 (an 8-GPU HGX board) assume the same per-GPU caps: every GPU has its own
    18 links into the switches, and the switches are non blocking.
    """
    return preset("h200", group_size)


def h100(group_size: int = 4) -> Fabric:
    """H100 SXM GPUs on NVSwitch: NVLink4, 18 x 26.56 GB/s per direction (the links of H200), H200's
    measured copy-engine fraction and per-copy costs assumed; local copies scaled by HBM (3.35 / 4.8)."""
    return preset("h100", group_size)


def b200(group_size: int = 8) -> Fabric:
    """B200 GPUs of an HGX board: NVLink5, 1.8 TB/s per GPU bidirectional, H200's efficiency assumed."""
    return preset("b200", group_size)


def nvl72(group_size: int = 72) -> Fabric:
    """An NVL72-like domain: 1.8 TB/s per GPU bidirectional (NVLink5), ``group_size`` GPUs.

    Assumptions: 900 GB/s per direction nominal; a copy engine reaches the same fraction of nominal
    as on H200 (394 of 478 GB/s: 82.4 %), so 742 GB/s per direction; the same duplex loss as on
    H200 (386 / 394); per-copy overheads as on H200 (a CUDA driver property, not a link property);
    local HBM3e copies at 2 x 2.06 TB/s (8 TB/s HBM against 4.8).
    """
    return preset("nvl72", group_size)


# ---- which GPU ------------------------------------------------------------------------------------
def local_gpu_name() -> str | None:
    """``torch.cuda.get_device_name()`` of the current device, or None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def detect_preset(device_name: str) -> str | None:
    """The preset whose ``device_name_regex`` matches ``device_name`` (e.g. ``"NVIDIA H100 80GB HBM3"``
    -> ``"h100"``; ``"NVIDIA H100 PCIe"`` -> None: NVLink bridges, not NVSwitch), or None."""
    for name, info in _presets().items():
        if re.search(info["device_name_regex"], device_name):
            return name
    return None


@dataclass(frozen=True)
class FabricChoice:
    """A fabric and why it was chosen.

    Attributes
    ----------
    fabric : Fabric
    basis : {"measured", "published", "file"}
        Where its numbers come from.
    borrowed : bool
        True when the numbers are not this GPU kind's (no GPU seen, an unknown GPU, a group beyond
        its NVLink domain, or a named preset of another kind).
    text : str
        One line for a human: the fabric, its basis, and why (``advise`` prints it).
    device_name : str or None
        The GPU this process sees.
    source : str
        The preset name or the file path.
    """

    fabric: Fabric
    basis: str
    borrowed: bool
    text: str
    device_name: str | None
    source: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fabric"] = self.fabric.as_dict()
        return d


def choose_fabric(spec: str, group_size: int, *, device_name: str | None = None, detect: bool = True) -> FabricChoice:
    """The fabric for ``spec`` and ``group_size``, with the reason in words.

    Parameters
    ----------
    spec : str
        ``"auto"``: the preset of this GPU kind (:func:`local_gpu_name`, :func:`detect_preset`);
        without a GPU, ``h200`` up to 8 GPUs and ``nvl72`` above (the measured fabric, and the one
        domain that large); with an unknown GPU, or a group beyond its kind's NVLink domain, the
        same default, *borrowed* and said so. A preset name (:data:`PRESETS`). Or the path of a
        fabric file (:func:`save_fabric`).
    group_size : int
    device_name : str, optional
        The GPU to choose for (e.g. ``"NVIDIA H100 80GB HBM3"``); default: :func:`local_gpu_name`
        when ``detect``, else no GPU.
    detect : bool
        Ask torch which GPU this process sees when ``device_name`` is None.

    Raises
    ------
    InvalidArgumentError
        ``spec`` is none of these, or the file is not a fabric file.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise bad_arg("group_size", group_size, "an int >= 1")
    if not isinstance(spec, str) or not spec:
        raise bad_arg("fabric", spec, f"'auto', a preset in {list(PRESETS)} or a fabric file path")
    dev = device_name if device_name is not None or not detect else local_gpu_name()
    G = group_size
    default = "h200" if G <= 8 else "nvl72"
    if spec == "auto":
        kind = detect_preset(dev) if dev else None
        if dev is None:
            return _preset_choice(default, G, dev, False, "--fabric auto: no GPU visible here, so the default (h200 "
                                                          "up to 8 GPUs, nvl72 above)")
        if kind is None:
            return _preset_choice(default, G, dev, True,
                                  f"--fabric auto: borrowed from {default}x{G} because no fabric is known for "
                                  f"{dev!r} (measure yours: dwdp-bench calibrate --write FILE, then --fabric FILE)")
        domain = preset_info(kind)["domain_gpus"]
        if G > domain:
            other = "nvl72" if G <= preset_info("nvl72")["domain_gpus"] else kind
            return _preset_choice(other, G, dev, other != kind,
                                  f"--fabric auto: this GPU is {dev!r}, but a group of {G} exceeds its NVLink "
                                  f"domain of {domain} GPUs and the model has no inter-node fabric: "
                                  + (f"borrowed from {other}x{G}" if other != kind else
                                     "its per-GPU caps kept, the switch assumed non blocking"))
        return _preset_choice(kind, G, dev, False, f"--fabric auto: this GPU is {dev!r}")
    if spec in PRESETS:
        kind = detect_preset(dev) if dev else None
        if dev is None or kind == spec:
            why = f"--fabric {spec}" + (f" (this GPU is {dev!r})" if dev else "")
            borrowed = False
        else:
            why = f"--fabric {spec}: this GPU is {dev!r}, so its numbers are borrowed"
            borrowed = True
        domain = preset_info(spec)["domain_gpus"]
        if G > domain:
            why += f"; a group of {G} exceeds its NVLink domain of {domain} GPUs (the switch assumed non blocking)"
        return _preset_choice(spec, G, dev, borrowed, why)
    if os.path.isfile(spec):
        fab, doc = load_fabric_file(spec, G)
        same = dev is None or dev == doc["gpu"]
        text = (f"{fab.name}: measured on {doc['gpu']!r} ({doc['gpus_measured']} GPUs) by dwdp-bench calibrate, "
                f"{doc.get('date', 'date unknown')}, file {os.path.basename(spec)}; not measured there: "
                + (", ".join(k for k, v in doc["provenance"].items() if not v.startswith("measured")) or "nothing")
                + f" (from {doc['base']})" + ("" if same else f"; this GPU is {dev!r}, so its numbers are borrowed"))
        return FabricChoice(fab, "file", not same, text, dev, spec)
    raise bad_arg("fabric", spec, f"'auto', a preset in {list(PRESETS)} or the path of a fabric file written by "
                                  "dwdp-bench calibrate --write FILE")


def _preset_choice(name: str, G: int, dev: str | None, borrowed: bool, why: str) -> FabricChoice:
    info = preset_info(name)
    fab = preset(name, G)
    kind = detect_preset(dev) if dev else None
    basis = info["basis"]
    btext = ("measured on this GPU kind" if basis == "measured" and kind == name else
             f"measured on {info['gpu']}" if basis == "measured" else _BASIS_TEXT[basis])
    text = f"{fab.name}: {btext} ({info['notes']}); {why}"
    return FabricChoice(fab, basis, borrowed, text, dev, name)


# ---- fabric files ---------------------------------------------------------------------------------
def save_fabric(path: str, fabric: Fabric, *, gpu: str, gpus_measured: int, base: str, provenance: dict,
                measurements: dict | None = None, record: dict | None = None) -> dict:
    """Write ``fabric`` as a fabric file (JSON, :data:`FILE_SCHEMA`) that ``--fabric FILE`` reads.

    Parameters
    ----------
    path : str
    fabric : Fabric
        Its ``group_size`` is not stored (the file describes per-GPU caps; a reader gives its own).
    gpu : str
        The device name it was measured on.
    gpus_measured : int
        How many GPUs the measurement used (1: no peer link was measured).
    base : str
        The preset the fields that were not measured come from.
    provenance : dict
        Field name -> how it was obtained (``"measured: ..."`` or ``"from <preset>: ..."``), one per
        field of ``values``.
    measurements : dict, optional
        The raw measured numbers.
    record : dict, optional
        The run record (``date``, ``commit``, ``machine``, ``command``).

    Returns
    -------
    dict
        The document written.
    """
    values = {k: getattr(fabric, k) for k in _VALUE_FIELDS}
    missing = set(values) - set(provenance)
    if missing:
        raise bad_arg("provenance", sorted(provenance), f"an entry for each of {sorted(values)}")
    name = re.sub(r"x\d+$", "", fabric.name) or "measured"
    doc = {"schema": FILE_SCHEMA, "name": name, "gpu": gpu, "gpus_measured": int(gpus_measured), "base": base,
           "domain_gpus": preset_info(base)["domain_gpus"], "notes": fabric.notes, "values": values,
           "provenance": {k: provenance[k] for k in _VALUE_FIELDS}, "measurements": measurements or {},
           **(record or {})}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return doc


def load_fabric_file(path: str, group_size: int) -> tuple[Fabric, dict]:
    """A fabric file (:func:`save_fabric`) as a :class:`Fabric` of ``group_size`` GPUs, and the document.

    Raises
    ------
    InvalidArgumentError
        Not readable JSON, not :data:`FILE_SCHEMA`, or a field missing or out of range.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise bad_arg("fabric", path, "a readable fabric file (JSON)", str(exc)) from None
    if not isinstance(doc, dict) or doc.get("schema") != FILE_SCHEMA:
        raise bad_arg("fabric", path, f"a fabric file with schema {FILE_SCHEMA!r} (dwdp-bench calibrate --write)",
                      f"schema {doc.get('schema') if isinstance(doc, dict) else None!r}")
    missing = [k for k in ("name", "gpu", "gpus_measured", "base", "values", "provenance") if k not in doc]
    if missing or set(doc["values"]) != set(_VALUE_FIELDS):
        raise bad_arg("fabric", path, "a fabric file with name, gpu, gpus_measured, base, provenance and values of "
                                      f"{list(_VALUE_FIELDS)}",
                      f"missing or extra: {missing or sorted(set(_VALUE_FIELDS) ^ set(doc['values']))}")
    fab = _from_values(doc["values"], group_size, f"{doc['name']}x{group_size}", doc.get("notes", ""))
    return fab, doc
