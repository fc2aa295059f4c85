"""A Python emulation of LoRAX's Rust router, written from the upstream sources, to drive a shard over generate.v1.

Upstream: predibase/lorax @ a7394ba ("fix: make AlternativeToken.logprob optional (#785)"). Every behaviour below
cites the upstream file:line it reproduces; paths are relative to that repository. Nothing here is taken from this
project's shard code: only its generated gRPC stubs (lorax_server/pb) are used to speak the wire format, and
tests/compat/test_wire_upstream.py checks those stubs against a copy of upstream's proto/generate.proto.

What is emulated (the router's default configuration, as the launcher starts it):
  * start-up: router/src/main.rs:375-439 (ServiceDiscovery, ClearCache(None), Info, Warmup with
    router/client/src/client.rs:107-193's batch, the argument checks), then the k8s /startup probe's "Who?"
    generate (router/src/server.rs:488-590);
  * validation: router/src/validation.rs:196-410 (+ validate_input :115-192, prepare_input :592-638);
  * adapters: router/src/infer.rs:301-326 (index map), adapter.rs, queue.rs (AdapterQueuesState),
    loader.rs (download / load / offload / terminate), scheduler.rs:549-571 (update_adapters);
  * scheduling: router/src/scheduler.rs:283-546 (next_batch; block allocation only if
    !requires_padding && requires_block_allocator, scheduler.rs:229), block_allocator.rs:152-216 (SimpleAllocator),
    radix.rs:20-678 (RadixAllocator and its trie, with --prefix-caching: block_allocator.rs:96-100), chunk_len
    (scheduler.rs:420-456);
  * batching: router/src/infer.rs:1051-1248 (batching_task), :1251-1330 (prefill / decode, ClearCache after a
    failed RPC), :1447-1507 (filter_batch / filter_send_generations), :1510-1602 (send_responses),
    :1648-1662 (send_errors), router/src/batch.rs (BatchEntries);
  * health: router/src/health.rs:39-178.

Deviations, all deliberate and small: tokio tasks are Python threads; every RPC has a deadline (tonic sets none) so
that a wedged shard fails a test instead of hanging CI; a router panic (Cargo.toml:15 `panic = "abort"` kills the
router process) is turned into a RouterPanic error delivered to every live request; the HTTP layer is not emulated
(requests enter at Infer::generate / generate_stream).
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import math
import queue
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import grpc
from tokenizers import Tokenizer

from lorax_server.pb import generate_pb2 as pb
from lorax_server.pb import generate_pb2_grpc as pb_grpc

UPSTREAM_COMMIT = "a7394ba3"

# router/src/adapter.rs:10
BASE_MODEL_ADAPTER_ID = "__base_model__"
# router/src/health.rs:10-11 ("Request ids and batch ids cannot collide.")
LIVENESS_ID = 2**64 - 1
HEALTH_BATCH_ID = 2**64 - 1
U64_MAX = 2**64 - 1

# router/client/src/lib.rs:81 (a 20x20 PNG, sent with mimetype "image/jpeg;base64" by client.rs:129)
WARMUP_IMAGE_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABQAAAAUCAIAAAAC64paAAABg2lDQ1BJQ0MgcHJvZmlsZQAAKJF9kT1Iw0AcxV/TSotUROxQxCFDdbKLijjWKh"
    "ShQqgVWnUwufQLmrQkKS6OgmvBwY/FqoOLs64OroIg+AHi7OCk6CIl/i8ptIjx4Lgf7+497t4BQqvKNDOQADTdMjKppJjLr4rBVwQQwhAERGVm"
    "1uckKQ3P8XUPH1/v4jzL+9yfY0AtmAzwicQJVjcs4g3imU2rznmfOMLKskp8Tjxh0AWJH7muuPzGueSwwDMjRjYzTxwhFks9rPQwKxsa8TRxTN"
    "V0yhdyLquctzhr1Qbr3JO/MFzQV5a5TnMUKSxiCRJEKGiggiosxGnVSTGRof2kh3/E8UvkUshVASPHAmrQIDt+8D/43a1ZnJp0k8JJoO/Ftj/G"
    "gOAu0G7a9vexbbdPAP8zcKV3/bUWMPtJerOrxY6AwW3g4rqrKXvA5Q4QfarLhuxIfppCsQi8n9E35YHhW6B/ze2ts4/TByBLXaVvgINDYLxE2e"
    "se7w719vbvmU5/PycecohsjayNAAAACXBIWXMAAC4jAAAuIwF4pT92AAAAB3RJTUUH6AQIEQMnlTSSjwAAABl0RVh0Q29tbWVudABDcmVhdGVk"
    "IHdpdGggR0lNUFeBDhcAAAASSURBVDjLY2AYBaNgFIyCoQsABMQAAeRw1DoAAAAASUVORK5CYII="
)


# --------------------------------------------------------------------------------------------------------------------
# Errors (router/client/src/lib.rs:25-49, router/src/infer.rs InferError, router/src/validation.rs:680-)
# --------------------------------------------------------------------------------------------------------------------


class ClientError(Exception):
    """lorax_client::ClientError: a gRPC Status becomes Generation(status.message()) (client/src/lib.rs:35-41)."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None, method: str = ""):
        super().__init__(message)
        self.message = message
        self.code = code
        self.method = method

    def __str__(self):  # lib.rs:29-30 `#[error("Server error: {0}")]`
        return f"Server error: {self.message}"


class RouterError(Exception):
    """router/src/main.rs RouterError: the router process exits at start-up."""


class InferError(Exception):
    """router/src/infer.rs InferError (GenerationError, Overloaded, ValidationError, IncompleteGeneration, ...)."""


class GenerationError(InferError):
    pass


class IncompleteGeneration(InferError):
    def __init__(self):
        super().__init__("Incomplete generation")  # infer.rs:484 InferError::IncompleteGeneration


class ValidationError(InferError):
    pass


class Overloaded(InferError):
    pass


class RouterPanic(InferError):
    """The Rust router would panic here; with `panic = "abort"` (Cargo.toml:15) the whole router process dies."""


# --------------------------------------------------------------------------------------------------------------------
# User-facing request types (router/src/lib.rs:168-343)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterParameters:
    """router/src/lib.rs:83-99; hashed by value, as the adapter_to_index HashMap key (infer.rs:157)."""

    adapter_ids: Tuple[str, ...]
    weights: Tuple[float, ...] = ()
    merge_strategy: Optional[str] = None
    density: float = 0.0
    majority_sign_method: Optional[str] = None

    def to_pb(self) -> pb.AdapterParameters:
        # router/src/lib.rs:101-123: merge_strategy defaults to "linear", majority_sign_method to "total"
        return pb.AdapterParameters(
            adapter_ids=list(self.adapter_ids),
            weights=list(self.weights),
            merge_strategy=pb.MergeStrategy.Value((self.merge_strategy or "linear").upper()),
            density=self.density,
            majority_sign_method=pb.MajoritySignMethod.Value((self.majority_sign_method or "total").upper()),
        )


@dataclass
class GenerateParameters:
    """router/src/lib.rs:168-299 (serde defaults: None / false / empty)."""

    adapter_id: Optional[str] = None
    adapter_source: Optional[str] = None
    adapter_parameters: Optional[AdapterParameters] = None
    api_token: Optional[str] = None
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None
    do_sample: bool = False
    max_new_tokens: Optional[int] = None
    ignore_eos_token: bool = False
    return_full_text: Optional[bool] = None
    stop: List[str] = field(default_factory=list)
    truncate: Optional[int] = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: Optional[int] = None
    apply_chat_template: bool = False
    seed: Optional[int] = None
    # router/src/lib.rs:535-553: {"type": "json_object"|"json_schema", "schema": <json>}; a missing "schema" key
    # takes default_json_schema().
    response_format: Optional[Dict[str, Any]] = None


@dataclass
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters = field(default_factory=GenerateParameters)
    add_special_tokens: bool = True  # router/src/lib.rs:341-342 (default_true)


# router/src/lib.rs:545-553 (serde_json with "preserve_order", router/Cargo.toml:40: keys keep insertion order)
DEFAULT_JSON_SCHEMA = {
    "additionalProperties": {"type": ["object", "string", "integer", "number", "boolean", "null"]},
    "title": "ArbitraryJsonModel",
    "type": "object",
}


@dataclass
class Token:
    """router/src/lib.rs Token, built in infer.rs:1560-1578."""

    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: Any
    skipped: bool


@dataclass
class InferResponse:
    """router/src/infer.rs:1700- InferResponse (what Infer::generate returns, infer.rs:404-489)."""

    prefill: List[Tuple[int, str, float]]
    tokens: List[Token]
    prompt_tokens: int
    generated_text: pb.GeneratedText
    # Emulation metadata (not upstream-visible): the router's request id and adapter index.
    request_id: Optional[int] = None
    adapter_index: Optional[int] = None

    @property
    def text(self) -> str:
        return self.generated_text.text

    @property
    def token_ids(self) -> List[int]:
        return [t.id for t in self.tokens]


# --------------------------------------------------------------------------------------------------------------------
# Router arguments with the launcher's defaults
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RouterArgs:
    """The router's command line as launcher/src/main.rs:1446-1563 (spawn_webserver) builds it with defaults."""

    max_input_length: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_concurrent_requests: int = 1024  # launcher/src/main.rs:413
    max_best_of: int = 2  # launcher/src/main.rs:419
    max_stop_sequences: int = 4  # launcher/src/main.rs:427
    waiting_served_ratio: float = 1.2  # launcher/src/main.rs:460
    max_batch_total_tokens: Optional[int] = None  # launcher/src/main.rs:488 (only passed when set, :1508-1511)
    max_waiting_tokens: int = 20  # launcher/src/main.rs:507
    # launcher/src/main.rs:513 default Some(true) -> `--eager-prefill` (:1559-1561)
    eager_prefill: bool = True
    max_active_adapters: int = 1024  # launcher/src/main.rs:533
    adapter_cycle_time_s: float = 2.0  # launcher/src/main.rs:537
    # launcher/src/main.rs:316 `--adapter-source` default "hub", passed as the router's --adapter-source (:1486-1497)
    adapter_source: str = "hub"
    prefix_caching: bool = False  # launcher/src/main.rs:1563-1565 (only when set)
    validation_workers: int = 2  # launcher/src/main.rs:326-327 (irrelevant here: tokenization is synchronous)

    @classmethod
    def launcher_defaults(cls, model_dir, **overrides) -> "RouterArgs":
        """max_position_embeddings P from config.json (launcher/src/main.rs:27-57 get_config on a local dir);
        P > 4096 is capped to 4096 (:1685-1706); then max_input_length = P-1 (:1709-1717), max_total_tokens = P
        (:1719-1727), max_batch_prefill_tokens = max_input_length + 50 (:1729-1739)."""
        max_default = 4096
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
            p = config.get("max_position_embeddings")
        except (OSError, ValueError):
            p = None
        if p is None or p > max_default:
            p = max_default
        max_input = overrides.pop("max_input_length", p - 1)
        max_total = overrides.pop("max_total_tokens", p)
        max_prefill = overrides.pop("max_batch_prefill_tokens", max_input + 50)
        return cls(max_input_length=max_input, max_total_tokens=max_total, max_batch_prefill_tokens=max_prefill,
                   **overrides)


# --------------------------------------------------------------------------------------------------------------------
# gRPC clients (router/client/src/client.rs, sharded_client.rs)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RpcRecord:
    """One RPC as the shard saw it (emulation instrumentation, for the tests' assertions)."""

    seq: int
    t: float
    method: str
    shard: int
    request: Any
    response: Any = None
    error: Optional[ClientError] = None
    t_end: Optional[float] = None


class RpcLog:
    def __init__(self):
        self._lock = threading.Lock()
        self.records: List[RpcRecord] = []
        self._seq = itertools.count()

    def start(self, method, shard, request) -> RpcRecord:
        copy = type(request)()
        copy.CopyFrom(request)
        rec = RpcRecord(next(self._seq), time.monotonic(), method, shard, copy)
        with self._lock:
            self.records.append(rec)
        return rec

    def of(self, method: str) -> List[RpcRecord]:
        with self._lock:
            return [r for r in self.records if r.method == method]

    def snapshot(self) -> List[RpcRecord]:
        with self._lock:
            return list(self.records)

    def count(self, method: str) -> int:
        return len(self.of(method))

    def errors(self) -> List[RpcRecord]:
        with self._lock:
            return [r for r in self.records if r.error is not None]


class Client:
    """router/client/src/client.rs: one shard."""

    def __init__(self, path: str, shard: int, log: RpcLog, rpc_timeout: float):
        # client.rs:32-43 connect_uds: a tonic channel over tokio::net::UnixStream::connect(path)
        self.path = path
        self.shard = shard
        self.log = log
        self.rpc_timeout = rpc_timeout
        self.channel = grpc.insecure_channel(
            f"unix:{path}",
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        self.stub = pb_grpc.LoraxServiceStub(self.channel)
        # tonic's Channel::connect fails when nothing listens (main.rs:375-377 RouterError::Connection)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=30)
        except grpc.FutureTimeoutError as e:
            raise ClientError(f"Could not connect to LoRAX server: {path}") from e

    def close(self):
        self.channel.close()

    def _call(self, method: str, request):
        rec = self.log.start(method, self.shard, request)
        try:
            response = getattr(self.stub, method)(request, timeout=self.rpc_timeout)
        except grpc.RpcError as e:
            # client/src/lib.rs:35-41: From<Status> -> ClientError::Generation(status.message())
            rec.error = ClientError(e.details() or str(e.code()), e.code(), method)
            rec.t_end = time.monotonic()
            raise rec.error from None
        rec.response = response
        rec.t_end = time.monotonic()
        return response

    # client.rs:47-61: strips the "unix://" prefix of each url
    def service_discovery(self) -> List[str]:
        urls = self._call("ServiceDiscovery", pb.ServiceDiscoveryRequest()).urls
        return [u[len("unix://"):] if u.startswith("unix://") else u for u in urls]

    def info(self) -> pb.InfoResponse:  # client.rs:65-69
        return self._call("Info", pb.InfoRequest())

    def health(self) -> pb.HealthResponse:  # client.rs:73-77
        return self._call("Health", pb.HealthRequest())

    def clear_cache(self, batch_id: Optional[int]) -> None:  # client.rs:81-85
        req = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        self._call("ClearCache", req)

    def filter_batch(self, batch_id: int, request_ids: List[int]) -> Optional[pb.CachedBatch]:  # client.rs:89-101
        resp = self._call("FilterBatch", pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids))
        return resp.batch if resp.HasField("batch") else None

    def warmup(self, max_input_length: int, max_prefill_tokens: int, max_total_tokens: int) -> Optional[int]:
        """client.rs:107-193, field for field."""
        n_tokens = 0
        requests = []
        # client.rs:117: requests are added while n_tokens < max_prefill_tokens
        while n_tokens < max_prefill_tokens:
            # client.rs:119 "We truncate the input on the server side to be sure that it has the correct size"
            truncate_length = min(max_input_length, max_prefill_tokens - n_tokens)
            input_chunks = [pb.InputChunk(text="_test " * max_input_length)]  # client.rs:121-123
            if n_tokens == 0:  # client.rs:124-133: an image chunk on the first request only
                input_chunks.append(pb.InputChunk(image=pb.Image(
                    data=base64.b64decode(WARMUP_IMAGE_BASE64), mimetype="image/jpeg;base64")))
            requests.append(pb.Request(
                id=0,  # client.rs:136: every warmup request has id 0
                inputs="_test " * max_input_length,  # client.rs:137
                tokenized_inputs=pb.TokenizedInputs(ids=[], input_chunks=input_chunks),  # client.rs:138-141
                truncate=truncate_length,  # client.rs:142
                blocks=[], slots=[], cache_len=0,  # client.rs:143-147 (chunk_len None)
                parameters=pb.NextTokenChooserParameters(  # client.rs:148-163
                    temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=False, seed=0,
                    repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, watermark=True,
                    adapter_id="", return_k_alternatives=0),
                stopping_parameters=pb.StoppingCriteriaParameters(  # client.rs:164-168
                    max_new_tokens=max_total_tokens - truncate_length, stop_sequences=[], ignore_eos_token=False),
                adapter_index=0,  # client.rs:169
                prefill_logprobs=True,  # client.rs:170
            ))
            n_tokens += max_input_length  # client.rs:172
        batch = pb.Batch(id=0, size=len(requests), requests=requests, max_tokens=max_input_length,
                         max_blocks=0)  # client.rs:175-181
        request = pb.WarmupRequest(batch=batch, max_input_length=max_input_length,
                                   max_prefill_tokens=max_prefill_tokens,
                                   max_new_tokens=max_total_tokens - max_input_length)  # client.rs:183-190
        resp = self._call("Warmup", request)
        # client.rs:192 (an absent optional field is None)
        return resp.max_supported_total_tokens if resp.HasField("max_supported_total_tokens") else None

    def prefill(self, batch: pb.Batch, cached_batch: Optional[pb.CachedBatch]):  # client.rs:200-212
        req = pb.PrefillRequest(batch=batch)
        if cached_batch is not None:
            req.cached_batch.CopyFrom(cached_batch)
        resp = self._call("Prefill", req)
        return list(resp.generations), (resp.batch if resp.HasField("batch") else None)

    def decode(self, batches: List[pb.CachedBatch]):  # client.rs:219-226
        resp = self._call("Decode", pb.DecodeRequest(batches=batches))
        return list(resp.generations), (resp.batch if resp.HasField("batch") else None)

    def download_adapter(self, params: pb.AdapterParameters, source: str, api_token: Optional[str]):
        # client.rs:245-271: AdapterSource::from_str_name(source.to_uppercase())
        try:
            src = pb.AdapterSource.Value(source.upper())
        except ValueError:
            raise ClientError(f"Invalid source '{source}' when downloading adapter "
                              f"'{','.join(params.adapter_ids)}'") from None
        req = pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=src)
        if api_token is not None:
            req.api_token = api_token
        return self._call("DownloadAdapter", req)

    def load_adapter(self, params, source: str, adapter_index: int, api_token: Optional[str]) -> bool:
        # client.rs:274-302
        try:
            src = pb.AdapterSource.Value(source.upper())
        except ValueError:
            raise ClientError(f"Invalid source '{source}' when loading adapter "
                              f"'{','.join(params.adapter_ids)}'") from None
        req = pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=src, adapter_index=adapter_index)
        if api_token is not None:
            req.api_token = api_token
        return self._call("LoadAdapter", req).loaded

    def offload_adapter(self, params, source: str, adapter_index: int) -> bool:  # client.rs:305-330
        try:
            src = pb.AdapterSource.Value(source.upper())
        except ValueError:
            raise ClientError(f"Invalid source '{source}' when loading adapter "
                              f"'{','.join(params.adapter_ids)}'") from None
        req = pb.OffloadAdapterRequest(adapter_parameters=params, adapter_source=src, adapter_index=adapter_index)
        return self._call("OffloadAdapter", req).offloaded


class ShardedClient:
    """router/client/src/sharded_client.rs: the same call on every shard (join_all), results merged."""

    def __init__(self, clients: List[Client]):
        self.clients = clients
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(clients)))

    @classmethod
    def connect_uds(cls, path: str, log: RpcLog, rpc_timeout: float) -> "ShardedClient":
        # sharded_client.rs:40-43 + :25-31 from_master_client: ServiceDiscovery on the master, connect to every url
        master = Client(path, 0, log, rpc_timeout)
        try:
            uris = master.service_discovery()
        finally:
            master.close()
        return cls([Client(u, i, log, rpc_timeout) for i, u in enumerate(uris)])

    def close(self):
        for c in self.clients:
            c.close()
        self._pool.shutdown(wait=False)

    def _join_all(self, fn) -> List[Tuple[Any, Optional[Exception]]]:
        # futures::future::join_all: every shard is called concurrently, all results are awaited
        futs = [self._pool.submit(fn, c) for c in self.clients]
        out = []
        for f in futs:
            try:
                out.append((f.result(), None))
            except ClientError as e:
                out.append((None, e))
        return out

    @staticmethod
    def _collect(results):
        # `.collect::<Result<Vec<_>>>()`: the first error (in shard order) wins
        for _, err in results:
            if err is not None:
                raise err
        return [r for r, _ in results]

    def info(self) -> pb.InfoResponse:  # sharded_client.rs:47-54: join_all(...).pop().unwrap() (the last shard)
        value, err = self._join_all(lambda c: c.info())[-1]
        if err is not None:
            raise err
        return value

    def health(self):  # sharded_client.rs:58-65 (the last shard's result)
        value, err = self._join_all(lambda c: c.health())[-1]
        if err is not None:
            raise err
        return value

    def clear_cache(self, batch_id: Optional[int]) -> None:  # sharded_client.rs:69-76
        self._collect(self._join_all(lambda c: c.clear_cache(batch_id)))

    def filter_batch(self, batch_id: int, request_ids: List[int]):  # sharded_client.rs:80-92 (last shard)
        value, err = self._join_all(lambda c: c.filter_batch(batch_id, list(request_ids)))[-1]
        if err is not None:
            raise err
        return value

    def warmup(self, max_input_length, max_prefill_tokens, max_total_tokens) -> Optional[int]:
        # sharded_client.rs:98-117: any error fails; the minimum of the Some values
        results = self._collect(self._join_all(
            lambda c: c.warmup(max_input_length, max_prefill_tokens, max_total_tokens)))
        values = [r for r in results if r is not None]
        return min(values) if values else None

    @staticmethod
    def _merge_generations(results):
        # sharded_client.rs:264-273: the last shard's (generations, batch), other shards' generations appended
        generations, next_batch = results.pop()
        for shard_generations, _ in results:
            generations.extend(shard_generations)
        return generations, next_batch

    def prefill(self, batch: pb.Batch, cached_batch: Optional[pb.CachedBatch]):  # sharded_client.rs:124-137
        return self._merge_generations(self._collect(self._join_all(lambda c: c.prefill(batch, cached_batch))))

    def decode(self, batches: List[pb.CachedBatch]):  # sharded_client.rs:144-156
        return self._merge_generations(self._collect(self._join_all(lambda c: c.decode(batches))))

    def download_adapter(self, params, source, api_token):
        # sharded_client.rs:184-194: "Only download the adapter with one client, since they share a single disk"
        return self.clients[0].download_adapter(params, source, api_token)

    def load_adapter(self, params, source, index, api_token) -> bool:  # sharded_client.rs:196-228
        return self._collect(self._join_all(lambda c: c.load_adapter(params, source, index, api_token)))[-1]

    def offload_adapter(self, params, source, index) -> bool:  # sharded_client.rs:230-260
        return self._collect(self._join_all(lambda c: c.offload_adapter(params, source, index)))[-1]


# --------------------------------------------------------------------------------------------------------------------
# Entries, adapters, queues (router/src/batch.rs, adapter.rs, queue.rs)
# --------------------------------------------------------------------------------------------------------------------


class Notify:
    """tokio::sync::Notify: notify_one() stores a single permit when nobody waits (queue.rs:31-34)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._permit = False

    def notify_one(self):
        with self._cv:
            self._permit = True
            self._cv.notify()

    def notified(self, timeout: float) -> bool:
        with self._cv:
            if not self._permit:
                self._cv.wait(timeout)
            if self._permit:
                self._permit = False
                return True
            return False


class Adapter:
    """router/src/adapter.rs:12-73: equality and hash by index only."""

    def __init__(self, params: AdapterParameters, source: str, index: int, api_token: Optional[str]):
        self.params = params
        self.source = source
        self.index = index
        self.api_token = api_token

    def __hash__(self):  # adapter.rs:61-65
        return hash(self.index)

    def __eq__(self, other):  # adapter.rs:69-73
        return isinstance(other, Adapter) and self.index == other.index

    def as_string(self) -> str:  # adapter.rs:55-58
        return f"{self.source}:{','.join(self.params.adapter_ids)}"

    def __repr__(self):
        return f"Adapter({self.as_string()}#{self.index})"


def extract_adapter_params(adapter_id, adapter_source, adapter_parameters, default_source):
    """router/src/adapter.rs:75-94."""
    if adapter_id is None or adapter_id == "":
        adapter_id = BASE_MODEL_ADAPTER_ID
    if adapter_source is None:
        adapter_source = default_source  # DEFAULT_ADAPTER_SOURCE (server.rs:1601-1605)
    if adapter_parameters is None:
        adapter_parameters = AdapterParameters(adapter_ids=(adapter_id,))
    return adapter_source, adapter_parameters


@dataclass
class ValidGenerateRequest:
    """router/src/batch.rs:152-162."""

    inputs: str
    tokenized_inputs: Optional[pb.TokenizedInputs]
    input_length: int
    truncate: int
    decoder_input_details: bool
    parameters: pb.NextTokenChooserParameters
    stopping_parameters: pb.StoppingCriteriaParameters
    adapter: Adapter

    def max_new_tokens(self) -> int:  # batch.rs:51-53
        return self.stopping_parameters.max_new_tokens

    def input_ids(self):  # batch.rs:43-49
        return list(self.tokenized_inputs.ids) if self.tokenized_inputs is not None else None


_CLOSED = object()


class Entry:
    """router/src/batch.rs:164-183. Dropping an Entry closes its response channel (the receiving generate() then
    ends its stream) and, through BlockAllocation's Drop (block_allocator.rs:19-25), frees its blocks."""

    def __init__(self, router: "Router", request: ValidGenerateRequest):
        self.router = router
        self.request = request
        self.responses: "queue.Queue" = queue.Queue()
        self.queue_time = time.monotonic()
        self.batch_time: Optional[float] = None
        self._block_allocation: Optional[BlockAllocation] = None
        self.id: Optional[int] = None
        self._dropped = False

    @property
    def block_allocation(self):
        return self._block_allocation

    @block_allocation.setter
    def block_allocation(self, value):
        # Assigning drops the previous value (Rust move semantics)
        if self._block_allocation is not None and self._block_allocation is not value:
            self._block_allocation.drop()
        self._block_allocation = value

    def send(self, message) -> None:
        if not self._dropped:
            self.responses.put(message)

    def drop(self) -> None:
        if self._dropped:
            return
        self._dropped = True
        if self._block_allocation is not None:
            self._block_allocation.drop()
        self.responses.put(_CLOSED)
        self.router._live_entries.pop(id(self), None)


class QueueState:
    """router/src/queue.rs:36-144."""

    def __init__(self, adapter: Adapter, event: Notify):
        self.entries: deque = deque()
        self.adapter = adapter
        self.status = "Downloading"  # queue.rs:60
        self.cost: Optional[float] = None
        self.activation_ts: Optional[float] = None
        self.event = event

    def append(self, entry_id, entry):
        self.entries.append((entry_id, entry))

    def push_front(self, entry_id, entry):
        self.entries.appendleft((entry_id, entry))

    def is_empty(self):
        return not self.entries

    def peek(self) -> Optional[float]:  # queue.rs:92-94
        return self.entries[0][1].queue_time if self.entries else None

    def pop(self):
        return self.entries.popleft() if self.entries else None

    def set_status(self, status: str):  # queue.rs:115-123: also wakes the batching task
        self.status = status
        self.event.notify_one()


class AdapterQueuesState:
    """router/src/queue.rs:146-468."""

    def __init__(self, max_active_adapters: int, adapter_cycle_time_s: float):
        self.queue_map: Dict[Adapter, QueueState] = {}
        self.pending_adapters: deque = deque()
        self.active_adapters: deque = deque()
        self.tracked_adapters: set = set()
        self.max_active_adapters = max_active_adapters
        self.memory_budget_remaining = 1.0  # queue.rs:186
        self.max_active_time = adapter_cycle_time_s
        self.next_id = 0  # queue.rs:188: request ids come from this one counter

    def append(self, adapter: Adapter, event: Notify, entry: Entry) -> bool:  # queue.rs:193-221
        download = False
        if adapter not in self.queue_map:
            self.queue_map[adapter] = QueueState(adapter, event)
            download = True
        if adapter not in self.tracked_adapters:
            self.tracked_adapters.add(adapter)
            self.pending_adapters.append(adapter)
        self.queue_map[adapter].append(self.next_id, entry)
        entry.id = self.next_id
        self.next_id += 1
        return download

    def remove(self, adapter):  # queue.rs:224-229
        self.queue_map.pop(adapter, None)
        self.active_adapters = deque(a for a in self.active_adapters if a != adapter)
        self.pending_adapters = deque(a for a in self.pending_adapters if a != adapter)
        self.tracked_adapters.discard(adapter)

    def untrack(self, adapter):  # queue.rs:232-236
        self.active_adapters = deque(a for a in self.active_adapters if a != adapter)
        self.pending_adapters = deque(a for a in self.pending_adapters if a != adapter)
        self.tracked_adapters.discard(adapter)

    def has_adapter(self, adapter) -> bool:
        return adapter in self.queue_map

    def get_errored_adapters(self):  # queue.rs:243-251
        return [a for a, q in self.queue_map.items() if q.status == "Errored"]

    def set_cost(self, adapter, cost):  # queue.rs:253-262 (unwrap: panics on a missing adapter)
        if adapter not in self.queue_map:
            raise RouterPanic(f"adapter {adapter.as_string()} not found in queue_map")
        self.queue_map[adapter].cost = cost

    def set_status(self, adapter, status):  # queue.rs:264-273
        if adapter not in self.queue_map:
            raise RouterPanic(f"adapter {adapter.as_string()} not found in queue_map")
        self.queue_map[adapter].set_status(status)

    def push_front(self, adapter, entry_id, entry):  # queue.rs:275-278
        self.queue_map[adapter].push_front(entry_id, entry)

    def drain(self, adapter):  # queue.rs:280-286
        q = self.queue_map[adapter]
        out = list(q.entries)
        q.entries.clear()
        return out

    def len(self) -> int:  # queue.rs:288-293
        return sum(len(q.entries) for q in self.queue_map.values())

    def active_len(self) -> int:
        return len(self.active_adapters)

    def get_oldest_active_adapter(self) -> Optional[Adapter]:  # queue.rs:299-335
        now = time.monotonic()
        oldest_adapter, oldest_ts = None, now
        oldest_within, oldest_within_ts = None, now
        for adapter in self.active_adapters:
            q = self.queue_map[adapter]
            if q.is_empty() or q.status != "Ready":
                continue
            ts = q.peek()
            if ts is not None:
                if ts < oldest_ts:
                    oldest_ts, oldest_adapter = ts, adapter
                if ts < oldest_within_ts and now - q.activation_ts < self.max_active_time:
                    oldest_within_ts, oldest_within = ts, adapter
        return oldest_within if oldest_within is not None else oldest_adapter

    def update_adapters(self, adapters_in_use: set):  # queue.rs:338-451
        offload_adapters, load_adapters = [], []
        now = time.monotonic()
        to_remove = set()
        # queue.rs:349-371: idle active adapters make room, but only for pending ones
        for adapter in self.active_adapters:
            q = self.queue_map[adapter]
            if q.adapter in adapters_in_use:
                continue
            if len(self.pending_adapters) <= len(to_remove):
                continue
            if not q.entries:
                to_remove.add(adapter)
                offload_adapters.append(adapter)
        self.active_adapters = deque(a for a in self.active_adapters if a not in to_remove)
        self.tracked_adapters = {a for a in self.tracked_adapters if a not in to_remove}
        # queue.rs:379-395: the front adapter, active past the cycle time, goes back to pending
        if self.active_adapters:
            adapter = self.active_adapters[0]
            q = self.queue_map[adapter]
            if (q.adapter not in adapters_in_use and now - q.activation_ts > self.max_active_time
                    and len(self.pending_adapters) >= 1):
                self.active_adapters.popleft()
                self.pending_adapters.append(adapter)
                offload_adapters.append(adapter)
        # queue.rs:398-408: offloaded adapters give their cost back (cost().unwrap())
        for adapter in offload_adapters:
            cost = self.queue_map[adapter].cost
            if cost is None:
                raise RouterPanic(f"offloading adapter {adapter.as_string()} without a cost")
            self.memory_budget_remaining += cost
        # queue.rs:411-448: pending adapters become active while the count and the memory budget allow
        while len(self.active_adapters) < self.max_active_adapters and self.pending_adapters:
            q = self.queue_map[self.pending_adapters[0]]
            if q.cost is None:  # not downloaded yet
                break
            if q.cost > self.memory_budget_remaining:  # too expensive to load
                break
            adapter = self.pending_adapters.popleft()
            q.activation_ts = now
            self.memory_budget_remaining -= q.cost
            load_adapters.append(adapter)
            self.active_adapters.append(adapter)
        return offload_adapters, load_adapters

    def next_entry(self):  # queue.rs:453-467
        adapter = self.get_oldest_active_adapter()
        if adapter is None:
            return None
        entry_id, entry = self.queue_map[adapter].pop()
        return entry_id, entry, adapter


# --------------------------------------------------------------------------------------------------------------------
# Adapter loader (router/src/loader.rs)
# --------------------------------------------------------------------------------------------------------------------


class AdapterLoader:
    """router/src/loader.rs:117-301: one background task runs the commands one after the other."""

    def __init__(self, router: "Router"):
        self.router = router
        self.commands: "queue.Queue" = queue.Queue()
        self.err_msgs: Dict[Adapter, str] = {}
        self.thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
        self.thread.start()

    def download_adapter(self, adapter):  # loader.rs:26-44 (does not block the caller)
        self.commands.put(("download", adapter))

    def load_adapter(self, adapter):  # loader.rs:46-64
        self.commands.put(("load", adapter))

    def offload_adapter(self, adapter):  # loader.rs:66-84
        self.commands.put(("offload", adapter))

    def terminate(self, adapter):  # loader.rs:100-114
        self.commands.put(("terminate", adapter))

    def stop(self):
        self.commands.put(None)

    def _run(self):
        r = self.router
        while True:
            cmd = self.commands.get()
            if cmd is None:
                return
            kind, adapter = cmd
            try:
                with r._qlock:
                    if r._aborted:
                        continue
                if kind == "download":
                    self._download(adapter)
                elif kind == "load":
                    self._load(adapter)
                elif kind == "offload":
                    self._offload(adapter)
                elif kind == "terminate":
                    self._terminate(adapter)
            except RouterPanic as e:
                r._abort(f"adapter loader panicked: {e}")
            except Exception as e:  # pragma: no cover - emulation bug
                r._abort(f"adapter loader crashed: {e!r}\n{traceback.format_exc()}")

    def _mark_errored(self, adapter, message: Optional[str] = None, must_exist: bool = False) -> None:
        """The adapter's queue turns Errored (when it still exists, unless `must_exist`: then a missing one
        panics in set_status, as upstream's unwrap does); `message` is kept for its requests."""
        r = self.router
        with r._qlock:
            if must_exist or r.queues_state.has_adapter(adapter):
                r.queues_state.set_status(adapter, "Errored")
        if message is not None:
            self.err_msgs[adapter] = message

    def _download(self, adapter):  # loader.rs:126-174
        r = self.router
        if adapter in self.err_msgs:
            self._mark_errored(adapter)
            return
        try:
            resp = r.client.download_adapter(adapter.params.to_pb(), adapter.source, adapter.api_token)
        except ClientError as e:
            self._mark_errored(adapter, str(e))
            return
        with r._qlock:
            if r.queues_state.has_adapter(adapter):
                r.queues_state.set_cost(adapter, resp.memory_fraction)  # loader.rs:157
                r.queues_state.set_status(adapter, "Downloaded")

    def _load(self, adapter):  # loader.rs:175-219
        r = self.router
        if adapter in self.err_msgs:
            self._mark_errored(adapter)
            return
        try:
            r.client.load_adapter(adapter.params.to_pb(), adapter.source, adapter.index, adapter.api_token)
        except ClientError as e:
            self._mark_errored(adapter, str(e), must_exist=True)  # loader.rs:211-214 (unwrap inside set_status)
            return
        with r._qlock:
            # loader.rs:199-205: the answer's `loaded` value is ignored; any Ok makes the adapter Ready
            r.queues_state.set_status(adapter, "Ready")

    def _offload(self, adapter):  # loader.rs:220-263
        r = self.router
        if adapter in self.err_msgs:
            self._mark_errored(adapter)
            return
        try:
            r.client.offload_adapter(adapter.params.to_pb(), adapter.source, adapter.index)
        except ClientError as e:
            self._mark_errored(adapter, str(e), must_exist=True)
            return
        with r._qlock:
            r.queues_state.set_status(adapter, "Downloaded")  # loader.rs:243-249

    def _terminate(self, adapter):  # loader.rs:273-298
        r = self.router
        with r._qlock:
            if not r.queues_state.has_adapter(adapter):
                self.err_msgs.pop(adapter, None)
                return
            for _, entry in r.queues_state.drain(adapter):
                msg = self.err_msgs.get(adapter)
                if msg is not None:
                    entry.send(("error", GenerationError(msg)))
                entry.drop()
            self.err_msgs.pop(adapter, None)
            r.queues_state.remove(adapter)


# --------------------------------------------------------------------------------------------------------------------
# Block allocation (router/src/block_allocator.rs; used only if !requires_padding && requires_block_allocator)
# --------------------------------------------------------------------------------------------------------------------


class BlockAllocation:
    def __init__(self, allocator, blocks: List[int], slots: List[int], prefix_len: int = 0, allocation_id: int = 0):
        self.allocator = allocator
        self.blocks = blocks
        self.slots = slots
        self.prefix_len = prefix_len
        self.allocation_id = allocation_id
        self._freed = False

    def drop(self):  # block_allocator.rs:19-25: Drop frees the blocks
        if not self._freed:
            self._freed = True
            self.allocator.free(self.blocks, self.allocation_id)


class SimpleAllocator:
    """router/src/block_allocator.rs:146-216 (the allocator without --prefix-caching, block_allocator.rs:96-100)."""

    def __init__(self, max_batch_total_tokens: int, block_size: int, window_size: Optional[int]):
        blocks = max_batch_total_tokens // block_size  # block_allocator.rs:45
        self.block_size = block_size
        self.window_size = window_size
        self.free_blocks = list(range(1, blocks))  # block_allocator.rs:156-157 "Block 0 is reserved for health checks"
        self._lock = threading.Lock()

    def allocate(self, adapter_index: int, tokens: int, prefill_tokens=None) -> Optional[BlockAllocation]:
        with self._lock:  # block_allocator.rs:164-211
            if self.window_size is None:
                t, repeats = tokens, 1
            else:
                repeats = (tokens + self.window_size - 1) // self.window_size
                t = min(tokens, self.window_size)
            required_blocks = (t + self.block_size - 1) // self.block_size
            if required_blocks > len(self.free_blocks):
                return None
            cut = len(self.free_blocks) - required_blocks
            blocks = self.free_blocks[cut:]  # Vec::split_off: the last required_blocks blocks
            del self.free_blocks[cut:]
            slots = []
            done = False
            for block_id in blocks * repeats:
                for s in range(block_id * self.block_size, (block_id + 1) * self.block_size):
                    slots.append(s)
                    if len(slots) == tokens:
                        done = True
                        break
                if done:
                    break
            return BlockAllocation(self, blocks, slots, 0)

    def free(self, blocks, allocation_id: int = 0):  # block_allocator.rs:213-215
        with self._lock:
            self.free_blocks.extend(blocks)


class TrieNode:  # router/src/radix.rs:648-670
    def __init__(self, key: List[int], blocks: List[int], last_accessed: int, parent):
        self.key, self.blocks, self.last_accessed, self.parent = key, blocks, last_accessed, parent
        self.children: Dict[tuple, int] = {}
        self.ref_count = 0


class RadixTrie:
    """router/src/radix.rs:249-646, line for line (a node's first block of tokens keys it in its parent; Rust hashes
    that block, here the tuple itself is the key). Its quirks are kept: e.g. `find` returns the parent, not the
    child, when the key ends exactly at a child's end (:318-337)."""

    def __init__(self, block_size: int):
        self.roots: Dict[int, int] = {}
        self.leaves: set = set()  # (last_accessed, node id); BTreeSet ordered by recency
        self.nodes: Dict[int, TrieNode] = {}
        self.ids = itertools.count()
        self.time = 0
        self.block_size = block_size

    def find(self, adapter_index: int, key: List[int], blocks: List[int]) -> int:  # :312-315
        self.time += 1
        return self._find(self.root_id(adapter_index), key, blocks)

    def _find(self, node_id: int, key: List[int], blocks: List[int]) -> int:  # :318-338
        node = self.nodes[node_id]
        if len(key) >= self.block_size:
            child_id = node.children.get(tuple(key[:self.block_size]))
            if child_id is not None:
                self.update_access_time(child_id)
                child = self.nodes[child_id]
                shared = shared_prefix(child.key, key, self.block_size)
                blocks.extend(child.blocks[:shared // self.block_size])
                key = key[shared:]
                if key:
                    node_id = self._find(child_id, key, blocks)
        return node_id

    def decref(self, node_id: int) -> None:  # :341-367
        if self.is_root(node_id):
            return
        node = self.nodes[node_id]
        assert node.ref_count > 0, "RefCountUnderflow"
        node.ref_count -= 1
        if node.ref_count == 0:
            assert not node.children, "Nodes with children must have refcount > 0"
            self.leaves.add((node.last_accessed, node_id))

    def incref(self, node_id: int) -> None:  # :370-385
        if self.is_root(node_id):
            return
        node = self.nodes[node_id]
        if node.ref_count == 0:
            self.leaves.discard((node.last_accessed, node_id))
        node.ref_count += 1

    def evict(self, n_blocks: int) -> List[int]:  # :391-437
        evicted: List[int] = []
        while self.leaves:
            last_access, node_id = min(self.leaves)  # BTreeSet::pop_first
            self.leaves.remove((last_access, node_id))
            blocks_needed = max(n_blocks - len(evicted), 0)
            node = self.nodes[node_id]
            assert node.ref_count == 0, f"Leaf must have refcount of 0, got {node.ref_count}"
            if blocks_needed >= len(node.blocks):
                evicted.extend(self.remove_node(node_id).blocks)
                if len(evicted) >= n_blocks:
                    break
            else:
                truncate_blocks = len(node.blocks) - blocks_needed
                node.key = node.key[:truncate_blocks * self.block_size]
                evicted.extend(node.blocks[truncate_blocks:])
                node.blocks = node.blocks[:truncate_blocks]
                self.leaves.add((last_access, node_id))
                break
        return evicted

    def insert(self, adapter_index: int, tokens: List[int], blocks: List[int]) -> int:  # :444-454
        self.time += 1
        return self._insert(self.get_or_create_root(adapter_index), tokens, blocks)

    def _insert(self, node_id: int, tokens: List[int], blocks: List[int]) -> int:  # :457-505
        assert len(tokens) == len(blocks) * self.block_size
        child_id = self.nodes[node_id].children.get(tuple(tokens[:self.block_size]))
        if child_id is None:
            self.add_node(node_id, tokens, blocks)
            return 0
        self.update_access_time(child_id)
        child = self.nodes[child_id]
        shared = shared_prefix(child.key, tokens, self.block_size)
        if shared == len(tokens) or shared == 0:
            return shared
        if shared == len(child.key):
            return shared + self._insert(child_id, tokens[shared:], blocks[shared // self.block_size:])
        child_id = self.split_node(child_id, shared)
        return shared + self._insert(child_id, tokens[shared:], blocks[shared // self.block_size:])

    def split_node(self, node_id: int, prefix_len: int) -> int:  # :507-540
        node = self.nodes[node_id]
        prefix_blocks = prefix_len // self.block_size
        parent_key, parent_blocks = node.key[:prefix_len], node.blocks[:prefix_blocks]
        node.key, node.blocks = node.key[prefix_len:], node.blocks[prefix_blocks:]
        node_key = tuple(node.key[:self.block_size])
        grandparent_id = node.parent
        parent_id = self.add_node(grandparent_id, parent_key, parent_blocks)
        self.add_node_to_parent(parent_id, node_key, node_id)
        node.parent = parent_id
        return parent_id

    def add_node(self, parent_id: int, key: List[int], blocks: List[int]) -> int:  # :543-560
        first = tuple(key[:self.block_size])
        child_id = next(self.ids)
        self.nodes[child_id] = TrieNode(list(key), list(blocks), self.time, parent_id)
        self.add_node_to_parent(parent_id, first, child_id)
        self.leaves.add((self.time, child_id))
        return child_id

    def add_node_to_parent(self, parent_id: int, key: tuple, child_id: int) -> None:  # :563-571
        parent = self.nodes[parent_id]
        replaced = key in parent.children
        parent.children[key] = child_id
        if not replaced:
            self.incref(parent_id)

    def remove_node(self, node_id: int) -> TrieNode:  # :574-590
        node = self.nodes.pop(node_id)
        assert not node.children, f"Tried to remove a node with {len(node.children)} children"
        parent = self.nodes[node.parent]
        parent.children.pop(tuple(node.key[:self.block_size]), None)
        self.decref(node.parent)
        return node

    def update_access_time(self, node_id: int) -> None:  # :592-602
        node = self.nodes[node_id]
        if (node.last_accessed, node_id) in self.leaves:
            self.leaves.remove((node.last_accessed, node_id))
            self.leaves.add((self.time, node_id))
        node.last_accessed = self.time

    def get_or_create_root(self, adapter_index: int) -> int:  # :631-636
        if adapter_index not in self.roots:
            root_id = next(self.ids)
            self.nodes[root_id] = TrieNode([], [], 0, None)
            self.roots[adapter_index] = root_id
        return self.roots[adapter_index]

    def root_id(self, adapter_index: int) -> int:
        return self.roots[adapter_index]

    def is_root(self, node_id: int) -> bool:
        return self.nodes[node_id].parent is None


def shared_prefix(left: List[int], right: List[int], block_size: int) -> int:  # radix.rs:672-678
    full = 0
    for a, b in zip(left, right):
        if a != b:
            break
        full += 1
    assert full > 0, "Prefixes must at least share 1 token"
    return (full // block_size) * block_size


class RadixAllocator:
    """router/src/radix.rs:20-247: the allocator with --prefix-caching (block_allocator.rs:96-100). A request's
    prompt blocks enter the trie when its allocation is freed; a later request with the same adapter and prompt
    prefix gets those blocks first and prefix_len = the tokens they hold (whole blocks)."""

    def __init__(self, max_batch_total_tokens: int, block_size: int, window_size: Optional[int]):
        self.allocation_id = 0
        self.allocations: Dict[int, tuple] = {}  # id -> (adapter_index, prefix_node, cached_prefix_len, tokens)
        self.cache_blocks = RadixTrie(block_size)
        self.free_blocks = list(range(1, max_batch_total_tokens // block_size))  # :45-46 block 0: health checks
        self.window_size = window_size  # unused upstream too (:30-33)
        self.block_size = block_size
        self._lock = threading.Lock()

    def alloc_or_reclaim(self, n_blocks_needed: int) -> Optional[List[int]]:  # :52-77
        if len(self.free_blocks) < n_blocks_needed:
            self.free_blocks.extend(self.cache_blocks.evict(n_blocks_needed - len(self.free_blocks)))
        if len(self.free_blocks) >= n_blocks_needed:
            cut = len(self.free_blocks) - n_blocks_needed
            taken = self.free_blocks[cut:]
            del self.free_blocks[cut:]
            return taken
        return None

    def allocate(self, adapter_index: int, tokens: int, prefill_tokens=None) -> Optional[BlockAllocation]:
        with self._lock:  # :82-178
            self.cache_blocks.get_or_create_root(adapter_index)
            blocks: List[int] = []
            if prefill_tokens is not None:
                prefix_node = self.cache_blocks.find(adapter_index, list(prefill_tokens), blocks)
            else:
                prefix_node = self.cache_blocks.root_id(adapter_index)
            self.cache_blocks.incref(prefix_node)
            prefix_len = len(blocks) * self.block_size
            suffix_blocks = (tokens - prefix_len + self.block_size - 1) // self.block_size
            suffix = self.alloc_or_reclaim(suffix_blocks)
            if suffix is None:
                self.cache_blocks.decref(prefix_node)
                return None
            blocks.extend(suffix)
            slots: List[int] = []
            for block_id in blocks:  # :137-150
                for s in range(block_id * self.block_size, (block_id + 1) * self.block_size):
                    if len(slots) == tokens:
                        break
                    slots.append(s)
            self.allocation_id += 1
            self.allocations[self.allocation_id] = (adapter_index, prefix_node, prefix_len,
                                                    None if prefill_tokens is None else list(prefill_tokens))
            return BlockAllocation(self, blocks, slots, prefix_len, self.allocation_id)

    def free(self, blocks: List[int], allocation_id: int) -> None:
        with self._lock:  # :180-239
            adapter_index, prefix_node, cached_prefix_len, prefill_tokens = self.allocations.pop(allocation_id)
            self.cache_blocks.decref(prefix_node)
            if prefill_tokens is None:
                self.free_blocks.extend(blocks)
                return
            if len(prefill_tokens) > cached_prefix_len:
                aligned = (len(prefill_tokens) // self.block_size) * self.block_size
                if aligned > 0:
                    prefix_len = self.cache_blocks.insert(adapter_index, prefill_tokens[:aligned],
                                                          blocks[:aligned // self.block_size])
                    if prefix_len > cached_prefix_len:  # :224-229 blocks of a partially overlapping request
                        self.free_blocks.extend(blocks[cached_prefix_len // self.block_size:
                                                       prefix_len // self.block_size])
            self.free_blocks.extend(blocks[len(prefill_tokens) // self.block_size:])


# --------------------------------------------------------------------------------------------------------------------
# Batch entries (router/src/batch.rs:185-436)
# --------------------------------------------------------------------------------------------------------------------


class GenerateBatchEntries:
    def __init__(self):
        self.batch_requests: List[pb.Request] = []  # batch.rs:187
        self.batch_entries: Dict[int, Entry] = {}  # batch.rs:188
        self.index_to_adapter: Dict[int, Adapter] = {}  # batch.rs:189

    def add(self, entry_id, entry: Entry, adapter: Adapter, blocks, slots, prefix_len, chunk_len):
        """batch.rs:332-365 (the pb.Request) + :207-217."""
        req = entry.request
        request = pb.Request(
            id=entry_id,
            prefill_logprobs=req.decoder_input_details,
            inputs=req.inputs,
            truncate=req.truncate,
            parameters=req.parameters,
            stopping_parameters=req.stopping_parameters,
            adapter_index=adapter.index,
            blocks=blocks,
            slots=slots,
            cache_len=prefix_len,
        )
        if req.tokenized_inputs is not None:
            request.tokenized_inputs.CopyFrom(req.tokenized_inputs)
        if chunk_len is not None:
            request.chunk_len = chunk_len
        self.batch_requests.append(request)
        entry.batch_time = time.monotonic()
        self.batch_entries[entry_id] = entry
        self.index_to_adapter[adapter.index] = adapter

    def extend(self, other: "GenerateBatchEntries"):  # batch.rs:367-370: only the entries map is merged
        self.batch_entries.update(other.batch_entries)
        other.batch_entries = {}

    def drain(self):  # batch.rs:219-232
        out = []
        for r in reversed(list(self.batch_requests)):
            entry = self.batch_entries.pop(r.id)
            out.append((self.index_to_adapter[r.adapter_index], r.id, entry))
        return out

    def create_batch_data(self, batch_id, max_tokens, max_blocks) -> pb.Batch:  # batch.rs:234-246
        return pb.Batch(id=batch_id, requests=self.batch_requests, size=len(self.batch_requests),
                        max_tokens=max_tokens, max_blocks=max_blocks)

    def adapters_in_use(self) -> set:  # batch.rs:248-253
        return {e.request.adapter for e in self.batch_entries.values()}

    def __len__(self):
        return len(self.batch_requests)


# --------------------------------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------------------------------


class RequestHandle:
    """The receiving side of an entry's response channel, consumed the way Infer::generate does (infer.rs:404-489)."""

    def __init__(self, router: "Router", entry: Optional[Entry], error: Optional[InferError] = None):
        self.router = router
        self.entry = entry
        self._error = error
        self._result: Optional[InferResponse] = None
        self._exc: Optional[BaseException] = None
        self._finished = False

    @property
    def request_id(self) -> Optional[int]:
        return self.entry.id if self.entry is not None else None

    def result(self, timeout: float = 60.0) -> InferResponse:
        if self._finished:
            if self._exc is not None:
                raise self._exc
            return self._result
        try:
            self._result = self._collect(timeout)
            return self._result
        except BaseException as e:
            self._exc = e
            raise
        finally:
            self._finished = True
            if self.entry is not None:  # the semaphore permit lives as long as generate() (infer.rs:408-409)
                self.router._release_permit()

    def _collect(self, timeout: float) -> InferResponse:
        if self._error is not None:
            raise self._error
        deadline = time.monotonic() + timeout
        prefill, tokens, prompt_tokens, generated_text = [], [], 0, None
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self.entry.responses.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise TimeoutError(f"request {self.entry.id} ({self.entry.request.adapter.as_string()}) did not "
                                   f"finish in {timeout:.0f}s; router state: {self.router.describe()}") from None
            if msg is _CLOSED:
                break
            kind = msg[0]
            if kind == "error":  # infer.rs:422 `match response?`
                raise msg[1]
            if kind == "prefill":  # infer.rs:424-442
                _, toks, length = msg
                if toks is not None:
                    prefill = list(zip(toks.ids, toks.texts, toks.logprobs))
                prompt_tokens = length
            elif kind == "token":  # infer.rs:444
                tokens.append(msg[1])
            elif kind == "end":  # infer.rs:447-457
                tokens.append(msg[1])
                generated_text = msg[2]
        if generated_text is None:  # infer.rs:469-488
            raise IncompleteGeneration()
        return InferResponse(prefill, tokens, prompt_tokens, generated_text, self.entry.id,
                             self.entry.request.adapter.index)


class Router:
    def __init__(self, master_shard_uds_path: str, tokenizer_dir, args: RouterArgs, rpc_timeout: float = 120.0):
        self.master_shard_uds_path = master_shard_uds_path
        self.args = args
        self.rpc_timeout = rpc_timeout
        self.log = RpcLog()
        # router/src/main.rs:194-256: a local directory -> tokenizer.json (used only to validate payloads)
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.client: Optional[ShardedClient] = None
        self.shard_info: Optional[pb.InfoResponse] = None
        self.max_supported_total_tokens: Optional[int] = None
        self.max_batch_total_tokens: Optional[int] = None
        self.startup_response: Optional[InferResponse] = None
        self.inference_health = False  # server.rs:1470
        self._qlock = threading.RLock()  # Arc<Mutex<AdapterQueuesState>>
        self._sched_lock = threading.RLock()  # the scheduler task runs one command at a time (scheduler.rs:144-172)
        self._index_lock = threading.Lock()  # infer.rs:157 adapter_to_index Mutex
        self._live_entries: Dict[int, Entry] = {}
        self._aborted: Optional[str] = None
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._concurrent = 0
        self._concurrent_lock = threading.Lock()
        self.batches_formed: List[pb.Batch] = []  # emulation instrumentation

    # ---------------------------------------------------------------------------------------------- start-up
    def start(self, startup_probe: bool = True) -> "Router":
        a = self.args
        # router/src/main.rs:375-377 (ServiceDiscovery inside ShardedClient::connect_uds)
        try:
            self.client = ShardedClient.connect_uds(self.master_shard_uds_path, self.log, self.rpc_timeout)
        except ClientError as e:
            raise RouterError(f"Connection: {e}") from e
        # main.rs:378-382 "Clear the cache; useful if the webserver rebooted"
        try:
            self.client.clear_cache(None)
        except ClientError as e:
            raise RouterError(f"Cache: {e}") from e
        # main.rs:384
        try:
            self.shard_info = self.client.info()
        except ClientError as e:
            raise RouterError(f"Info: {e}") from e
        # main.rs:386-425: Warmup; the router exits if it fails
        try:
            supported = self.client.warmup(a.max_input_length, a.max_batch_prefill_tokens, a.max_total_tokens)
        except ClientError as e:
            raise RouterError(f"Warmup: {e}") from e
        self.max_supported_total_tokens = supported
        if supported is None:  # main.rs:397-403
            total = a.max_batch_total_tokens if a.max_batch_total_tokens is not None else max(
                16000, max(a.max_total_tokens, a.max_batch_prefill_tokens))
        else:  # main.rs:405-424
            total = supported
            if a.max_batch_total_tokens is not None and a.max_batch_total_tokens < supported:
                total = a.max_batch_total_tokens
        # main.rs:429-439
        if a.max_input_length > a.max_batch_prefill_tokens and not self.shard_info.chunked_prefill:
            raise RouterError(f"ArgumentValidation: `max_batch_prefill_tokens` must be >= `max_input_length`. "
                              f"Given: {a.max_batch_prefill_tokens} and {a.max_input_length}")
        if a.max_batch_prefill_tokens > total:
            raise RouterError(f"ArgumentValidation: `max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
                              f"Given: {a.max_batch_prefill_tokens} and {total}")
        if a.max_total_tokens > total:
            raise RouterError(f"ArgumentValidation: `max_total_tokens` must be <= `max_batch_total_tokens`. "
                              f"Given: {a.max_total_tokens} and {total}")
        # server.rs:1473-1479: non-causal models budget with the prefill budget
        self.max_batch_total_tokens = total if self.shard_info.supports_generation else a.max_batch_prefill_tokens
        self._init_infer()
        if startup_probe and self.shard_info.supports_generation:
            self.startup_response = self.startup()
        return self

    def _init_infer(self):
        """router/src/infer.rs:170-276 Infer::new, scheduler.rs:208-249 AdapterSchedulerState::new."""
        info = self.shard_info
        self.adapter_event = Notify()
        self.queues_state = AdapterQueuesState(self.args.max_active_adapters, self.args.adapter_cycle_time_s)
        self.loader = AdapterLoader(self)
        self.next_batch_id = 0  # scheduler.rs:241
        self.speculate = info.speculate
        self.chunked_prefill = info.chunked_prefill
        # scheduler.rs:228-236 "Only causal LMs require the block allocator, due to paged attention"
        self.block_allocator = None
        if not info.requires_padding and info.requires_block_allocator:
            # block_allocator.rs:96-100: the radix allocator with --prefix-caching (main.rs passes the flag through)
            allocator = RadixAllocator if self.args.prefix_caching else SimpleAllocator
            self.block_allocator = allocator(self.max_batch_total_tokens, info.block_size,
                                             info.window_size if info.HasField("window_size") else None)
        # infer.rs:213-233: the base model is index 0; preloaded adapters keep the shard's indices
        self.adapter_to_index: Dict[AdapterParameters, int] = {
            AdapterParameters(adapter_ids=(BASE_MODEL_ADAPTER_ID,)): 0}
        for pre in info.preloaded_adapters:
            if pre.HasField("adapter_parameters"):
                self.adapter_to_index[AdapterParameters(
                    adapter_ids=tuple(pre.adapter_parameters.adapter_ids))] = pre.adapter_index
        t = threading.Thread(target=self._batching_task_guard, name="batching-task", daemon=True)
        t.start()
        self._threads.append(t)

    def startup(self) -> InferResponse:
        """The k8s /startup probe for a generative model: router/src/server.rs:532-590."""
        resp = self.generate(GenerateRequest("Who?", GenerateParameters(max_new_tokens=1)), timeout=120)
        if len(resp.generated_text.text) == 0:  # server.rs:566-573
            raise RouterError("Empty generation (failed healthcheck)")
        return resp

    def close(self):
        self._stop.set()
        if getattr(self, "loader", None) is not None:
            self.loader.stop()
        for t in self._threads:
            t.join(timeout=5)
        if self.client is not None:
            self.client.close()

    # ---------------------------------------------------------------------------------------------- validation
    def validate(self, request: GenerateRequest, adapter: Adapter) -> ValidGenerateRequest:
        """router/src/validation.rs:196-410."""
        p = request.parameters
        a = self.args
        if p.adapter_parameters is not None and p.adapter_id is not None:  # :228-230
            raise ValidationError("AdapterIdConflict")
        if p.adapter_parameters is not None:  # :232-242
            if len(p.adapter_parameters.adapter_ids) < 1:
                raise ValidationError("AdapterIdMissing")
            if len(p.adapter_parameters.adapter_ids) != len(p.adapter_parameters.weights):
                raise ValidationError("AdapterWeightMismatch")
        best_of = p.best_of if p.best_of is not None else 1  # :245-254
        sampling = p.do_sample or p.temperature is not None or p.top_k is not None or p.top_p is not None \
            or p.typical_p is not None
        if best_of > 1 and not sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        temperature = p.temperature if p.temperature is not None else 1.0  # :256-259
        if temperature < 0.0:
            raise ValidationError("`temperature` must be non-negative")
        repetition_penalty = p.repetition_penalty if p.repetition_penalty is not None else 1.0  # :261-264
        if repetition_penalty <= 0.0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = p.frequency_penalty if p.frequency_penalty is not None else 0.0  # :266-269
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        presence_penalty = p.presence_penalty if p.presence_penalty is not None else 0.0  # :271-274
        if not -2.0 <= presence_penalty <= 2.0:
            raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
        top_p = 1.0  # :278-285
        if p.top_p is not None:
            if p.top_p <= 0.0 or p.top_p > 1.0:
                raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
            top_p = p.top_p
        typical_p = 1.0  # :287-294
        if p.typical_p is not None:
            if p.typical_p <= 0.0 or p.typical_p >= 1.0:
                raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
            typical_p = p.typical_p
        top_k = 0  # :296-303
        if p.top_k is not None:
            if p.top_k <= 0:
                raise ValidationError("`top_k` must be strictly positive")
            top_k = p.top_k
        return_k = 0  # :305-312
        if p.return_k_alternatives is not None:
            if p.return_k_alternatives <= 0:
                raise ValidationError("`return_k_alternatives` must be strictly positive")
            return_k = p.return_k_alternatives
        if p.max_new_tokens is not None and p.max_new_tokens == 0:  # :314-316
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > a.max_stop_sequences:  # :318-323
            raise ValidationError(f"`stop` supports up to {a.max_stop_sequences} stop sequences. "
                                  f"Given: {len(p.stop)}")
        if p.seed is None:  # :326-334: a random u64 (thread_rng().gen())
            seed = random.getrandbits(64)
        else:
            if best_of > 1:
                raise ValidationError("`seed` must not be set when `best_of` > 1")
            seed = p.seed
        if request.inputs == "":  # :337-339
            raise ValidationError("`inputs` cannot be empty")
        truncate = None  # :342-349
        if p.truncate is not None:
            if p.truncate == 0 or p.truncate > a.max_input_length:
                raise ValidationError(f"`truncate` must be strictly positive and less than {a.max_input_length}. "
                                      f"Given: {p.truncate}")
            truncate = p.truncate
        adapter_id = p.adapter_id if p.adapter_id is not None else ""  # :351
        schema = None  # :353-358 (serde_json Value::to_string: compact, keys in insertion order)
        if p.response_format is not None:
            value = p.response_format.get("schema", DEFAULT_JSON_SCHEMA)
            if value is not None:
                schema = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        tokenized_inputs, input_length = self.validate_input(request.inputs, request.add_special_tokens, truncate,
                                                             p.max_new_tokens)  # :361-369
        parameters = pb.NextTokenChooserParameters(  # :371-385
            temperature=temperature, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, top_k=top_k, top_p=top_p, typical_p=typical_p,
            do_sample=p.do_sample, seed=seed, watermark=p.watermark, adapter_id=adapter_id,
            return_k_alternatives=return_k)
        if schema is not None:
            parameters.schema = schema
        # :387-393 max_new_tokens defaults to max_total_tokens - input_length
        effective_max_new_tokens = p.max_new_tokens if p.max_new_tokens is not None \
            else a.max_total_tokens - input_length
        stopping = pb.StoppingCriteriaParameters(max_new_tokens=effective_max_new_tokens,
                                                 stop_sequences=list(p.stop), ignore_eos_token=p.ignore_eos_token)
        return ValidGenerateRequest(  # :400-409
            inputs=request.inputs, tokenized_inputs=tokenized_inputs, decoder_input_details=p.decoder_input_details,
            input_length=input_length,
            truncate=truncate if truncate is not None else a.max_input_length,  # :405
            parameters=parameters, stopping_parameters=stopping, adapter=adapter)

    def validate_input(self, inputs: str, add_special_tokens: bool, truncate, max_new_tokens):
        """validation.rs:115-172 with prepare_input :592-638 (a text-only model: one Text chunk, no truncation)."""
        encoding = self.tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
        input_length = len(encoding.ids)
        if max_new_tokens is not None and input_length + max_new_tokens > self.args.max_total_tokens:  # :130-142
            raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {self.args.max_total_tokens}. "
                                  f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
        if input_length > self.args.max_input_length:  # :145-150
            raise ValidationError(f"`inputs` must have less than {self.args.max_input_length} tokens. "
                                  f"Given: {input_length}")
        tokenized = pb.TokenizedInputs(ids=encoding.ids, input_chunks=[pb.InputChunk(text=inputs)])  # :152-169
        return tokenized, input_length

    # ---------------------------------------------------------------------------------------------- requests
    def _make_entry(self, request: GenerateRequest) -> Tuple[Optional[Adapter], Optional[Entry], Optional[Exception]]:
        """infer.rs:280-358 generate_stream up to (not including) the scheduler's Append."""
        if self._aborted:
            return None, None, RouterPanic(self._aborted)
        with self._concurrent_lock:  # infer.rs:291-299 (semaphore try_acquire)
            if self._concurrent >= self.args.max_concurrent_requests:
                return None, None, Overloaded("Model is overloaded")
            self._concurrent += 1
        p = request.parameters
        source, params = extract_adapter_params(p.adapter_id, p.adapter_source, p.adapter_parameters,
                                                self.args.adapter_source)  # infer.rs:301-305
        with self._index_lock:  # infer.rs:307-318: a new key takes index len(map), even if validation fails
            if params in self.adapter_to_index:
                idx = self.adapter_to_index[params]
            else:
                idx = len(self.adapter_to_index)
                self.adapter_to_index[params] = idx
        adapter = Adapter(params, source, idx, p.api_token)  # infer.rs:320-326
        try:
            valid = self.validate(request, adapter)  # infer.rs:329-337
        except ValidationError as e:
            with self._concurrent_lock:
                self._concurrent -= 1
            return adapter, None, e
        entry = Entry(self, valid)
        return adapter, entry, None

    def _append(self, adapter: Adapter, entry: Entry):
        """scheduler.rs:252-265 AdapterSchedulerState::append (one Append command)."""
        with self._sched_lock:
            with self._qlock:
                download = self.queues_state.append(adapter, self.adapter_event, entry)
                self._live_entries[id(entry)] = entry
            if download:
                self.loader.download_adapter(adapter)
        self.adapter_event.notify_one()

    def submit(self, request: GenerateRequest) -> RequestHandle:
        return self.submit_all([request])[0]

    def submit_all(self, requests: List[GenerateRequest]) -> List[RequestHandle]:
        """Several Append commands processed by the scheduler task before the batching task's next NextBatch
        command: a legitimate interleaving of concurrent clients upstream, used to put requests in one batch."""
        made = [self._make_entry(r) for r in requests]
        handles = []
        with self._sched_lock:
            for adapter, entry, err in made:
                if err is not None:
                    handles.append(RequestHandle(self, None, err))
                    continue
                self._append(adapter, entry)
                handles.append(RequestHandle(self, entry))
        return handles

    def _release_permit(self):
        with self._concurrent_lock:
            self._concurrent -= 1

    def generate(self, request: GenerateRequest, timeout: float = 60.0) -> InferResponse:
        """Infer::generate (infer.rs:404-489)."""
        return self.submit(request).result(timeout)

    # ---------------------------------------------------------------------------------------------- health
    def health_check(self) -> bool:
        """router/src/health.rs:150-178 Health::check (the /health route, server.rs:601-612)."""
        if self.inference_health:
            try:
                self.client.health()
                return True
            except ClientError:
                return False
        value = False
        if self.shard_info.supports_generation:
            value = self.check_generation()
            self.inference_health = value
        return value

    def liveness_batch(self) -> pb.Batch:
        """health.rs:40-84 check_generation's request and batch."""
        request = pb.Request(
            id=LIVENESS_ID, inputs="liveness",
            tokenized_inputs=pb.TokenizedInputs(ids=[75], input_chunks=[pb.InputChunk(text="liveness")]),
            truncate=10, prefill_logprobs=False,
            parameters=pb.NextTokenChooserParameters(
                temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, do_sample=False, seed=0, repetition_penalty=1.0,
                frequency_penalty=0.0, presence_penalty=0.0, watermark=False, adapter_id="",
                return_k_alternatives=0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1, stop_sequences=[],
                                                              ignore_eos_token=False),
            adapter_index=0,
            blocks=[0],  # health.rs:72 "Block 0 is reserved for health checks"
            slots=list(range(self.shard_info.block_size)),  # health.rs:74
            cache_len=0)
        return pb.Batch(id=HEALTH_BATCH_ID, requests=[request], size=1, max_tokens=2, max_blocks=1)

    def check_generation(self) -> bool:
        """health.rs:39-87: skips the queue; `is_ok()` of the Prefill is the answer."""
        try:
            self.client.prefill(self.liveness_batch(), None)
            return True
        except ClientError:
            return False

    # ---------------------------------------------------------------------------------------------- scheduler
    def remove_errored_adapters(self):
        """scheduler.rs:267-276."""
        with self._sched_lock:
            with self._qlock:
                errored = self.queues_state.get_errored_adapters()
            for adapter in errored:
                self.loader.terminate(adapter)

    def next_batch(self, adapters_in_use: set, min_size: Optional[int], prefill_token_budget: int,
                   token_budget: int) -> Optional[Tuple[GenerateBatchEntries, pb.Batch]]:
        """router/src/scheduler.rs:283-546."""
        with self._sched_lock:
            if prefill_token_budget == 0 or token_budget == 0:  # :290-292
                return None
            with self._qlock:
                num_entries = self.queues_state.len()  # :294
            if num_entries == 0:  # :296-298
                return None
            if min_size is not None and num_entries < min_size:  # :301-305
                return None
            max_input_length = 0
            prefill_tokens = 0
            decode_tokens = 0
            max_blocks = 0
            with self._qlock:  # :317-327
                self._update_adapters(adapters_in_use)
            batch_entries: Optional[GenerateBatchEntries] = None
            while True:  # :331 'entry_loop
                with self._qlock:
                    nxt = self.queues_state.next_entry()
                if nxt is None:
                    break
                entry_id, entry, adapter = nxt
                batch_requests_len = len(batch_entries) if batch_entries is not None else 0
                should_break = False
                chunk_len = None
                if self.block_allocator is None:  # :348-368
                    # "We pad to max input length in the Python shards"
                    max_input_length = max(max_input_length, entry.request.input_length)
                    prefill_tokens = (batch_requests_len + 1) * max_input_length
                    decode_tokens += entry.request.max_new_tokens()
                    total_tokens = prefill_tokens + decode_tokens + self.speculate
                    if prefill_tokens > prefill_token_budget or total_tokens > token_budget:
                        with self._qlock:
                            self.queues_state.push_front(adapter, entry_id, entry)
                        break  # NB: prefill_tokens / decode_tokens keep this entry's share (see max_tokens below)
                    block_allocation = None
                else:  # :369-461
                    # :370-376 "If users wants the prefill logprobs, we cannot reuse the cache."
                    input_ids = None if entry.request.decoder_input_details else entry.request.input_ids()
                    tokens = entry.request.input_length + entry.request.max_new_tokens() + self.speculate - 1
                    block_allocation = self.block_allocator.allocate(adapter.index, tokens, input_ids)
                    if block_allocation is None:  # "Over budget: not enough free blocks"
                        with self._qlock:
                            self.queues_state.push_front(adapter, entry_id, entry)
                        break
                    max_blocks = max(max_blocks, len(block_allocation.blocks))
                    if block_allocation.prefix_len == entry.request.input_length:  # :409-414
                        block_allocation.prefix_len -= 1
                    postfix_len = entry.request.input_length - block_allocation.prefix_len
                    if prefill_tokens + postfix_len > prefill_token_budget:  # :421-456
                        if self.chunked_prefill:
                            entry_chunk_len = max(prefill_token_budget - prefill_tokens, 0)
                            if entry_chunk_len > 0:
                                chunk_len = entry_chunk_len
                            else:
                                block_allocation.drop()  # the local BlockAllocation goes out of scope
                                with self._qlock:
                                    self.queues_state.push_front(adapter, entry_id, entry)
                                break
                            should_break = True
                        else:
                            block_allocation.drop()
                            with self._qlock:
                                self.queues_state.push_front(adapter, entry_id, entry)
                            break
                    prefill_tokens += postfix_len  # :458
                if batch_entries is None:  # :464-470
                    batch_entries = GenerateBatchEntries()
                if block_allocation is None:  # :489-496
                    blocks, slots, prefix_len = [], [], 0
                else:
                    blocks, slots, prefix_len = (list(block_allocation.blocks), list(block_allocation.slots),
                                                 block_allocation.prefix_len)
                entry.block_allocation = block_allocation  # :498
                batch_entries.add(entry_id, entry, adapter, blocks, slots, prefix_len, chunk_len)  # :500-503
                if should_break:
                    break
            if batch_entries is None or len(batch_entries) == 0:  # :510-519
                return None
            if min_size is not None and len(batch_entries) < min_size:  # :522-534 "Batch is too small"
                with self._qlock:
                    for adapter, entry_id, entry in batch_entries.drain():
                        self.queues_state.push_front(adapter, entry_id, entry)
                return None
            max_tokens = prefill_tokens + decode_tokens  # :537
            batch = batch_entries.create_batch_data(self.next_batch_id, max_tokens, max_blocks)  # :538
            self.next_batch_id += 1  # :541
            self.batches_formed.append(batch)
            return batch_entries, batch

    def _update_adapters(self, adapters_in_use: set):
        """scheduler.rs:549-571 (called with the queues lock held)."""
        for adapter in self.queues_state.get_errored_adapters():
            self.loader.terminate(adapter)
            self.queues_state.untrack(adapter)
        offload, load = self.queues_state.update_adapters(adapters_in_use)
        for adapter in offload:
            self.loader.offload_adapter(adapter)
        for adapter in load:
            self.loader.load_adapter(adapter)

    # ---------------------------------------------------------------------------------------------- batching
    def _batching_task_guard(self):
        try:
            self._batching_task()
        except RouterPanic as e:
            self._abort(str(e))
        except Exception as e:  # pragma: no cover - emulation bug, reported as such
            self._abort(f"batching task crashed (emulation bug?): {e!r}\n{traceback.format_exc()}")

    def _batching_task(self):
        """router/src/infer.rs:1051-1248."""
        a = self.args
        while not self._stop.is_set():
            # infer.rs:1066 "Fire if a new request comes in or an adapter becomes ready"
            if not self.adapter_event.notified(0.1):
                continue
            # infer.rs:1071-1079
            while not self._stop.is_set():
                nb = self.next_batch(set(), None, a.max_batch_prefill_tokens, self.max_batch_total_tokens)
                if nb is None:
                    break
                batch_entries, batch = nb
                cached_batch = self._prefill(batch, None, batch_entries)  # infer.rs:1080-1082
                waiting_tokens = 1
                while cached_batch is not None:  # infer.rs:1087
                    batch_size = cached_batch.size
                    batch_max_tokens = cached_batch.max_tokens
                    current_tokens = cached_batch.current_tokens
                    batches = [cached_batch]
                    self.remove_errored_adapters()  # infer.rs:1098
                    # infer.rs:1100 the budget left is what the shard's CachedBatch.max_tokens leaves
                    token_budget = max(self.max_batch_total_tokens - batch_max_tokens, 0)
                    if self.chunked_prefill:  # infer.rs:1101-1110
                        min_size = None
                        prefill_token_budget = max(a.max_batch_prefill_tokens - current_tokens, 0)
                    else:  # infer.rs:1111-1128
                        if waiting_tokens >= a.max_waiting_tokens:
                            min_size = None
                        else:
                            min_size = int(math.floor(batch_size * a.waiting_served_ratio))
                        prefill_token_budget = a.max_batch_prefill_tokens
                    adapters_in_use = batch_entries.adapters_in_use()  # infer.rs:1139
                    while True:  # infer.rs:1142-1218
                        nb = self.next_batch(set(adapters_in_use), min_size, prefill_token_budget, token_budget)
                        if nb is None:
                            break
                        new_entries, new_batch = nb
                        batch_size += new_batch.size
                        token_budget = max(token_budget - new_batch.max_tokens, 0)  # infer.rs:1154-1155
                        cached = batches.pop() if self.chunked_prefill else None  # infer.rs:1168-1186
                        new_adapters = new_entries.adapters_in_use()
                        batch_entries.extend(new_entries)  # infer.rs:1189 (before the Prefill)
                        new_cached = self._prefill(new_batch, cached, batch_entries)  # infer.rs:1192-1200
                        adapters_in_use |= new_adapters
                        waiting_tokens = 1
                        if new_cached is not None:  # infer.rs:1207-1212
                            batches.append(new_cached)
                        elif self.chunked_prefill:
                            break
                        if not a.eager_prefill:  # infer.rs:1214-1217
                            break
                    cached_batch = self._decode(batches, batch_entries)  # infer.rs:1239-1241
                    waiting_tokens += 1
                # End of `while let Some((mut batch_entries, ..))`'s body: batch_entries is dropped, and with it any
                # entry the shard never finished (its stream closes: IncompleteGeneration).
                for entry in list(batch_entries.batch_entries.values()):
                    entry.drop()
                batch_entries.batch_entries.clear()

    def _prefill(self, batch: pb.Batch, cached_batch, batch_entries: GenerateBatchEntries):
        """infer.rs:1251-1292 (entries = ALL of batch_entries, the running batch's included)."""
        entries = batch_entries.batch_entries
        try:
            generations, next_batch = self.client.prefill(batch, cached_batch)
        except ClientError as err:
            self.inference_health = False
            try:
                self.client.clear_cache(batch.id)  # infer.rs:1286 `let _ =`: errors ignored
            except ClientError:
                pass
            self._send_errors(err, entries)
            return None
        self.inference_health = True
        removed = self._filter_send_generations(generations, entries)
        return self._filter_batch(next_batch, entries, removed)

    def _decode(self, batches: List[pb.CachedBatch], batch_entries: GenerateBatchEntries):
        """infer.rs:1295-1330."""
        entries = batch_entries.batch_entries
        batch_ids = [b.id for b in batches]
        try:
            generations, next_batch = self.client.decode(batches)
        except ClientError as err:
            self.inference_health = False
            for bid in batch_ids:  # infer.rs:1322-1324
                try:
                    self.client.clear_cache(bid)
                except ClientError:
                    pass
            self._send_errors(err, entries)
            return None
        self.inference_health = True
        removed = self._filter_send_generations(generations, entries)
        return self._filter_batch(next_batch, entries, removed)

    def _filter_batch(self, next_batch, entries, removed):
        """infer.rs:1447-1477."""
        if next_batch is None:
            return None
        if not removed:
            return next_batch
        request_ids = [i for i in next_batch.request_ids if i in entries]
        if not request_ids:
            try:  # infer.rs:1469-1470 "We unwrap here as we need to panic since we cannot recover"
                self.client.clear_cache(next_batch.id)
            except ClientError as e:
                raise RouterPanic(f"ClearCache({next_batch.id}) failed: {e}") from None
            return None
        try:  # infer.rs:1473-1475
            return self.client.filter_batch(next_batch.id, request_ids)
        except ClientError as e:
            raise RouterPanic(f"FilterBatch({next_batch.id}, {request_ids}) failed: {e}") from None

    def _filter_send_generations(self, generations, entries) -> bool:
        """infer.rs:1482-1507."""
        removed = False
        for generation in generations:
            gid = generation.request_id
            entry = entries.get(gid)
            if entry is None:  # infer.rs:1488-1490 `.expect("ID not found in entries. This is a bug.")`
                raise RouterPanic(f"ID not found in entries. This is a bug. (generation for request {gid}; "
                                  f"entries {sorted(entries)})")
            stopped = self._send_responses(generation, entry)
            if stopped:
                entries.pop(gid)
                entry.drop()
                removed = True
        return removed

    @staticmethod
    def _send_responses(generation: pb.Generation, entry: Entry) -> bool:
        """infer.rs:1510-1602."""
        stopped = False
        if generation.prefill_tokens_length > 0:  # infer.rs:1524-1532
            toks = generation.prefill_tokens if generation.HasField("prefill_tokens") else None
            entry.send(("prefill", toks, generation.prefill_tokens_length))
        nt = generation.next_tokens if generation.HasField("next_tokens") else pb.NextTokens()  # unwrap_or_default
        alternatives = [None] * len(nt.ids) if len(nt.alternative_tokens) == 0 else list(nt.alternative_tokens)
        # infer.rs:1550-1558 multizip: stops at the SHORTEST of ids / logprobs / texts / is_special / alternatives
        items = list(zip(nt.ids, nt.logprobs, nt.texts, nt.is_special, alternatives))
        has_generated_text = generation.HasField("generated_text")
        for idx, (tid, logprob, text, special, alt) in enumerate(items):
            token = Token(tid, text, logprob, special, alt, skipped=idx > 0)
            if has_generated_text and idx == len(items) - 1:  # infer.rs:1580-1591 "Generation has ended"
                stopped = True
                entry.send(("end", token, generation.generated_text))
            else:
                entry.send(("token", token))
        return stopped

    def _send_errors(self, error: ClientError, entries: Dict[int, Entry]):
        """infer.rs:1648-1662: every entry of the batch gets the error and is dropped."""
        for entry in list(entries.values()):
            entry.send(("error", GenerationError(str(error))))
            entry.drop()
        entries.clear()

    # ---------------------------------------------------------------------------------------------- panics
    def _abort(self, reason: str):
        """A panic in the Rust router aborts the process (Cargo.toml:15): every live request fails."""
        with self._qlock:
            if self._aborted:
                return
            self._aborted = reason
            entries = list(self._live_entries.values())
        for entry in entries:
            entry.send(("error", RouterPanic(f"router panicked: {reason}")))
            entry.drop()
        self._stop.set()

    @property
    def aborted(self) -> Optional[str]:
        return self._aborted

    def describe(self) -> str:
        with self._qlock:
            qs = self.queues_state
            queues = {a.as_string(): (q.status, len(q.entries), q.cost) for a, q in qs.queue_map.items()}
            return (f"aborted={self._aborted!r} queues={queues} active={list(qs.active_adapters)} "
                    f"pending={list(qs.pending_adapters)} budget={qs.memory_budget_remaining:.3f} "
                    f"last_rpcs={[(r.method, str(r.error) if r.error else 'ok') for r in self.log.snapshot()[-6:]]}")
