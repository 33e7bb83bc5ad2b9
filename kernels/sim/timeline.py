"""Timeline cost model: the instruction stream scheduled on the NeuronCore's engines.

Every instruction the emulator executes becomes an `Event` and is scheduled here, in
program order (docs/kernels.md, "The cost model"):

* compute engines (tensor, vector, scalar, gpsimd) each run their own queue in program
  order -- "each compute engine has its own sequencer ... four independent instruction
  streams asynchronously in parallel", synchronised by semaphores on data dependencies
  (nki/guides/architecture/trainium_inferentia2_arch.rst, "NeuronCore-v2 Architecture");
* an instruction starts when its engine is free AND every instruction producing one of
  its inputs has finished (read after write) AND every earlier reader/writer of the
  storage it overwrites has finished (write after read / write after write: a buffer's
  reuse waits for its previous use). Storage is tracked in cells of CELL_BYTES per
  partition of each tensor (PSUM tiles with an explicit `address=` by physical bank
  bytes, so two tiles placed in one bank wait for each other);
* on NeuronCore-v2, VectorE and ScalarE "cannot access PSUM in parallel" (same page,
  "Data Movement"): their PSUM-touching instructions also hold one shared PSUM port;
* DMA: a transfer is triggered when its inputs are ready (and its destination's previous
  users are done), starts moving data no earlier than DMA_FIXED latency after that
  ("descriptor setup, synchronization, and semaphore-to-start latency (~1300 ns
  cross-engine)", nki/deep-dives/nki-dma-bandwidth-guide.rst), and "DMA transfers within
  a queue ... are executed in order" (nki/get-started/about/nki-dma-overview.rst): one
  transfer in flight per queue. Each HBM tensor streams through its own queue (an
  assumption: the compiler picks queues; see docs/kernels.md). A transfer moves
  `bytes / (engines x per-engine rate x efficiency)` where engines = ceil(partitions / 8)
  ("each DMA engine is typically responsible for moving data for eight SBUF partitions",
  same overview page); all transfers share the 16 engines' aggregate bandwidth, booked in
  time (`Calendar`: the earliest free interval after a transfer is ready).

Latency = the end of the last instruction. Per engine: busy time (sum of its
instructions' costs) and stall time (time its queue waited on dependencies while it had
the next instruction ready in program order).
"""
import bisect
from dataclasses import dataclass

CELL_BYTES = 512            # dependency granularity within one partition of a tensor
HBM_CELLS = 4096            # an HBM tensor is tracked in at most this many cells

COMPUTE_ENGINES = ("tensor", "vector", "scalar", "gpsimd")
DGE_ENGINES = ("sync",)      # trn2's hardware DGE runs on the issuing (Sync/Scalar) sequencer


class Calendar:
    """A resource shared in time (the DMA engines' aggregate bandwidth, NC-v2's PSUM port):
    booked intervals, merged when they touch. A request takes the earliest gap long enough
    at or after its ready time, so a transfer issued later in program order but ready
    earlier is not held behind one still waiting for its inputs ("DMA transfers from
    different DMA queues are scheduled in a round robin fashion", nki-dma-overview.rst).
    Bounded memory: beyond MAX_GAPS intervals the oldest half is forgotten."""

    MAX_GAPS = 4096

    def __init__(self):
        self.iv = []             # sorted, disjoint [start, end]

    def book(self, t0, d):
        iv = self.iv
        if d <= 0.0:
            return t0
        i = bisect.bisect_right(iv, [t0, float("inf")]) - 1
        if i >= 0 and iv[i][1] > t0:
            t0 = iv[i][1]
        i += 1
        while i < len(iv) and iv[i][0] < t0 + d:
            t0 = max(t0, iv[i][1])
            i += 1
        # insert [t0, t0 + d] before index i, merging with neighbours that touch
        lo, hi = t0, t0 + d
        j = i
        if j > 0 and iv[j - 1][1] >= lo - 1e-15:
            j -= 1
            lo = iv[j][0]
            del iv[j]
            i -= 1
        if i < len(iv) and iv[i][0] <= hi + 1e-15:
            hi = iv[i][1]
            del iv[i]
        iv.insert(j, [lo, hi])
        if len(iv) > self.MAX_GAPS:
            del iv[:len(iv) // 2]
        return t0

    def shift(self, dt):
        for x in self.iv:
            x[0] += dt
            x[1] += dt


@dataclass(frozen=True)
class Event:
    """One instruction as the scheduler sees it.

    engine: "tensor" | "vector" | "scalar" | "gpsimd" | "dma"
    cost_s: execution time on its engine (compute) or data time (DMA, before sharing)
    reads / writes: tuples of (storage key, first cell, last cell)
    psum_port: holds NC-v2's shared VectorE/ScalarE PSUM port
    queue: DMA queue key; occupancy_s: DMA time on the shared aggregate bandwidth
    dge_s / dge_engine: descriptor generation before a DMA, booked on that engine (trn2's
    hardware DGE on the issuing engine, trn1's software DGE on GpSimd)
    """
    engine: str
    cost_s: float
    reads: tuple
    writes: tuple
    psum_port: bool = False
    queue: object = None
    occupancy_s: float = 0.0
    dge_s: float = 0.0
    dge_engine: str = None


class Timeline:
    """Schedules events in program order; see the module docstring."""

    def __init__(self, target, sync_latency_s=0.0):
        self.t = target
        self.free = {e: 0.0 for e in COMPUTE_ENGINES}
        self.busy = {e: 0.0 for e in COMPUTE_ENGINES + ("dma",) + DGE_ENGINES}
        self.stall = {e: 0.0 for e in COMPUTE_ENGINES + ("dma",) + DGE_ENGINES}
        self.port = Calendar()
        self.bw = Calendar()
        self.dge = {}            # engine -> Calendar of descriptor generation
        self.queue_free = {}
        self.last_write = {}     # storage key -> list of end times per cell
        self.last_read = {}
        self.end = 0.0
        self.sync_latency_s = sync_latency_s
        self.tapes = []          # active recordings (count-only dynamic loops)

    # -- storage bookkeeping ---------------------------------------------------------
    def _cells(self, table, key, hi):
        cells = table.get(key)
        if cells is None:
            cells = table[key] = [0.0] * (hi + 1)
        elif len(cells) <= hi:
            cells.extend([0.0] * (hi + 1 - len(cells)))
        return cells

    def _ready(self, ev):
        ready = 0.0
        lw, lr = self.last_write, self.last_read
        for key, lo, hi in ev.reads:
            cells = lw.get(key)
            if cells is not None:
                m = max(cells[lo:hi + 1], default=0.0)
                if m > ready:
                    ready = m
        for key, lo, hi in ev.writes:
            for table in (lw, lr):
                cells = table.get(key)
                if cells is not None:
                    m = max(cells[lo:hi + 1], default=0.0)
                    if m > ready:
                        ready = m
        return ready

    def _commit(self, ev, end):
        for key, lo, hi in ev.reads:
            cells = self._cells(self.last_read, key, hi)
            for i in range(lo, hi + 1):
                if cells[i] < end:
                    cells[i] = end
        for key, lo, hi in ev.writes:
            cells = self._cells(self.last_write, key, hi)
            for i in range(lo, hi + 1):
                cells[i] = end

    # -- scheduling ------------------------------------------------------------------------
    def schedule(self, ev: Event):
        for tape in self.tapes:
            tape.append(ev)
        ready = self._ready(ev)
        if ev.engine == "dma":
            end = self._dma(ev, ready)
        else:
            eng = ev.engine
            free = self.free[eng]
            start = max(free, ready + (self.sync_latency_s if ready > 0.0 else 0.0))
            if ev.psum_port:
                start = self.port.book(start, ev.cost_s)
            if start > free:
                self.stall[eng] += start - free
            end = start + ev.cost_s
            self.free[eng] = end
            self.busy[eng] += ev.cost_s
        self._commit(ev, end)
        if end > self.end:
            self.end = end
        return end

    def _dma(self, ev, ready):
        t = self.t
        qfree = self.queue_free.get(ev.queue, 0.0)
        earliest = max(ready + t.dma_fixed_s, qfree)
        if ev.dge_s > 0.0:
            cal = self.dge.get(ev.dge_engine)
            if cal is None:
                cal = self.dge[ev.dge_engine] = Calendar()
            generated = cal.book(ready, ev.dge_s) + ev.dge_s
            self.busy[ev.dge_engine] += ev.dge_s
            earliest = max(earliest, generated)
        if earliest > qfree:
            self.stall["dma"] += earliest - qfree
        start = self.bw.book(earliest, ev.occupancy_s)
        end = start + max(ev.cost_s, ev.occupancy_s)
        self.queue_free[ev.queue] = end
        self.busy["dma"] += ev.occupancy_s
        return end

    def replay(self, tape, times):
        """Schedule a recorded loop body `times` more times (count-only loops).

        Steady state: the schedule is a max-plus system, so once two consecutive
        iterations have moved every event's end time by the same amount D as the one
        before, every later iteration does too; the remaining iterations then advance
        the whole state (engines, queues, the storage the body touches) by D each and add
        the iteration's busy and stall times, instead of being scheduled one by one.
        (Not used inside an enclosing recording, which needs every event.)"""
        prev, prev_delta, steady = None, None, 0
        done = 0
        while done < times:
            busy0, stall0 = dict(self.busy), dict(self.stall)
            ends = [self.schedule(ev) for ev in tape]
            done += 1
            if prev is not None and ends:
                delta = ends[0] - prev[0]
                tol = 1e-12 + 1e-9 * abs(delta)
                uniform = all(abs((e - p) - delta) <= tol for e, p in zip(ends, prev))
                if uniform and prev_delta is not None and abs(delta - prev_delta) <= tol:
                    steady += 1
                else:
                    steady = 0
                prev_delta = delta if uniform else None
            prev = ends
            if steady >= 1 and done < times and not self.tapes:
                self._advance(tape, times - done, prev_delta, busy0, stall0)
                return

    def _advance(self, tape, m, delta, busy0, stall0):
        shift = m * delta
        for k in self.busy:
            self.busy[k] += m * (self.busy[k] - busy0[k])
            self.stall[k] += m * (self.stall[k] - stall0[k])
        for e in self.free:
            self.free[e] += shift
        self.port.shift(shift)
        self.bw.shift(shift)
        for cal in self.dge.values():
            cal.shift(shift)
        for q in self.queue_free:
            self.queue_free[q] += shift
        for table, attr in ((self.last_read, "reads"), (self.last_write, "writes")):
            seen = set()
            for ev in tape:
                for key, lo, hi in getattr(ev, attr):
                    cells = table[key]
                    for i in range(lo, hi + 1):
                        if (key, i) not in seen:
                            seen.add((key, i))
                            cells[i] += shift
        self.end += shift
