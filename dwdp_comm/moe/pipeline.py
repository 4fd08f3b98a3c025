"""Layer-ahead prefetch pipeline over a :class:`~dwdp_comm.Prefetcher`, model-agnostic.

Any model whose MoE layers run in a fixed order (the DeepSeek layers in :mod:`.layers`, the
Hugging Face integration in :mod:`dwdp_comm.integrations.transformers`) drives it with
``begin()`` at the start of a forward, then ``acquire(layer)`` / ``release(handle)`` per layer.

CUDA graphs: a forward whose ``begin()`` runs while the current stream captures is recorded whole
(its first prefetches, every wait, release and next prefetch), and nothing beyond it is prefetched,
so the graph is self-contained::

    pipe.prepare_capture()                 # host-blocking: idle pipeline, eager copies done
    with torch.cuda.graph(g):
        y = model(static_x)                # begin() + acquire/release per layer, all captured
    for x in inputs:
        static_x.copy_(x); g.replay()      # every replay prefetches every layer again
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..errors import DwdpError, GraphCaptureError, bad_arg
from ..prefetch import Prefetcher, PrefetchHandle
from ..routing_histogram import RoutingCounter
from ..telemetry import Telemetry, recording

__all__ = ["DwdpPipeline"]


class DwdpPipeline:
    """Keeps ``depth`` MoE layers in flight, cycling over ``layers`` in forward order.

    ``acquire(layer)`` makes the current stream wait for the layer's prefetch and starts the
    prefetch of the layer ``depth`` places later (it lands in this layer's slot, so the copy
    engine starts it when this layer releases); ``release(layer)`` frees the slot after the
    layer's kernels were enqueued. Exposed prefetch time (how long the compute stream stalled on a
    prefetch) is measured with events around each stream wait (host time on ``sim``).

    A forward that raised between layers leaves the pipeline mid-sequence; :meth:`begin` (call it
    at the start of every forward) notices and :meth:`reset` s it, so the next forward is correct.

    **Captured forwards.** When :meth:`begin` runs during a CUDA graph capture of the current
    stream, the forward is captured self-contained: ``begin`` prefetches the first ``depth``
    layers inside the capture, ``acquire`` never prefetches past the last layer, and after the
    last layer's ``release`` the pipeline is idle again (the next ``begin``, eager or captured,
    starts afresh). The pipeline must be idle when such a capture begins: call
    :meth:`prepare_capture` first. Stats (:meth:`layer_stats`, :meth:`exposed_seconds`) cover
    eager forwards only: a captured forward is neither timed nor counted (its replays run
    without the host).

    **Telemetry** (off by default): :meth:`enable_telemetry` (or ``with pipe.recording():``) records
    every prefetch's bytes, copy time and rate per source rank and the exposed wait of each layer
    (:mod:`dwdp_comm.telemetry`), and with ``routing=True`` the experts each layer's tokens chose
    (``acquire(layer, expert_ids=...)``, counted on the device); :meth:`telemetry` reads them.

    Parameters
    ----------
    prefetcher : Prefetcher
    layers : sequence of int
        The MoE layers in forward order; the sequence repeats (next iteration).

    Notes
    -----
    Local (never collective); not thread-safe.
    """

    def __init__(self, prefetcher: Prefetcher, layers: Sequence[int]):
        if not isinstance(prefetcher, Prefetcher):
            raise bad_arg("prefetcher", type(prefetcher).__name__, "a dwdp_comm.Prefetcher")
        if not layers:
            raise bad_arg("layers", layers, "a non-empty sequence of committed layers")
        self.pf, self.layers = prefetcher, list(layers)
        unknown = [l for l in self.layers if l not in prefetcher.store.layers]
        if unknown:
            raise bad_arg("layers", unknown, f"committed layers of the store {list(prefetcher.store.layers)}")
        self._handles: dict[int, list[PrefetchHandle]] = {}
        self._held: list[PrefetchHandle] = []  # acquired, not yet released
        self._next = 0  # index (into the repeating sequence) of the next layer to prefetch
        self._acquired = 0  # layers acquired since the last (re)start
        self._started = False
        self._capture: int | None = None  # id of the capture recording the current forward
        self._gpu = prefetcher.store.group.device.type == "cuda"
        self._waits: list = []  # (layer, before, after) events on GPU
        self._host_wait_s = 0.0
        self._layer_wait_s: dict[int, float] = {}
        self._layer_bytes: dict[int, int] = {}
        self._layer_count: dict[int, int] = {}
        self._routing: RoutingCounter | None = None  # made by the first enable_telemetry(routing=True)
        self._routing_on = False

    @property
    def capturing(self) -> bool:
        """True while the current forward is being recorded into a CUDA graph."""
        return self._capture is not None

    def start(self) -> None:
        """Prefetch the first ``depth`` layers (during a capture: at most one forward's layers)."""
        count = self.pf.depth if self._capture is None else min(self.pf.depth, len(self.layers))
        for _ in range(count):
            self._issue()
        self._started = True

    def begin(self) -> None:
        """Call at the start of a forward: starts the pipeline, or resyncs it if the last forward stopped mid-way.

        During a CUDA graph capture of the current stream it starts a captured forward (see the
        class docstring).

        Raises
        ------
        GraphCaptureError
            A capture is running and the pipeline is not idle (prefetches issued before the
            capture are in flight or held): call :meth:`prepare_capture` before capturing.
        """
        cap = self.pf.capture_id()
        if self._capture is not None and cap != self._capture:
            self._abandon_capture()  # the capture that recorded the last forward ended half-way
        if cap is not None:
            if self._capture == cap:
                raise GraphCaptureError("DwdpPipeline.begin() twice in one captured forward: capture one forward "
                                        f"(every layer of {self.layers} once) per graph")
            if self._started:
                raise GraphCaptureError("DwdpPipeline.begin() under CUDA graph capture, but the pipeline holds "
                                        "prefetches issued before the capture; call pipe.prepare_capture() "
                                        "(host-blocking) before capturing")
            self._capture = cap
            self._next = self._acquired = 0
            self.start()
            return
        if not self._started:
            self.start()
        elif self._held or self._acquired % len(self.layers) != 0:
            self.reset()

    def reset(self) -> None:
        """Drop every prefetch in flight or held and start again from the first layer (local, never blocks)."""
        self._drop_handles()
        self._next = self._acquired = 0
        self.start()

    def prepare_capture(self) -> None:
        """Leave the pipeline idle and its prefetcher ready for a CUDA graph capture. Host-blocking.

        Releases every handle in flight or held, waits for their copies, and builds the slots'
        weight views of this pipeline's layers (:meth:`Prefetcher.prepare_capture`). Call it before
        capturing a forward, and before replaying a graph after eager forwards of this pipeline.
        """
        if self.pf.capture_id() is not None:
            raise GraphCaptureError("DwdpPipeline.prepare_capture() blocks the host: call it before the capture")
        self._drop_handles()
        self._started = False
        self._capture = None
        self._next = self._acquired = 0
        self.pf.prepare_capture(self.layers)

    def _abandon_capture(self) -> None:
        """Forget a captured forward that did not finish (its capture raised): release its handles."""
        self._drop_handles()
        self._started = False
        self._capture = None
        self._next = self._acquired = 0

    def _issue(self) -> None:
        layer = self.layers[self._next % len(self.layers)]
        self._handles.setdefault(layer, []).append(self.pf.prefetch(layer))
        self._next += 1

    def acquire(self, layer: int, *, expert_ids: torch.Tensor | None = None) -> PrefetchHandle:
        """Wait (on the current stream) for ``layer``'s prefetch; start the next one; return the handle.

        Parameters
        ----------
        layer : int
        expert_ids : torch.Tensor, optional
            The layer's routing, ``[num_tokens, top_k]`` integer expert ids on the compute device:
            counted into the routing histogram while telemetry records routing (no host sync),
            ignored otherwise and in captured forwards.

        Raises
        ------
        DwdpError
            ``layer`` has no prefetch in flight (not started, or layers run out of order).
        """
        queue = self._handles.get(layer)
        if not queue:
            raise DwdpError(f"layer {layer} was not prefetched: call begin() first and run layers in the order "
                            f"{self.layers}")
        h = queue.pop(0)
        if expert_ids is not None and self._routing_on and self.pf.telemetry_enabled and self._capture is None:
            self._routing.add(layer, expert_ids)
        if self._capture is not None:
            h.wait()  # recorded once, replayed without the host: nothing to time or count
        elif self._gpu and h.is_done:
            h.wait()  # copies complete (or none, a slot-free handle): no stall to time, no timing events
        elif self._gpu:
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            h.wait()
            after.record()
            self._waits.append((layer, before, after))
        else:
            t0 = time.perf_counter()
            h.wait()
            dt = time.perf_counter() - t0
            self._host_wait_s += dt
            self._layer_wait_s[layer] = self._layer_wait_s.get(layer, 0.0) + dt
        if self._capture is None:
            self._layer_bytes[layer] = self._layer_bytes.get(layer, 0) + self.pf.store.remote_nbytes(layer)
            self._layer_count[layer] = self._layer_count.get(layer, 0) + 1
        self._held.append(h)
        self._acquired += 1
        if self._capture is None or self._next < len(self.layers):
            self._issue()
        return h

    def release(self, handle: PrefetchHandle) -> None:
        """Free the handle's slot once the current stream's work enqueued so far is done."""
        if handle in self._held:
            self._held.remove(handle)
        handle.release()
        if self._capture is not None and self._acquired == len(self.layers) and not self._held:
            # The captured forward is complete and self-contained: nothing is in flight beyond it.
            self._handles.clear()
            self._started = False
            self._capture = None
            self._next = self._acquired = 0

    def _check_not_capturing(self, what: str) -> None:
        if self._gpu and self.pf.capture_id() is not None:
            raise GraphCaptureError(f"DwdpPipeline.{what}() synchronizes the device: call it outside the CUDA graph "
                                    "capture")

    def exposed_seconds(self, reset: bool = True) -> float:
        """Total time compute stalled on prefetches of eager forwards since the last reset (synchronises on GPU)."""
        self._check_not_capturing("exposed_seconds")
        if self._gpu:
            torch.cuda.synchronize()
            total = sum(b.elapsed_time(a) for _, b, a in self._waits) / 1e3
        else:
            total = self._host_wait_s
        if reset:
            self._waits, self._host_wait_s, self._layer_wait_s = [], 0.0, {}
        return total

    def layer_stats(self, reset: bool = False) -> dict[int, dict]:
        """Per layer since the last stats reset: ``{"acquires", "bytes_pulled", "exposed_wait_s"}``.

        ``bytes_pulled`` counts the remote bytes of each acquired prefetch. Eager forwards only
        (captured ones are not counted). Synchronises on GPU.
        """
        self._check_not_capturing("layer_stats")
        waits = dict(self._layer_wait_s)
        if self._gpu:
            torch.cuda.synchronize()
            for layer, b, a in self._waits:
                waits[layer] = waits.get(layer, 0.0) + b.elapsed_time(a) / 1e3
        out = {l: {"acquires": self._layer_count.get(l, 0), "bytes_pulled": self._layer_bytes.get(l, 0),
                   "exposed_wait_s": waits.get(l, 0.0)} for l in self.layers}
        if reset:
            self._waits, self._host_wait_s, self._layer_wait_s = [], 0.0, {}
            self._layer_bytes, self._layer_count = {}, {}
        return out

    # ---- telemetry --------------------------------------------------------------------------------
    def enable_telemetry(self, *, routing: bool = False, max_records: int = 100_000) -> None:
        """Record telemetry (the prefetcher's :meth:`Prefetcher.enable_telemetry`) and, with
        ``routing``, the expert choices passed to :meth:`acquire`. Local, non-blocking."""
        self.pf.enable_telemetry(max_records=max_records)
        if routing and self._routing is None:
            self._routing = RoutingCounter(self.pf.store.layout.num_experts)
        self._routing_on = bool(routing)

    def disable_telemetry(self) -> None:
        """Stop recording (records and counts so far are kept until read with ``reset=True``)."""
        self.pf.disable_telemetry()

    @property
    def telemetry_enabled(self) -> bool:
        """True while prefetches are recorded."""
        return self.pf.telemetry_enabled

    def recording(self, *, routing: bool = False, max_records: int = 100_000):
        """Context manager: telemetry on inside, back off after (records are kept)."""
        return recording(self, routing=routing, max_records=max_records)

    def telemetry(self, *, reset: bool = False) -> Telemetry:
        """What was recorded (:class:`~dwdp_comm.telemetry.Telemetry`): the prefetcher's records and
        this rank's routing histogram (None unless ``routing=True``). Host-blocking (reads the
        device counts and time points back); ``reset`` forgets both. Local."""
        self._check_not_capturing("telemetry")
        tel = self.pf.telemetry(reset=reset)
        if self._routing is not None:
            tel.routing = self._routing.histogram(ranks=[tel.rank])
            if reset:
                self._routing.reset()
        return tel

    def summary_lines(self) -> list[str]:
        """One line per layer of what was recorded so far (does not reset)."""
        return self.telemetry().summary_lines()

    def _drop_handles(self) -> None:
        for h in self._held:
            if not h.released:
                h.release()
        self._held = []
        for queue in self._handles.values():
            for h in queue:
                if not h.released:
                    h.release()
        self._handles.clear()

    def close(self) -> None:
        """Release the handles still held (prefetches issued ahead for a next iteration). A later
        :meth:`begin` starts again from the first layer."""
        self._drop_handles()
        self._started = False
        self._capture = None
        self._next = self._acquired = 0  # else begin() after close() prefetched from mid-sequence
