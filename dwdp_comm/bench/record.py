"""The run record of a result file: which code, on which machine and GPUs, with which versions, when.

One home for what every benchmark writes next to its numbers (the perf scripts and the
``dwdp-bench`` modules): each picks the pieces its JSON has always had, so committed results stay
comparable. Host-only helpers; none touches a GPU except :func:`gpu_properties` and
:func:`gpu_names` (torch's device queries, no kernel).
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from datetime import datetime, timezone
from typing import Iterable

__all__ = ["ENV_COMMIT", "REPO_ROOT", "commit", "is_dirty", "utc_date", "host", "versions", "gpu_properties",
           "gpu_names", "driver_version", "nvidia_smi", "machine_lines", "env_info", "result_path", "write_json"]

#: Set it to the commit measured where the tree has no ``.git`` (the device machine gets a copy).
ENV_COMMIT = "DWDP_GIT_COMMIT"
#: The checkout holding this ``dwdp_comm`` (git runs there).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _git(*args: str) -> subprocess.CompletedProcess | None:
    """``git args`` in :data:`REPO_ROOT`, or None where that directory is not itself a checkout.

    Git searches parent directories for a repository: a copy of this tree without ``.git`` inside
    another checkout would report that checkout's commit. So git may not look above
    :data:`REPO_ROOT` (``GIT_CEILING_DIRECTORIES``, no inherited ``GIT_DIR`` / ``GIT_WORK_TREE``),
    and its top level must be :data:`REPO_ROOT` itself.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE")}
    env["GIT_CEILING_DIRECTORIES"] = os.path.dirname(REPO_ROOT)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, env=env)
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(REPO_ROOT):
            return None
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.SubprocessError):
        return None


def commit(*, short: bool = False) -> str | None:
    """The commit measured: ``$DWDP_GIT_COMMIT`` when set, else git's ``HEAD`` of the checkout holding
    this package (abbreviated with ``short``); None where neither is known (no git, or a tree without
    ``.git``, even inside another repository)."""
    if os.environ.get(ENV_COMMIT):
        return os.environ[ENV_COMMIT]
    r = _git("rev-parse", *(["--short"] if short else []), "HEAD")
    return (r.stdout.strip() or None) if r is not None and r.returncode == 0 else None


def is_dirty(paths: Iterable[str] = ("dwdp_comm", "perf")) -> bool | None:
    """Whether ``paths`` (relative to the repository) differ from ``HEAD``, untracked files included.

    False when ``$DWDP_GIT_COMMIT`` names the commit (a copied tree: nothing to compare), None
    where git cannot tell.
    """
    if os.environ.get(ENV_COMMIT):
        return False
    r = _git("status", "--porcelain", "--", *paths)
    return bool(r.stdout.strip()) if r is not None and r.returncode == 0 else None


def result_path(given: str | None, name: str) -> str | None:
    """Where a script writes its result: ``given`` (its ``--json`` / ``--out``), else ``$OUT/name``
    (the device machine's output folder) when ``$OUT`` is set, else None (nothing written)."""
    if given:
        return given
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None


def write_json(path: str | None, obj) -> str | None:
    """Write ``obj`` as JSON (indent 1; what JSON cannot hold as its ``str``) to ``path``, creating its
    folder; nothing when ``path`` is None. Returns ``path``."""
    import json
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)
    return path


def utc_date(*, timespec: str = "seconds") -> str:
    """Now in UTC, ISO 8601 (``2026-12-03T13:08:22+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec)


def host() -> str:
    """This machine's host name."""
    return socket.gethostname()


def versions(*modules: str) -> dict:
    """``python``, ``torch``, ``torch_cuda``, and the ``__version__`` of each module named (imported
    here; ``"unavailable (ImportError)"`` and the like when it cannot be, ``"?"`` without a version)."""
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for mod in modules:
        try:
            m = __import__(mod, fromlist=["_"])
            v[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # a broken optional install must not stop the benchmark
            v[mod] = f"unavailable ({type(exc).__name__})"
    return v


def gpu_properties(device) -> dict:
    """``gpu`` (name), ``sm``, ``gpu_mem_gib``, ``num_sms`` of a CUDA ``device``; ``{"gpu": None}`` otherwise."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return {"gpu": None}
    p = torch.cuda.get_device_properties(device)
    return {"gpu": p.name, "sm": f"{p.major}.{p.minor}", "gpu_mem_gib": round(p.total_memory / 2**30, 1),
            "num_sms": p.multi_processor_count}


def gpu_names(count: int | None = None) -> list[str]:
    """Names of the first ``count`` CUDA devices (default: all visible; none without CUDA)."""
    import torch
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if count is None else count)]


def nvidia_smi(*args: str) -> str | None:
    """``nvidia-smi`` 's output for ``args`` (stripped), or None without it or on a failure."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def driver_version() -> str | None:
    """The NVIDIA driver version of GPU 0, or None without ``nvidia-smi``."""
    out = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return out.split("\n")[0].strip() if out else None


def machine_lines() -> list[str]:
    """Machine, GPUs and topology, one preamble line each (without the leading ``#``)."""
    import torch
    from ..version import __version__
    lines = [f"machine: {host()} ({platform.platform()}, {os.cpu_count()} CPUs), "
             f"python {platform.python_version()}, torch {torch.__version__}, dwdp_comm {__version__}"]
    gpus = nvidia_smi("--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader")
    if gpus:
        for g in gpus.splitlines():
            lines.append(f"GPU {g.strip()}")
        topo = nvidia_smi("topo", "-m")
        if topo:
            lines.append("topology (nvidia-smi topo -m):")
            lines.extend("  " + t for t in topo.splitlines() if t.strip())
    else:
        lines.append("GPUs: none found (no nvidia-smi)")
    return lines


def env_info(device, modules: Iterable[str] = ("numba",)) -> dict:
    """The run record of the kernel benchmarks (``perf/bench_grouped_gemm.py`` and the scripts
    that share its JSON form).

    Keys: ``host``, ``python``, ``torch``, ``torch_cuda``, ``date``, ``git`` (``{"commit",
    "dirty"}``: :func:`commit` (``""`` when unknown), :func:`is_dirty` of ``dwdp_comm`` and
    ``perf``), ``device``,
    :func:`gpu_properties`' keys, and the ``__version__`` of each of ``modules`` (None where it
    cannot be imported).
    """
    import torch
    device = torch.device(device)
    v = versions()
    info = {"host": host(), "python": v["python"], "torch": v["torch"], "torch_cuda": v["torch_cuda"],
            "date": utc_date(), "git": {"commit": commit() or "", "dirty": is_dirty(("dwdp_comm", "perf"))},
            "device": str(device)}
    info.update(gpu_properties(device))
    for mod in modules:
        try:
            info[mod] = __import__(mod, fromlist=["_"]).__version__
        except ImportError:
            info[mod] = None
    return info
