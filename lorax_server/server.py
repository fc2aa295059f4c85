"""The LoRAX shard service (generate.v1.LoraxService) over a unix socket, answering as upstream's shard does.

Every handler runs under one lock (one batch step at a time) and turns failures into gRPC statuses with
a message: bad input is INVALID_ARGUMENT, an unknown batch or adapter path NOT_FOUND, a full cache
RESOURCE_EXHAUSTED. The engine checks a batch before it touches any state, so the server keeps serving
after any of them. One request never takes its batch down: a request this shard cannot serve (or that
fails mid-generation) ends alone with a final Generation that names the error (the protocol has no
per-request error, so the reason is its text), and its batch-mates go on. A failed Prefill would cost
more than its own batch: the router then fails its running batch too, and panics at the next Decode.
What the router sends and expects is in ../shared/LORAX_ROUTER.md.
The kernel backends in use are logged at start-up and sent back as the
`lorax-backends` trailing metadata of `Info` (the wire format has no field for them).
"""

import contextlib
import logging
import os
import socket
import stat
import threading
from concurrent import futures
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import grpc
import torch

from lorax_server.adapters.weights import AdapterError
from lorax_server.utils.backends import CHOSEN
from lorax_server.engine.cache import BlockInUse, CacheFull
from lorax_server.engine.requests import Batch, BatchNotFound, StepResult
from lorax_server.pb import generate_pb2 as pb
from lorax_server.pb import generate_pb2_grpc
from lorax_server.utils.errors import RequestError, bounded
from lorax_server.utils.sources import SourceError, resolve, source_name

logger = logging.getLogger(__name__)

STATUS_OF = (
    (BatchNotFound, grpc.StatusCode.NOT_FOUND),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CacheFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    ((RequestError, AdapterError, BlockInUse, SourceError), grpc.StatusCode.INVALID_ARGUMENT),
)
FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS_TOKEN,
                  "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
                  "error": pb.FINISH_REASON_EOS_TOKEN}  # no error reason on the wire: the text says it
BASE_MODEL_ADAPTER_ID = "__base_model__"  # how the router names the base model in the adapter RPCs


def status_of(error: Exception) -> grpc.StatusCode:
    return next((code for kind, code in STATUS_OF if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


ADVANCES_BATCHES = ("Prefill", "Decode")  # not run once their client has gone (`rpc`)


def rpc(handler):
    """Runs a handler under the service lock, on the model's GPU; any exception becomes a status with its message.

    gRPC runs handlers on its own threads, and a thread starts on GPU 0: without selecting the model's
    device, rank 1 of a sharded server would launch Triton kernels and capture CUDA graphs on GPU 0."""

    @wraps(handler)
    def wrapper(self, request, context):
        device = self.model.device
        try:
            with self.lock, torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                if handler.__name__ in ADVANCES_BATCHES and not context.is_active():
                    # its client gave up while it waited for the lock: a batch made or stepped now would be one
                    # the client never hears of (it clears or retries what it knows)
                    code, message = grpc.StatusCode.CANCELLED, "the client gave up on this call before it ran"
                else:
                    return handler(self, request, context)
        except Exception as error:  # every failure is answered, none takes the server down
            code = status_of(error)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", handler.__name__)
            message = bounded(str(error) or type(error).__name__)
        context.abort(code, message)

    return wrapper


# -- protobuf <-> engine ------------------------------------------------------------------------------


def sampling_params(p: pb.NextTokenChooserParameters):
    from lorax_server.utils.tokens import SamplingParams

    return SamplingParams(
        temperature=p.temperature or 1.0, top_k=p.top_k, top_p=p.top_p or 1.0, typical_p=p.typical_p or 1.0,
        do_sample=p.do_sample, seed=p.seed, repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        return_k_alternatives=p.return_k_alternatives, watermark=p.watermark,
    )


def check_router_slots(r: pb.Request, prompt_length: int, block_size: int) -> None:
    """Slots the router sent must be where the blocks it sent put the prompt's tokens."""
    if not r.slots:
        return
    blocks = list(r.blocks)
    expected = [blocks[p // block_size] * block_size + p % block_size
                for p in range(min(prompt_length, len(blocks) * block_size))]
    if list(r.slots)[:len(expected)] != expected or len(r.slots) < prompt_length:
        raise RequestError(f"request {r.id}: slots do not match its blocks for a block size of {block_size}")


@dataclass
class Admission:
    """A pb.Batch as the engine takes it: the requests it serves, the blocks the router gave them, and
    the final results of the requests it cannot serve (each ends alone)."""

    requests: list = field(default_factory=list)
    router_blocks: Dict[int, List[int]] = field(default_factory=dict)
    refused: List[StepResult] = field(default_factory=list)


def engine_request(model, r: pb.Request):
    """pb.Request -> the engine's Request. `cache_len` (prefix caching: prompt tokens its blocks already hold)
    and `chunk_len` (chunked prefill: prompt tokens its first step runs) are taken as upstream's shard takes them
    (server/lorax_server/models/flash_causal_lm.py:240-260)."""
    ids = model.tokenize(r.inputs, list(r.tokenized_inputs.ids), r.truncate)
    if r.blocks:
        check_router_slots(r, len(ids), model.cache.block_size)
    stop = r.stopping_parameters
    schema = r.parameters.schema if r.parameters.HasField("schema") else None
    return model.new_request(r.id, ids, sampling_params(r.parameters), stop.max_new_tokens,
                             list(stop.stop_sequences), stop.ignore_eos_token, r.adapter_index, r.prefill_logprobs,
                             schema, cache_len=r.cache_len if r.blocks else 0,
                             chunk_len=r.chunk_len if r.HasField("chunk_len") else None)


def admit(model, batch: pb.Batch, unique_ids: bool = True) -> Admission:
    """pb.Batch -> Admission. Only a malformed batch fails as a whole (INVALID_ARGUMENT): no requests, or
    repeated request ids (only the router's Warmup batch repeats one, and nothing else reads them)."""
    ids = [r.id for r in batch.requests]
    if not ids:
        raise RequestError("a batch needs at least one request")
    if unique_ids and len(set(ids)) != len(ids):
        raise RequestError(f"request ids in a batch must be unique, got {ids}")
    admission, live = Admission(), model.live_request_ids() if unique_ids else set()
    for r in batch.requests:
        try:
            if r.id in live:
                raise RequestError(f"request id {r.id} is already live in another batch")
            admission.requests.append(engine_request(model, r))
        except RequestError as error:
            admission.refused.append(model.failed(r.id, str(error)))
            continue
        except Exception as error:  # anything unforeseen in one request's set-up ends it alone, not the Prefill
            logger.exception("request %d could not be set up; it ends alone", r.id)
            admission.refused.append(model.failed(r.id, bounded(f"{type(error).__name__}: {error}")))
            continue
        if r.blocks:
            admission.router_blocks[r.id] = list(r.blocks)
    return admission


def log_refusals(results: Sequence[StepResult]) -> None:
    for result in results:
        if result.finish_reason == "error" and not result.generated_ids:
            logger.warning("refused alone, its batch goes on: %s", bounded(result.error))


def next_tokens_pb(tokens) -> pb.NextTokens:
    return pb.NextTokens(
        ids=[t.id for t in tokens], logprobs=[t.logprob for t in tokens], texts=[t.text for t in tokens],
        is_special=[t.is_special for t in tokens],
        alternative_tokens=[pb.AlternativeTokens(ids=[a[0] for a in t.alternatives],
                                                 logprobs=[a[1] for a in t.alternatives],
                                                 texts=[a[2] for a in t.alternatives])
                            for t in tokens if t.alternatives],
    )


def generated_text_pb(result: StepResult) -> pb.GeneratedText:
    if result.finish_reason == "error":
        return pb.GeneratedText(text=f"[error] {bounded(result.error)}",
                                generated_tokens=len(result.generated_ids) + 1, finish_reason=FINISH_REASONS["error"])
    text = pb.GeneratedText(text=result.text, generated_tokens=len(result.generated_ids),
                            finish_reason=FINISH_REASONS[result.finish_reason])
    if result.seed is not None:
        text.seed = result.seed
    return text


def generation_pb(result: StepResult) -> pb.Generation:
    generation = pb.Generation(request_id=result.request_id, next_tokens=next_tokens_pb([result.token]),
                               prefill_tokens_length=result.prompt_length)
    if result.prompt_tokens is not None:
        generation.prefill_tokens.CopyFrom(next_tokens_pb(result.prompt_tokens))
    if result.finish_reason:
        generation.generated_text.CopyFrom(generated_text_pb(result))
    return generation


def cached_batch_pb(batch: Optional[Batch], chunked_prefill: bool = False) -> Optional[pb.CachedBatch]:
    """With chunked prefill, current_tokens is what upstream reports and the router then budgets with: the tokens
    of the batch's next forward pass (Batch.next_step_tokens); otherwise the tokens its requests hold."""
    if batch is None:
        return None
    return pb.CachedBatch(id=batch.id, request_ids=[r.id for r in batch.requests], size=len(batch.requests),
                          max_tokens=batch.max_tokens,
                          current_tokens=batch.next_step_tokens if chunked_prefill else batch.current_tokens)


def is_base_model(parameters: pb.AdapterParameters) -> bool:
    return list(parameters.adapter_ids) == [BASE_MODEL_ADAPTER_ID]


def adapter_dir(adapter_id: str, source: int) -> Path:
    """The local PEFT directory of `adapter_id` from `source` (hub: a local directory or the HF cache)."""
    if adapter_id == BASE_MODEL_ADAPTER_ID:
        raise AdapterError(f"{BASE_MODEL_ADAPTER_ID} is the base model: it cannot be merged with adapters")
    if not adapter_id.strip():  # Path("") is the working directory: it must not be read as an adapter
        raise AdapterError("an adapter id is empty")
    try:
        path = resolve(adapter_id, source_name(source))
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_id} ({path}) is not a PEFT adapter directory (no adapter_config.json)")
    except (FileNotFoundError, SourceError):
        raise
    except OSError as error:  # a name too long, a permission denied...: the id cannot be read as a path
        # The reason first: a long id is what the bounded message cuts.
        raise AdapterError(f"{error.strerror or error}: adapter {adapter_id}") from None
    return path


def device_memory(model) -> int:
    """The bytes of the model's device: the GPU's memory, or RAM on a CPU."""
    if model.device.type == "cuda":
        return torch.cuda.get_device_properties(model.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def adapter_memory_budget(model) -> int:
    """Bytes set aside for adapters that the router loads: ADAPTER_MEMORY_FRACTION (upstream's variable,
    default 0.1) of the device's memory. The launcher sets it to 0 when adapters are preloaded."""
    return int(float(os.getenv("ADAPTER_MEMORY_FRACTION", "0.1")) * device_memory(model))


def adapter_file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("adapter_model.*"))


# -- the service --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preloaded:
    """An adapter loaded at start-up, reported in Info so the router maps its id to this index."""

    index: int
    adapter_id: str
    source: str = "local"  # utils/sources.py's names


def max_supported_total_tokens(model, request: pb.WarmupRequest) -> int:
    """Warmup's answer: the tokens the router may budget, so that every batch it forms is admitted.

    With its block allocator (no window) the router hands out blocks 1 .. answer/block_size - 1 itself
    (block 0 is its probe's), so the answer is the whole cache. Otherwise our engine allocates, and the
    router counts a new batch as n * longest prompt + sum of max_new_tokens, without the per-request
    rounding to blocks; one prefill budget of blocks is kept back for that rounding, which covers it
    whenever the longest prompt of a batch has at least block_size - 1 tokens."""
    cache = model.cache
    if model.config.sliding_window is None:
        return cache.num_blocks * cache.block_size
    headroom = cache.blocks_for(request.max_prefill_tokens) + len(cache.reserved)
    return max(0, cache.num_blocks - headroom) * cache.block_size


class LoraxService(generate_pb2_grpc.LoraxServiceServicer):
    def __init__(self, model, urls: Sequence[str], preloaded: Sequence = ()):
        self.model = model
        self.urls = list(urls)
        self.lock = threading.Lock()
        # (index, path) pairs are local directories; launch.py passes (index, adapter id, source).
        self.preloaded = [p if isinstance(p, Preloaded) else Preloaded(*p) for p in preloaded]

    @rpc
    def Info(self, request, context):
        model = self.model
        context.set_trailing_metadata((("lorax-backends", ",".join(f"{k}={v}" for k, v in sorted(CHOSEN.items()))),))
        info = pb.InfoResponse(
            requires_padding=False, dtype=str(model.dtype), device_type=model.device.type,
            block_size=model.cache.block_size, speculate=0, supports_generation=True, supports_embeddings=False,
            supports_classification=False, chunked_prefill=model.chunked_prefill,
            # The router's allocator lays a windowed request over a ring of blocks, which our kernels do not read.
            requires_block_allocator=model.config.sliding_window is None,
            preloaded_adapters=[pb.PreloadedAdapter(adapter_parameters=pb.AdapterParameters(adapter_ids=[p.adapter_id]),
                                                    adapter_source=pb.AdapterSource.Value(p.source.upper()),
                                                    adapter_index=p.index)
                                for p in self.preloaded],
        )
        if model.config.sliding_window is not None:
            info.window_size = model.config.sliding_window
        return info

    @rpc
    def Health(self, request, context):
        if self.model.device.type == "cuda":
            torch.zeros((2, 2), device=self.model.device)  # the device still takes work
        return pb.HealthResponse()

    @rpc
    def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    @rpc
    def ClearCache(self, request, context):
        self.model.clear(request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    @rpc
    def FilterBatch(self, request, context):
        if not request.request_ids:
            raise RequestError("FilterBatch must keep at least one request (use ClearCache to drop a batch)")
        kept = self.model.filter(request.batch_id, request.request_ids)
        return pb.FilterBatchResponse(batch=cached_batch_pb(kept, self.model.chunked_prefill))

    @rpc
    def Warmup(self, request, context):
        """Runs the router's warm-up batch once (its two requests share id 0), gives everything back,
        compiles the prefill kernels of short prompts and cached prefixes, captures the decode CUDA graphs
        (on a GPU) for the longest context the router will send, and
        reports how many tokens the router may budget."""
        before = self.model.max_prefill_tokens
        self.model.max_prefill_tokens = request.max_prefill_tokens or None  # upstream: set_max_prefill_tokens
        try:
            return self.warm_up(request)
        except Exception:
            self.model.max_prefill_tokens = before  # a refused Warmup leaves the budget as it was
            raise

    def warm_up(self, request) -> pb.WarmupResponse:
        admission = admit(self.model, request.batch, unique_ids=False)
        results = admission.refused
        if admission.requests:
            results = results + self.model.prefill(request.batch.id, admission.requests, admission.router_blocks)[0]
        self.model.clear(request.batch.id)
        failed = [r.error for r in results if r.finish_reason == "error"]
        if failed:  # the router exits with this message: nothing it sends later would be served either
            raise RequestError(f"the warm-up batch cannot be served: {'; '.join(failed)}")
        if self.model.batches:  # it writes free blocks: skipped beside live batches (the router clears first)
            logger.warning("Warmup with live batches: the prefill kernels compile at their first use instead")
        else:
            self.model.warm_up_kernels(request.max_prefill_tokens or None)
        if self.model.graphs is not None and request.max_input_length:
            self.model.graphs.prepare(request.max_input_length + request.max_new_tokens)
        supported = max_supported_total_tokens(self.model, request)
        needed = max(request.max_prefill_tokens, request.max_input_length + request.max_new_tokens)
        if supported < needed:
            raise CacheFull(f"the KV cache lets the router budget {supported} tokens, fewer than the "
                            f"{needed} its limits need: give the cache more memory or lower the router's limits")
        return pb.WarmupResponse(max_supported_total_tokens=supported)

    @rpc
    def Prefill(self, request, context):
        """With chunked prefill (Info.chunked_prefill) a `cached_batch` is stepped together with the new requests,
        as upstream's shard does (server/lorax_server/server.py:104-111): one forward pass runs the new prompts
        (or their first chunks), the next chunk of the cached batch's requests still prefilling, and the next
        token of its others; the result is the cached batch, grown. Without it, the new batch is prefilled and
        then joins the cached batch."""
        model, chunked = self.model, self.model.chunked_prefill
        cached = request.cached_batch.id if request.HasField("cached_batch") else None
        if cached is not None and cached not in model.batches:
            raise BatchNotFound(f"batch {cached} is not in the cache")
        admission = admit(model, request.batch)
        results, batch = admission.refused, None
        if admission.requests or (chunked and cached is not None):
            served, batch = model.prefill(request.batch.id, admission.requests, admission.router_blocks,
                                          cached_batch_id=cached if chunked else None)
            results = results + served
        log_refusals(results)
        if cached is not None and not chunked:  # new requests join a batch already decoding
            batch = model.concatenate([cached] + ([batch.id] if batch is not None else []))
        return pb.PrefillResponse(generations=[generation_pb(r) for r in results],
                                  batch=cached_batch_pb(batch, chunked))

    @rpc
    def Decode(self, request, context):
        results, batch = self.model.decode([b.id for b in request.batches])
        return pb.DecodeResponse(generations=[generation_pb(r) for r in results],
                                 batch=cached_batch_pb(batch, self.model.chunked_prefill))

    @rpc
    def Embed(self, request, context):
        raise NotImplementedError("this server generates text; Embed is not supported")

    @rpc
    def Classify(self, request, context):
        raise NotImplementedError("this server generates text; Classify is not supported")

    @rpc
    def DownloadAdapter(self, request, context):
        """Nothing to download (no hub is reachable): checks the adapters are here and sizes them against
        the adapter memory budget, which the router spends from (memory_fraction)."""
        parameters = request.adapter_parameters
        if is_base_model(parameters):
            return pb.DownloadAdapterResponse(downloaded=False)
        size = sum(adapter_file_bytes(adapter_dir(i, request.adapter_source)) for i in parameters.adapter_ids)
        if list(parameters.adapter_ids) in [[p.adapter_id] for p in self.preloaded]:  # already in memory
            return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=size / device_memory(self.model))
        budget = adapter_memory_budget(self.model)
        if budget <= 0:
            raise AdapterError("no memory is set aside for adapters (ADAPTER_MEMORY_FRACTION=0, as the launcher "
                               "sets it when adapters are preloaded): only the preloaded adapters are served")
        if size > budget:
            raise AdapterError(f"adapters {list(parameters.adapter_ids)} take {size} bytes, more than the "
                               f"{budget} set aside for adapters (ADAPTER_MEMORY_FRACTION)")
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=size / budget)

    @rpc
    def LoadAdapter(self, request, context):
        parameters, index = request.adapter_parameters, request.adapter_index
        if is_base_model(parameters):
            return pb.LoadAdapterResponse(loaded=False)
        if index in self.model.adapters.loaded:
            return pb.LoadAdapterResponse(loaded=True)
        ids = list(parameters.adapter_ids)
        if not ids:
            raise AdapterError("LoadAdapter names no adapter id")
        dirs = [adapter_dir(i, request.adapter_source) for i in ids]
        if len(ids) == 1:
            self.model.adapters.load(index, dirs[0], ids[0])
        else:
            self.model.adapters.load_merged(index, dirs, ",".join(ids), parameters.merge_strategy,
                                            list(parameters.weights), parameters.density,
                                            parameters.majority_sign_method)
        return pb.LoadAdapterResponse(loaded=True)

    @rpc
    def OffloadAdapter(self, request, context):
        index = request.adapter_index
        if is_base_model(request.adapter_parameters) or index not in self.model.adapters.loaded:
            return pb.OffloadAdapterResponse(offloaded=False)
        users = self.model.adapters_in_use().get(index)
        if users:
            raise RequestError(f"adapter index {index} is in use by requests {sorted(users)}")
        self.model.adapters.offload(index)
        return pb.OffloadAdapterResponse(offloaded=True)


# In-flight calls get this long to finish when the server stops (a step takes well under a second).
STOP_GRACE_S = 10.0


MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path on Linux holds 108 bytes, the last one a NUL


class SocketInUse(RuntimeError):
    """Another live server listens on the socket (or the path is not a socket at all)."""


def socket_urls(uds_path: str, world_size: int) -> List[str]:
    return [f"unix://{uds_path}-{rank}" for rank in range(world_size)]


def claim_socket(path: str) -> None:
    """Refuses a socket that a live server answers on; removes a stale one (left by a server that died).
    Binding over a live socket would silently take it from its server, which would keep running unreachable."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"the socket path {path} is longer than the {MAX_SOCKET_PATH_BYTES} bytes a unix socket "
                         f"takes: choose a shorter --uds-path")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket: choose another --uds-path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            logger.info("removed the stale socket %s", path)
            return
    raise SocketInUse(f"another server is listening on {path}: stop it or choose another --uds-path")


def stop_server(server, socket_path: str, grace: float = STOP_GRACE_S) -> None:
    """Takes no new calls, lets the ones in flight finish (at most `grace` seconds), removes the socket file."""
    server.stop(grace).wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    logger.info("stopped; %s removed", socket_path)


def start_server(model, uds_path: str, rank: int = 0, world_size: int = 1, preloaded: Sequence = ()):
    """Starts serving `model` on unix://{uds_path}-{rank}; returns (grpc server, service). Stop with server.stop().
    `preloaded`: Preloaded entries, or (index, adapter id, source) / (index, local path) tuples."""
    urls = socket_urls(uds_path, world_size)
    service = LoraxService(model, urls, preloaded)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generate_pb2_grpc.add_LoraxServiceServicer_to_server(service, server)
    Path(uds_path).parent.mkdir(parents=True, exist_ok=True)
    claim_socket(urls[rank].removeprefix("unix://"))
    server.add_insecure_port(urls[rank])
    server.start()
    logger.info("serving on %s; backends: %s", urls[rank], CHOSEN)
    return server, service
