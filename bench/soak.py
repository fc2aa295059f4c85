"""Soak: concurrent clients drive one shard the way LoRAX's router does, and nothing may be lost.

    python -m bench.soak --duration 60 --clients 8          # an in-process server on the embedded model (CPU)
    python -m bench.soak --uds-path /tmp/lorax [--server-pid PID]   # a shard already serving on unix:///tmp/lorax-0

Every client thread owns a gRPC channel and drives its own batches through Prefill/Decode (the server runs
one step at a time, so "concurrent" means the steps of many batches interleave), in a mix of scenarios:

- plain:         a batch of 1-3 requests, each on the base model or an adapter, decoded to the end;
- join:          a second batch joins a running one (Decode of both, or Prefill with `cached_batch`);
- cancel:        after a few steps FilterBatch drops one request, the others finish;
- cancel_all:    after a few steps every request is dropped: ClearCache(id), as the router does;
- vanish_clear:  the client closes its channel with a Decode in flight; ClearCache(id) follows (the router);
- vanish_orphan: the same, but the batch is left in the cache until the end of the phase (warm-up, then the
                 soak), where ClearCache without an id clears it, as a restarted router does.

Alongside them a churn thread pins an adapter with a live request and asks to offload it (refused with
INVALID_ARGUMENT, by design), then offloads it once idle and loads it again while other batches decode; a
probe thread sends the router's liveness probe (batch and request id 2**64-1 on block 0) and Health.

Every request is greedy with ignore_eos_token, so its output is known: each is first run alone on the same
server (the references), and a request that finishes must give exactly those ids and that text; one that
was cancelled or abandoned must have received a prefix of them. After each phase, with the cache cleared,
a batch must be able to take every block but the probe's (asked over gRPC), and memory is measured:
resident memory (VmRSS of this process, or of --server-pid), and in-process the live Python objects and
tensors. Figures: requests, completed, cancelled, vanished, failed, lost, corrupted, p50/p99 latency per
completed request, memory after warm-up and at the end. The exit status is 1 when anything was lost.
"""

import argparse
import ctypes
import gc
import itertools
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc

import lorax_server
from lorax_server.client import ShardClient, liveness_probe, make_request
from lorax_server.pb import generate_pb2 as pb

U64_MAX = 2**64 - 1  # the liveness probe's batch and request id (router/src/health.rs)
ADAPTER_DIRS = {name: Path(lorax_server.__file__).parent / "assets" / "adapters" / name for name in ("shout", "zen")}
# Adapter index -> what it serves. Each adapter sits at two indices, so that the churn thread can offload
# and re-load one (3 or 4) while the other keeps serving; requests on 3 and 4 are checked against the
# references of 1 and 2, i.e. a re-loaded adapter must answer exactly as before.
SERVED = {0: "base", 1: "shout", 2: "zen", 3: "shout", 4: "zen"}
PRIMARY = {"base": 0, "shout": 1, "zen": 2}
CHURNED = (3, 4)
PROMPTS = ("The for statement", "A list is", "def fibonacci(n):", "Once upon a time",
           "import numpy as np", "The capital of France is")
SCENARIOS = ("plain", "join", "cancel", "cancel_all", "vanish_clear", "vanish_orphan")
WEIGHTS = (4, 2, 2, 1, 1, 1)
TRUNCATE = 1023  # what the router sends by default (max_input_length), longer than every prompt here


@dataclass
class SoakConfig:
    clients: int = 8
    # Either seconds (the bench) or rounds: each round, every client runs every scenario once in a shuffled
    # order (the test: a fixed mix, whatever the speed of the machine).
    duration_s: Optional[float] = 60.0
    warmup_s: float = 10.0
    rounds: Optional[int] = None
    warmup_rounds: int = 1
    new_tokens: Tuple[int, ...] = (8, 16)  # max_new_tokens of a request is one of these
    max_orphans: int = 4  # batches left behind at once (they hold cache blocks until the end of the phase)
    probe_every_s: float = 0.2
    churn_every_s: float = 0.3
    drain_s: float = 2.0  # how long the churn waits for an adapter to become idle before it tries the other
    seed: int = 0


@dataclass
class Tracker:
    """One request as its client sees it."""

    id: int
    prompt: int
    index: int
    new_tokens: int
    sent: float
    batch: int = 0  # the server batch it is in now
    ids: List[int] = field(default_factory=list)
    state: str = "live"  # live, completed, failed, corrupted, cancelled, vanished, lost

    @property
    def key(self):
        return (self.prompt, SERVED[self.index], self.new_tokens)


class Figures:
    """Counters shared by every thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Dict[str, int] = {}
        self.latencies: List[float] = []
        self.errors: List[str] = []
        self.rss: Dict[str, int] = {}
        self.free_blocks: Optional[Tuple[int, int]] = None  # (free at the end, handed out), asked over gRPC
        self.objects: Dict[str, Tuple[int, int, int]] = {}  # live_objects() of this process
        self.heap: Dict[str, int] = {}  # malloc_in_use() of this process

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def error(self, message: str) -> None:
        with self.lock:
            self.counts["errors"] = self.counts.get("errors", 0) + 1
            if len(self.errors) < 20:
                self.errors.append(message[:500])

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def live(self) -> int:
        """Requests sent and not over for their clients: in the cache, or about to be."""
        with self.lock:
            ended = sum(self.counts.get(k, 0) for k in ("completed", "cancelled", "vanished", "failed", "lost",
                                                          "corrupted"))
            return self.counts.get("requests", 0) - ended

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def rows(self) -> List[Tuple[str, str]]:
        mib = lambda key: f"{self.rss[key] / 2**20:.1f}" if key in self.rss else "n/a"  # noqa: E731
        rows = [(name, str(self[name])) for name in ("requests", "completed", "cancelled", "vanished", "failed",
                                                     "lost", "corrupted", "errors")]
        rows += [("p50 latency ms", f"{1e3 * self.percentile(0.50):.0f}"),
                 ("p99 latency ms", f"{1e3 * self.percentile(0.99):.0f}"),
                 ("tokens generated", str(self["tokens"])), ("steps (Prefill + Decode)", str(self["steps"])),
                 ("liveness probes (with requests live)", f"{self['probes']} ({self['probes_while_live']})"),
                 ("adapter offloads / re-loads", f"{self['offloads']} / {self['reloads']}"),
                 ("offloads refused (in use)", str(self["offload_refused_in_use"])),
                 ("RSS MiB before warm-up", mib("start")), ("RSS MiB after warm-up", mib("warm")),
                 ("RSS MiB at the end", mib("end")),
                 *[(f"malloc in use MiB {when}", f"{self.heap[key] / 2**20:.1f}")
                   for key, when in (("warm", "after warm-up"), ("end", "at the end")) if key in self.heap],
                 *[(f"live objects, tensors, tensor MiB {when}", "{}, {}, {:.1f}".format(
                     *self.objects[key][:2], self.objects[key][2] / 2**20))
                   for key, when in (("warm", "after warm-up"), ("end", "at the end")) if key in self.objects],
                 ("cache blocks free at the end (over gRPC)",
                  "{} of {}".format(*self.free_blocks) if self.free_blocks else "n/a"),
                 ("wall s", f"{self.counts.get('wall_ms', 0) / 1e3:.1f}")]
        rows += [(f"scenario {s}", str(self[f"scenario_{s}"])) for s in SCENARIOS]
        return rows

    def summary(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())


def rss_bytes(pid="self") -> int:
    """Resident memory (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def live_objects() -> Tuple[int, int, int]:
    """(Python objects the garbage collector tracks, torch tensors among them, bytes of their distinct
    storages) in this process: the model, the cache and the adapters, and whatever a request, a batch or a
    step would keep by mistake."""
    import torch

    gc.collect()
    objects = gc.get_objects()
    count, storages = 0, {}
    for obj in objects:
        if issubclass(type(obj), torch.Tensor):
            count += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return len(objects), count, sum(storages.values())


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> Optional[int]:
    """Bytes glibc's malloc has handed out and not had back (mallinfo2: chunks in use in every arena, plus
    mmapped ones), None without glibc 2.33. What a native leak grows; RSS also holds the free chunks that
    fragmentation strands in the per-thread arenas, which come and go by megabytes with the thread mix."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def settle() -> None:
    """Gives freed memory back before measuring this process: garbage collection, then glibc's free lists
    (malloc_trim). Memory still referenced, i.e. a leak, stays resident and is measured."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def greedy_request(request_id: int, prompt: int, index: int, new_tokens: int) -> pb.Request:
    return make_request(request_id, PROMPTS[prompt], max_new_tokens=new_tokens, adapter_index=index,
                        ignore_eos_token=True, truncate=TRUNCATE)


class AdapterPool:
    """Which adapter indices clients may use now, and how many of their requests use each. The churn
    thread offloads an index only once no request uses it, as the router offloads idle adapters."""

    def __init__(self, indices: Sequence[int]):
        self.cond = threading.Condition()
        self.users = {i: 0 for i in indices}
        self.closed = set()  # draining or offloaded: no new requests

    def acquire(self, rng: random.Random, exclude: Sequence[int] = ()) -> int:
        with self.cond:
            index = rng.choice([i for i in self.users if i not in self.closed and i not in exclude])
            self.users[index] += 1
            return index

    def pin(self, index: int) -> None:
        with self.cond:
            self.users[index] += 1

    def release(self, index: int) -> None:
        with self.cond:
            self.users[index] -= 1
            self.cond.notify_all()

    def drain(self, index: int, timeout: float) -> bool:
        """Closes `index` to new requests and waits until none uses it; reopens it and answers False when
        that takes longer than `timeout` (e.g. a batch left behind holds it)."""
        with self.cond:
            self.closed.add(index)
            if self.cond.wait_for(lambda: self.users[index] == 0, timeout):
                return True
            self.closed.discard(index)
            return False

    def reopen(self, index: int) -> None:
        with self.cond:
            self.closed.discard(index)


class Soak:
    def __init__(self, url: str, config: SoakConfig, rss: Optional[Callable[[], int]] = None,
                 settle_memory: Callable[[], None] = lambda: None,
                 objects: Optional[Callable[[], Tuple[int, int, int]]] = None,
                 heap: Optional[Callable[[], Optional[int]]] = None):
        """`rss` measures the shard's resident memory (after `settle_memory`); in-process only, `objects`
        its live objects and tensors (live_objects) and `heap` the bytes malloc has handed out (malloc_in_use)."""
        self.url, self.config = url, config
        self.rss, self.settle_memory, self.objects, self.heap = rss, settle_memory, objects, heap
        self.figures = Figures()
        self.pool = AdapterPool(SERVED)
        self.references: Dict[Tuple[int, str, int], Tuple[List[int], str]] = {}
        self.counter_lock = threading.Lock()
        self.request_ids = itertools.count(1)  # ONE counter: request ids are unique across every live batch
        self.batch_ids = itertools.count(1)
        self.orphans: List[Tuple[int, List[Tracker]]] = []  # batches left behind until the end of the phase
        self.block_size, self.windowed, self.cache_blocks = 16, False, 0
        self.barrier = threading.Barrier(config.clients + 1)  # phase boundaries: the clients and run()

    # -- set-up ----------------------------------------------------------------------------------------

    def next_request_id(self) -> int:
        with self.counter_lock:
            return next(self.request_ids)

    def next_batch_id(self) -> int:
        with self.counter_lock:
            return next(self.batch_ids)

    def setup(self) -> None:
        """Loads the adapters at their indices and runs every request of the mix alone: the references."""
        client = ShardClient(self.url)
        client.wait_ready()
        self.prime_server_threads(client)
        info = client.stub.Info(pb.InfoRequest())
        self.block_size, self.windowed = info.block_size, info.HasField("window_size")
        # The router's Warmup (a small batch here) answers the cache's size in tokens.
        warmup = pb.Batch(id=self.next_batch_id(), requests=[greedy_request(0, 0, 0, 4)], size=1)
        self.cache_blocks = client.stub.Warmup(pb.WarmupRequest(
            batch=warmup, max_input_length=16, max_prefill_tokens=32, max_new_tokens=16)
        ).max_supported_total_tokens // self.block_size
        for index, name in SERVED.items():
            if name != "base":
                path = str(ADAPTER_DIRS[name])
                client.stub.DownloadAdapter(pb.DownloadAdapterRequest(
                    adapter_parameters=pb.AdapterParameters(adapter_ids=[path]), adapter_source=pb.LOCAL))
                assert client.load_adapter(index, path), f"LoadAdapter {index} {path}"
        for prompt, name, n in itertools.product(range(len(PROMPTS)), PRIMARY, self.config.new_tokens):
            rid, ids = self.next_request_id(), []
            done = client.run_to_completion(self.next_batch_id(), [greedy_request(rid, prompt, PRIMARY[name], n)],
                                            on_step=lambda g: ids.extend(g.next_tokens.ids))
            text = done[rid]
            if text.text.startswith("[error]") or len(ids) != n:
                raise RuntimeError(f"reference {PROMPTS[prompt]!r} on {name}: {text.text!r}")
            self.references[(prompt, name, n)] = (ids, text.text)
        client.close()

    def prime_server_threads(self, client: ShardClient, calls: int = 24, prompt_tokens: int = 256) -> None:
        """Has every thread the server answers calls on run a model step now: `calls` Prefills of a long
        prompt in flight at once, each waiting for the server's lock while another runs, keep all of gRPC's
        workers busy (its pool starts a thread per call while none is idle, up to its size). Each thread
        that runs a matmul keeps buffers of its own (MKL: ~4 MiB per thread, and per thread of its OpenMP
        team), so a worker first used after the warm-up would add them to the memory measured at the end."""
        futures = [client.stub.Prefill.future(pb.PrefillRequest(batch=pb.Batch(id=self.next_batch_id(), requests=[
            make_request(self.next_request_id(), ids=[75] * prompt_tokens, max_new_tokens=1)], size=1)))
            for _ in range(calls)]
        for future in futures:
            if future.result().HasField("batch"):
                raise RuntimeError("a one-token request is still in the cache after its Prefill")

    # -- phases ----------------------------------------------------------------------------------------

    def run(self) -> Figures:
        f = self.figures
        start = time.perf_counter()
        self.setup()
        self.measure("start")
        # The same threads (and so the same allocator arenas) serve both phases; between them, and before
        # the last measure, the clients have ended their scenarios and the background threads are idle.
        phases = [(self.config.warmup_s, self.config.warmup_rounds), (self.config.duration_s, self.config.rounds)]
        clients = [Client(self, k, phases) for k in range(self.config.clients)]
        background = [Background(self, self.churn_once, self.config.churn_every_s, "churn"),
                      Background(self, self.probe_once, self.config.probe_every_s, "probe")]
        threads = [threading.Thread(target=c.run, name=f"client-{c.k}") for c in clients] + background
        for t in threads:
            t.start()
        for when in ("warm", "end"):
            for b in background:
                b.resume()
            self.barrier.wait()  # the clients start this phase
            self.barrier.wait()  # and have finished it
            for b in background:
                b.pause()
            self.finish()  # the shard is then in the same state after each phase: nothing in its cache
            self.measure(when)
        for b in background:
            b.stop()
        for t in threads:
            t.join()
        f.add("wall_ms", int(1e3 * (time.perf_counter() - start)))
        return f

    def measure(self, when: str) -> None:
        if self.rss is not None:  # first: counting the objects allocates a list of them all
            self.settle_memory()
            self.figures.rss[when] = self.rss()
        if self.heap is not None and self.heap() is not None:
            self.figures.heap[when] = self.heap()
        if self.objects is not None:
            self.figures.objects[when] = self.objects()

    def finish(self) -> None:
        """At the end of a phase: clears what vanished clients left behind (ClearCache without an id, as a
        restarted router does), checks that every cache block is free again and that the shard still serves
        the same greedy output."""
        client = ShardClient(self.url)
        client.stub.ClearCache(pb.ClearCacheRequest())
        for _, trackers in self.orphans:
            for tr in trackers:
                self.pool.release(tr.index)
        self.orphans.clear()
        if not self.windowed:
            self.figures.free_blocks = self.free_blocks_over_the_wire(client)
            if self.figures.free_blocks[0] != self.figures.free_blocks[1]:
                self.figures.error("cache blocks free at the end: {} of {}".format(*self.figures.free_blocks))
        (prompt, name, n), (ids, text) = next(iter(self.references.items()))
        rid = self.next_request_id()
        done = client.run_to_completion(self.next_batch_id(), [greedy_request(rid, prompt, PRIMARY[name], n)])
        if done[rid].text != text:
            self.figures.error(f"after a phase of the soak: {done[rid].text!r} instead of {text!r}")
        client.close()

    def free_blocks_over_the_wire(self, client: ShardClient) -> Tuple[int, int]:
        """(blocks a new batch can take now, blocks the shard hands out: all but block 0, the probe's).

        Asked as a client can: one batch whose requests need exactly every block the shard hands out (one
        prompt token, a multiple of the block size of new tokens, so each reserves whole blocks when it is
        admitted), then one more block; then ClearCache(id). With nothing leaked, every request but the last
        is admitted and the last is refused alone ("cache blocks"); a leaked block refuses one before it."""
        handed_out, sizes = self.cache_blocks - 1, []
        while sum(sizes) < handed_out:
            sizes.append(min(32, handed_out - sum(sizes)))
        sizes.append(1)
        batch_id = self.next_batch_id()
        requests = [make_request(self.next_request_id(), ids=[75], max_new_tokens=blocks * self.block_size,
                                 ignore_eos_token=True) for blocks in sizes]
        response = client.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests,
                                                                         size=len(requests))))
        client.stub.ClearCache(pb.ClearCacheRequest(id=batch_id))
        refused = {g.request_id for g in response.generations
                   if g.HasField("generated_text") and g.generated_text.text.startswith("[error]")}
        taken = sum(blocks for blocks, r in zip(sizes, requests) if r.id not in refused)
        if taken > handed_out:
            self.figures.error(f"a batch took {taken} blocks, more than the {handed_out} the shard hands out")
        return taken, handed_out

    # -- background threads ----------------------------------------------------------------------------

    def probe_once(self, client: ShardClient, rng: random.Random, turn: int) -> None:
        """The router's liveness probe (while batches are live), then Health."""
        live = self.figures.live
        response = client.stub.Prefill(liveness_probe(self.block_size))
        client.stub.Health(pb.HealthRequest())
        gens = response.generations
        if (len(gens) != 1 or gens[0].request_id != U64_MAX or not gens[0].HasField("generated_text")
                or gens[0].generated_text.text.startswith("[error]") or response.HasField("batch")):
            self.figures.error(f"liveness probe answered {response}")
        self.figures.add("probes")
        self.figures.add("probes_while_live", live > 0 and self.figures.live > 0)

    def churn_once(self, client: ShardClient, rng: random.Random, turn: int) -> None:
        """Round-robin over CHURNED: the offload is refused while a request uses the adapter; once idle it is
        offloaded and loaded again, while the clients' batches decode."""
        f, index = self.figures, CHURNED[turn % len(CHURNED)]
        offload = pb.OffloadAdapterRequest(adapter_parameters=pb.AdapterParameters(
            adapter_ids=[str(ADAPTER_DIRS[SERVED[index]])]), adapter_source=pb.LOCAL, adapter_index=index)
        # 1. In use: a request of ours on `index` is live in the cache, so the offload must be refused.
        self.pool.pin(index)
        driver = Driver(self, client)
        batch = driver.prefill([(rng.randrange(len(PROMPTS)), index, max(self.config.new_tokens))])
        try:
            client.stub.OffloadAdapter(offload)
            f.error(f"OffloadAdapter {index} answered while request {list(driver.live)} uses it")
            client.load_adapter(index, str(ADAPTER_DIRS[SERVED[index]]))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                f.add("offload_refused_in_use")
            else:
                f.error(f"OffloadAdapter {index} in use: {error.code().name}: {error.details()}")
        driver.to_completion([batch])
        # 2. Idle: once no request uses it, offload it, let the others decode a while, load it again.
        if not self.pool.drain(index, timeout=self.config.drain_s):
            f.add("churn_busy")
            return
        try:
            try:
                answered = client.stub.OffloadAdapter(offload).offloaded
            except grpc.RpcError as error:  # no client request uses it: the shard must hold none
                f.error(f"OffloadAdapter {index} while idle: {error.code().name}: {error.details()}")
                return
            if not answered:
                f.error(f"OffloadAdapter {index} while idle answered offloaded=false")
            f.add("offloads")
            time.sleep(rng.uniform(0, self.config.churn_every_s))
            if client.load_adapter(index, str(ADAPTER_DIRS[SERVED[index]])):
                f.add("reloads")
            else:
                f.error(f"LoadAdapter {index} answered loaded=false")
        finally:
            self.pool.reopen(index)


class Background(threading.Thread):
    """A thread that calls `work(client, rng, turn)` every `every_s` seconds while resumed; pause() returns
    once it is idle (its current call done)."""

    def __init__(self, soak: Soak, work, every_s: float, name: str):
        super().__init__(name=name)
        self.soak, self.work, self.every_s = soak, work, every_s
        self.running, self.stopped, self.busy = threading.Event(), threading.Event(), threading.Lock()
        self.rng = random.Random(soak.config.seed - len(name))

    def resume(self) -> None:
        self.running.set()

    def pause(self) -> None:
        self.running.clear()
        with self.busy:  # the call under way ends; later turns see `running` cleared
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.resume()

    def run(self) -> None:
        client = ShardClient(self.soak.url)
        for turn in itertools.count():
            self.running.wait()
            if self.stopped.wait(self.every_s):
                break
            with self.busy:
                if not self.running.is_set() or self.stopped.is_set():
                    continue
                try:
                    self.work(client, self.rng, turn)
                except grpc.RpcError as error:
                    self.soak.figures.error(f"{self.name}: {error.code().name}: {error.details()}")
                except Exception as error:  # noqa: BLE001 (recorded; the soak goes on and fails at the end)
                    self.soak.figures.error(f"{self.name}: {type(error).__name__}: {error}")
        client.close()


class Driver:
    """The requests one client drives through one scenario, and the checks on every answer."""

    def __init__(self, soak: Soak, client: ShardClient):
        self.soak, self.client, self.f = soak, client, soak.figures
        self.live: Dict[int, Tracker] = {}

    def new_trackers(self, specs, batch_id: int) -> List[Tracker]:
        trackers = []
        for prompt, index, n in specs:
            tr = Tracker(self.soak.next_request_id(), prompt, index, n, time.perf_counter(), batch_id)
            trackers.append(tr)
            self.live[tr.id] = tr
            self.f.add("requests")
        return trackers

    def prefill(self, specs, cached: Optional[pb.CachedBatch] = None) -> Optional[pb.CachedBatch]:
        """A new batch of (prompt, adapter index already acquired, max_new_tokens). With `cached`, the new
        requests join that batch (Prefill's cached_batch)."""
        batch_id = self.soak.next_batch_id()
        trackers = self.new_trackers(specs, batch_id)
        request = pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=[
            greedy_request(t.id, t.prompt, t.index, t.new_tokens) for t in trackers], size=len(trackers)))
        if cached is not None:
            request.cached_batch.CopyFrom(cached)
        return self.call(self.client.stub.Prefill, request, [batch_id] + ([cached.id] if cached else []))

    def decode(self, batches: Sequence[pb.CachedBatch]) -> Optional[pb.CachedBatch]:
        return self.call(self.client.stub.Decode, pb.DecodeRequest(batches=list(batches)), [b.id for b in batches])

    def filter(self, batch: pb.CachedBatch, keep: Sequence[int]) -> Optional[pb.CachedBatch]:
        """FilterBatch: the requests not kept are cancelled (the router's client went away)."""
        answer = self.call(self.client.stub.FilterBatch, pb.FilterBatchRequest(batch_id=batch.id, request_ids=keep),
                           [batch.id], step=False, dropped=[i for i in batch.request_ids if i not in keep])
        return answer

    def clear(self, batch_id: int, state: str = "cancelled") -> None:
        """ClearCache(id): every request of the batch ends (as the router clears a batch nobody wants)."""
        self.client.stub.ClearCache(pb.ClearCacheRequest(id=batch_id))
        for tr in [t for t in self.live.values() if t.batch == batch_id]:
            self.end(tr, state)

    def call(self, method, request, batch_ids: Sequence[int], step: bool = True,
             dropped: Sequence[int] = ()) -> Optional[pb.CachedBatch]:
        involved = [t for t in self.live.values() if t.batch in batch_ids]
        try:
            response = method(request)
        except grpc.RpcError as error:
            self.f.error(f"{method._method.decode()}: {error.code().name}: {error.details()}")
            for tr in involved:  # as the router: a failed step fails its batches, which it then clears
                self.end(tr, "failed")
            for batch_id in batch_ids:
                try:
                    self.client.stub.ClearCache(pb.ClearCacheRequest(id=batch_id))
                except grpc.RpcError as clear_error:
                    self.f.error(f"ClearCache({batch_id}): {clear_error.code().name}: {clear_error.details()}")
            return None
        for request_id in dropped:
            self.end(self.live[request_id], "cancelled")
        if step:
            self.f.add("steps")
            for g in response.generations:
                self.on_generation(g)
        batch = response.batch if response.HasField("batch") else None
        still = {t.id for t in involved if t.state == "live"}
        returned = set(batch.request_ids) if batch is not None else set()
        if returned != still:  # a request that left its batch without a last Generation is lost
            self.f.error(f"batch {batch_ids} came back with requests {sorted(returned)}, expected {sorted(still)}")
            for request_id in still - returned:
                self.end(self.live[request_id], "lost")
        for request_id in returned & still:
            self.live[request_id].batch = batch.id
        return batch

    def on_generation(self, g: pb.Generation) -> None:
        tr = self.live.get(g.request_id)
        if tr is None:
            self.f.error(f"a Generation for request {g.request_id}, which is not live in this client's batches")
            self.f.add("corrupted")
            return
        tr.ids.extend(g.next_tokens.ids)
        self.f.add("tokens", len(g.next_tokens.ids))
        if not g.HasField("generated_text"):
            if len(tr.ids) >= tr.new_tokens:
                self.f.error(f"request {tr.id} got {len(tr.ids)} tokens of {tr.new_tokens} and did not finish")
            return
        text = g.generated_text
        ids, ref_text = self.soak.references[tr.key]
        if text.text.startswith("[error]"):
            self.f.error(f"request {tr.id} ({tr.key}) failed: {text.text}")
            self.end(tr, "failed")
        elif (tr.ids != ids or text.text != ref_text or text.generated_tokens != tr.new_tokens
              or text.finish_reason != pb.FINISH_REASON_LENGTH):
            self.f.error(f"request {tr.id} (prompt {tr.prompt}, adapter index {tr.index}: {SERVED[tr.index]}, "
                         f"{tr.new_tokens} tokens) gave {tr.ids} {text.text!r}, alone {ids} {ref_text!r}")
            self.end(tr, "corrupted")
        else:
            with self.f.lock:
                self.f.latencies.append(time.perf_counter() - tr.sent)
            self.end(tr, "completed")

    def end(self, tr: Tracker, state: str, keep_index: bool = False) -> None:
        """The request is over for its client: count it and give its adapter index back (unless its batch
        is left behind in the cache, which keeps the adapter in use until it is cleared)."""
        if tr.state != "live":
            return
        if state in ("cancelled", "vanished") and tr.ids != self.soak.references[tr.key][0][:len(tr.ids)]:
            self.f.error(f"request {tr.id} ({tr.key}), {state}, had received {tr.ids}: not a prefix of its "
                         f"output alone")
            state = "corrupted"
        tr.state = state
        self.f.add(state)
        del self.live[tr.id]
        if not keep_index:
            self.soak.pool.release(tr.index)

    def to_completion(self, batches: Sequence[Optional[pb.CachedBatch]]) -> None:
        batches = [b for b in batches if b is not None]
        while batches:
            batch = self.decode(batches)
            batches = [batch] if batch is not None else []


class Client:
    """One client thread: scenarios one after another, each with its own batches."""

    def __init__(self, soak: Soak, k: int, phases: Sequence[Tuple[Optional[float], Optional[int]]]):
        self.soak, self.k, self.phases = soak, k, phases  # (seconds, rounds) of each phase
        self.config = soak.config
        self.rng = random.Random(soak.config.seed * 1000 + k)
        self.client = ShardClient(soak.url)

    def schedule(self, seconds: Optional[float], rounds: Optional[int]):
        if rounds:
            for _ in range(rounds):
                order = list(SCENARIOS)
                self.rng.shuffle(order)
                yield from order
        else:
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                yield self.rng.choices(SCENARIOS, WEIGHTS)[0]

    def run(self) -> None:
        for seconds, rounds in self.phases:
            self.soak.barrier.wait()
            try:
                for scenario in self.schedule(seconds, rounds):
                    self.scenario(scenario)
            finally:
                self.soak.barrier.wait()
        self.client.close()

    def scenario(self, scenario: str) -> None:
        driver = Driver(self.soak, self.client)
        try:
            getattr(self, scenario)(driver)
            self.soak.figures.add(f"scenario_{scenario}")
        except Exception as error:  # noqa: BLE001 (recorded; the soak goes on and fails at the end)
            self.soak.figures.error(f"client {self.k}, {scenario}: {type(error).__name__}: {error}")
            for tr in list(driver.live.values()):
                driver.end(tr, "lost")

    def specs(self, count: int, min_tokens: int = 0, exclude: Sequence[int] = ()):
        """`count` requests: a prompt, an adapter index (acquired here, not one of `exclude`) and max_new_tokens."""
        choices = [n for n in self.config.new_tokens if n >= min_tokens] or [max(self.config.new_tokens)]
        return [(self.rng.randrange(len(PROMPTS)), self.soak.pool.acquire(self.rng, exclude),
                 self.rng.choice(choices)) for _ in range(count)]

    def steps_before(self, specs) -> int:
        """A number of decode steps after which every request of `specs` is still live."""
        return self.rng.randint(0, min(n for _, _, n in specs) - 3)

    def plain(self, d: Driver) -> None:
        d.to_completion([d.prefill(self.specs(self.rng.randint(1, 3)))])

    def join(self, d: Driver) -> None:
        first = self.specs(self.rng.randint(1, 2), min_tokens=5)
        batch = d.prefill(first)
        for _ in range(self.steps_before(first)):
            batch = d.decode([batch])
        second = self.specs(self.rng.randint(1, 2))
        if self.rng.random() < 0.5:
            d.to_completion([batch, d.prefill(second)])  # Decode([running, new]) as the router concatenates
        else:
            d.to_completion([d.prefill(second, cached=batch)])  # Prefill joining a cached batch

    def cancel(self, d: Driver) -> None:
        specs = self.specs(self.rng.randint(2, 3), min_tokens=5)
        batch = d.prefill(specs)
        for _ in range(self.steps_before(specs)):
            batch = d.decode([batch])
        keep = list(batch.request_ids)
        keep.remove(self.rng.choice(keep))
        d.to_completion([d.filter(batch, keep)])

    def cancel_all(self, d: Driver) -> None:
        specs = self.specs(self.rng.randint(1, 3), min_tokens=5)
        batch = d.prefill(specs)
        for _ in range(self.steps_before(specs)):
            batch = d.decode([batch])
        d.clear(batch.id)  # FilterBatch must keep one: with none left the router sends ClearCache(id)

    def vanish(self, d: Driver, orphan: bool) -> None:
        # A batch left behind keeps its adapters in use until the end: not the ones the churn offloads.
        specs = self.specs(self.rng.randint(1, 2), min_tokens=5, exclude=CHURNED if orphan else ())
        batch = d.prefill(specs)
        for _ in range(self.steps_before(specs)):
            batch = d.decode([batch])
        # The client goes away with a Decode in flight: its channel closes, the call is cancelled (or
        # answered to nobody). The batch then holds one more token or not: its outputs are not read again.
        call = self.client.stub.Decode.future(pb.DecodeRequest(batches=[batch]))
        time.sleep(self.rng.uniform(0, 0.01))
        self.client.close()
        call.cancel()
        self.client = d.client = ShardClient(self.soak.url)
        trackers = [t for t in d.live.values()]
        if orphan:
            with self.soak.counter_lock:
                self.soak.orphans.append((batch.id, trackers))
            for tr in trackers:
                d.end(tr, "vanished", keep_index=True)
        else:
            d.clear(batch.id, "vanished")  # what the router sends after a failed call

    def vanish_clear(self, d: Driver) -> None:
        self.vanish(d, orphan=False)

    def vanish_orphan(self, d: Driver) -> None:
        with self.soak.counter_lock:
            orphan = len(self.soak.orphans) < self.config.max_orphans
        self.vanish(d, orphan=orphan)


def in_process_server(kv_cache_bytes: int):
    """The embedded tiny Mixtral in fp32, served on a unix socket in this process: (url, model, server)."""
    import atexit
    import shutil
    import tempfile

    from lorax_server.cli import DEFAULT_MODEL_DIR
    from lorax_server.models import get_model
    from lorax_server.server import start_server

    model = get_model(str(DEFAULT_MODEL_DIR), dtype="float32", kv_cache_bytes=kv_cache_bytes)
    directory = tempfile.mkdtemp(prefix="soak-")
    atexit.register(shutil.rmtree, directory, True)
    socket = os.path.join(directory, "lorax")
    server, _ = start_server(model, socket)
    return f"unix://{socket}-0", model, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of soak after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of the same mix before memory is measured")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[8, 16], help="max_new_tokens choices (>= 5)")
    parser.add_argument("--max-orphans", type=int, default=4, help="batches left behind at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uds-path", help="soak a shard already serving on unix://UDS_PATH-0 instead")
    parser.add_argument("--server-pid", type=int, help="with --uds-path: the shard's pid, to measure its memory")
    parser.add_argument("--kv-cache-mib", type=int, default=16, help="in-process server: KV cache size")
    args = parser.parse_args()
    if min(args.new_tokens) < 5:
        parser.error("--new-tokens must be at least 5 (scenarios act after a few steps)")
    config = SoakConfig(clients=args.clients, duration_s=args.duration, warmup_s=args.warmup,
                        new_tokens=tuple(args.new_tokens), max_orphans=args.max_orphans, seed=args.seed)
    model = None
    if args.uds_path:
        url = f"unix://{args.uds_path}-0"
        rss = (lambda: rss_bytes(args.server_pid)) if args.server_pid else None
        soak = Soak(url, config, rss)
        where = f"the shard on {url}"
    else:
        url, model, server = in_process_server(args.kv_cache_mib << 20)
        soak = Soak(url, config, rss_bytes, settle, live_objects, malloc_in_use)
        where = f"an in-process shard (embedded tiny Mixtral, fp32, {os.cpu_count()} CPUs)"
    figures = soak.run()
    rows = figures.rows()
    problems = [f"{figures[k]} {k}" for k in ("failed", "lost", "corrupted", "errors") if figures[k]]
    if model is not None:
        all_free = model.cache.all_free and not model.batches
        rows.append(("cache blocks all free, no batch left (engine)", str(all_free)))
        server.stop(grace=None)
        if not all_free:
            problems.append("cache blocks or batches left in the engine")
        if figures.objects["end"][1:] != figures.objects["warm"][1:]:
            problems.append("tensors alive after the warm-up: {} -> {}".format(figures.objects["warm"][1:],
                                                                              figures.objects["end"][1:]))
    from bench.common import print_table

    print_table(f"Soak of {where}: {args.clients} clients, {args.duration:.0f} s after {args.warmup:.0f} s of warm-up",
                ["figure", "value"], rows)
    for message in figures.errors:
        print("error:", message)
    if problems:
        print("FAILED:", "; ".join(problems))
    raise SystemExit(1 if problems else 0)

if __name__ == "__main__":
    main()
