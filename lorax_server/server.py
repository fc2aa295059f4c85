"""The LoRAX shard service (generate.v1.LoraxService) over a unix socket.

Every handler runs under one lock (one batch step at a time) and turns failures into gRPC statuses with
a message: bad input is INVALID_ARGUMENT, an unknown batch or adapter path NOT_FOUND, a full cache
RESOURCE_EXHAUSTED. The engine checks a request before it touches any state, so the server keeps
serving after any of them (a request that fails mid-step is dropped with its batch, freeing its blocks).
The kernel backends in use are logged at start-up and sent back as the
`lorax-backends` trailing metadata of `Info` (the wire format has no field for them).
"""

import contextlib
import logging
import threading
from concurrent import futures
from functools import wraps
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import grpc
import torch

from lorax_server.adapters.weights import AdapterError
from lorax_server.layers.backends import CHOSEN
from lorax_server.models.flash_causal_lm import Batch, BatchNotFound, RequestError, StepResult
from lorax_server.models.paged_cache import BlockInUse, CacheFull
from lorax_server.pb import generate_pb2 as pb
from lorax_server.pb import generate_pb2_grpc

logger = logging.getLogger(__name__)

STATUS_OF = (
    (BatchNotFound, grpc.StatusCode.NOT_FOUND),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CacheFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    ((RequestError, AdapterError, BlockInUse), grpc.StatusCode.INVALID_ARGUMENT),
)
FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS_TOKEN,
                  "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE}


def status_of(error: Exception) -> grpc.StatusCode:
    return next((code for kind, code in STATUS_OF if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


def rpc(handler):
    """Runs a handler under the service lock, on the model's GPU; any exception becomes a status with its message.

    gRPC runs handlers on its own threads, and a thread starts on GPU 0: without selecting the model's
    device, rank 1 of a sharded server would launch Triton kernels and capture CUDA graphs on GPU 0."""

    @wraps(handler)
    def wrapper(self, request, context):
        device = self.model.device
        try:
            with self.lock, torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                return handler(self, request, context)
        except Exception as error:  # every failure is answered, none takes the server down
            code = status_of(error)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("%s failed", handler.__name__)
            message = str(error) or type(error).__name__
        context.abort(code, message)

    return wrapper


# -- protobuf <-> engine ------------------------------------------------------------------------------


def sampling_params(p: pb.NextTokenChooserParameters):
    from lorax_server.utils.tokens import SamplingParams

    if p.watermark:
        raise NotImplementedError("watermarking is not supported")
    if p.HasField("schema"):
        raise NotImplementedError("structured generation (schema) is not supported")
    return SamplingParams(
        temperature=p.temperature or 1.0, top_k=p.top_k, top_p=p.top_p or 1.0, typical_p=p.typical_p or 1.0,
        do_sample=p.do_sample, seed=p.seed or None, repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        return_k_alternatives=p.return_k_alternatives,
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


def engine_requests(model, batch: pb.Batch):
    """pb.Batch -> (engine requests, {request id: router-allocated blocks}); refuses bad requests."""
    requests, router_blocks = [], {}
    for r in batch.requests:
        if r.cache_len or r.HasField("chunk_len"):
            raise NotImplementedError(f"request {r.id}: prefix caching / chunked prefill is not supported")
        ids = model.tokenize(r.inputs, list(r.tokenized_inputs.ids), r.truncate)
        stop = r.stopping_parameters
        requests.append(model.new_request(r.id, ids, sampling_params(r.parameters), stop.max_new_tokens,
                                          list(stop.stop_sequences), stop.ignore_eos_token, r.adapter_index,
                                          r.prefill_logprobs))
        if r.blocks:
            check_router_slots(r, len(ids), model.cache.block_size)
            router_blocks[r.id] = list(r.blocks)
    if len({r.id for r in requests}) != len(requests):
        raise RequestError("request ids in a batch must be unique")
    return requests, router_blocks


def next_tokens_pb(tokens) -> pb.NextTokens:
    return pb.NextTokens(
        ids=[t.id for t in tokens], logprobs=[t.logprob for t in tokens], texts=[t.text for t in tokens],
        is_special=[t.is_special for t in tokens],
        alternative_tokens=[pb.AlternativeTokens(ids=[a[0] for a in t.alternatives],
                                                 logprobs=[a[1] for a in t.alternatives],
                                                 texts=[a[2] for a in t.alternatives])
                            for t in tokens if t.alternatives],
    )


def generation_pb(result: StepResult) -> pb.Generation:
    generation = pb.Generation(request_id=result.request_id, next_tokens=next_tokens_pb([result.token]),
                               prefill_tokens_length=result.prompt_length)
    if result.prompt_tokens is not None:
        generation.prefill_tokens.CopyFrom(next_tokens_pb(result.prompt_tokens))
    if result.finish_reason:
        text = pb.GeneratedText(text=result.text, generated_tokens=len(result.generated_ids),
                                finish_reason=FINISH_REASONS[result.finish_reason])
        if result.seed is not None:
            text.seed = result.seed
        generation.generated_text.CopyFrom(text)
    return generation


def cached_batch_pb(batch: Optional[Batch]) -> Optional[pb.CachedBatch]:
    if batch is None:
        return None
    return pb.CachedBatch(id=batch.id, request_ids=[r.id for r in batch.requests], size=len(batch.requests),
                          max_tokens=batch.max_tokens, current_tokens=batch.current_tokens)


def local_adapter_dir(parameters: pb.AdapterParameters, source: int) -> Path:
    if source != pb.LOCAL:
        name = pb.AdapterSource.Name(source)
        raise NotImplementedError(f"adapter source {name} is not reachable from this server; use LOCAL paths")
    if len(parameters.adapter_ids) != 1:
        raise NotImplementedError(f"exactly one adapter id per request is supported (merging {len(parameters.adapter_ids)} "
                                  "adapters is not)")
    path = Path(parameters.adapter_ids[0])
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local PEFT adapter directory (no adapter_config.json)")
    return path


# -- the service --------------------------------------------------------------------------------------


class LoraxService(generate_pb2_grpc.LoraxServiceServicer):
    def __init__(self, model, urls: Sequence[str], preloaded: Sequence[Tuple[int, str]] = ()):
        self.model = model
        self.urls = list(urls)
        self.lock = threading.Lock()
        self.preloaded = list(preloaded)

    @rpc
    def Info(self, request, context):
        model = self.model
        context.set_trailing_metadata((("lorax-backends", ",".join(f"{k}={v}" for k, v in sorted(CHOSEN.items()))),))
        info = pb.InfoResponse(
            requires_padding=False, dtype=str(model.dtype).removeprefix("torch."), device_type=model.device.type,
            block_size=model.cache.block_size, speculate=0, supports_generation=True, supports_embeddings=False,
            supports_classification=False, chunked_prefill=False, requires_block_allocator=False,
            preloaded_adapters=[pb.PreloadedAdapter(adapter_parameters=pb.AdapterParameters(adapter_ids=[path]),
                                                    adapter_source=pb.LOCAL, adapter_index=index)
                                for index, path in self.preloaded],
        )
        if model.config.sliding_window is not None:
            info.window_size = model.config.sliding_window
        return info

    @rpc
    def Health(self, request, context):
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
        return pb.FilterBatchResponse(batch=cached_batch_pb(self.model.filter(request.batch_id, request.request_ids)))

    @rpc
    def Warmup(self, request, context):
        """Runs the router's warm-up batch once, gives everything back, captures the decode CUDA graphs (on a
        GPU) for the longest context the router will send, and reports the cache size."""
        requests, router_blocks = engine_requests(self.model, request.batch)
        self.model.prefill(request.batch.id, requests, router_blocks)
        self.model.clear(request.batch.id)
        if self.model.graphs is not None and request.max_input_length:
            self.model.graphs.prepare(request.max_input_length + request.max_new_tokens)
        return pb.WarmupResponse(max_supported_total_tokens=self.model.cache.num_blocks * self.model.cache.block_size)

    @rpc
    def Prefill(self, request, context):
        if request.HasField("cached_batch") and request.cached_batch.id not in self.model.batches:
            raise BatchNotFound(f"batch {request.cached_batch.id} is not in the cache")
        requests, router_blocks = engine_requests(self.model, request.batch)
        results, batch = self.model.prefill(request.batch.id, requests, router_blocks)
        if request.HasField("cached_batch"):  # new requests join a batch already decoding
            ids = [request.cached_batch.id] + ([batch.id] if batch is not None else [])
            batch = self.model.concatenate(ids)
        return pb.PrefillResponse(generations=[generation_pb(r) for r in results], batch=cached_batch_pb(batch))

    @rpc
    def Decode(self, request, context):
        results, batch = self.model.decode([b.id for b in request.batches])
        return pb.DecodeResponse(generations=[generation_pb(r) for r in results], batch=cached_batch_pb(batch))

    @rpc
    def Embed(self, request, context):
        raise NotImplementedError("this server generates text; Embed is not supported")

    @rpc
    def Classify(self, request, context):
        raise NotImplementedError("this server generates text; Classify is not supported")

    @rpc
    def DownloadAdapter(self, request, context):
        """Nothing to download: checks the local adapter and estimates its share of memory."""
        path = local_adapter_dir(request.adapter_parameters, request.adapter_source)
        size = sum(f.stat().st_size for f in path.glob("adapter_model.*"))
        weights = sum(p.numel() * p.element_size() for p in self.model.model.parameters())
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=size / max(weights, 1))

    @rpc
    def LoadAdapter(self, request, context):
        path = local_adapter_dir(request.adapter_parameters, request.adapter_source)
        self.model.adapters.load(request.adapter_index, path, str(path))
        return pb.LoadAdapterResponse(loaded=True)

    @rpc
    def OffloadAdapter(self, request, context):
        users = self.model.adapters_in_use().get(request.adapter_index)
        if users:
            raise RequestError(f"adapter index {request.adapter_index} is in use by requests {sorted(users)}")
        self.model.adapters.offload(request.adapter_index)
        return pb.OffloadAdapterResponse(offloaded=True)


def socket_urls(uds_path: str, world_size: int) -> List[str]:
    return [f"unix://{uds_path}-{rank}" for rank in range(world_size)]


def start_server(model, uds_path: str, rank: int = 0, world_size: int = 1, preloaded: Sequence[Tuple[int, str]] = ()):
    """Starts serving `model` on unix://{uds_path}-{rank}; returns (grpc server, service). Stop with server.stop()."""
    urls = socket_urls(uds_path, world_size)
    service = LoraxService(model, urls, preloaded)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    generate_pb2_grpc.add_LoraxServiceServicer_to_server(service, server)
    Path(uds_path).parent.mkdir(parents=True, exist_ok=True)
    server.add_insecure_port(urls[rank])
    server.start()
    logger.info("serving on %s; backends: %s", urls[rank], CHOSEN)
    return server, service
