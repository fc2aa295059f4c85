"""Our compiled generate.v1 descriptors against LoRAX's wire format (upstream a7394ba).

The expected table below is ours, in our own compact notation, written from ../shared/LORAX_WIRE.md (the
steering repository's facts), so that these checks run in any checkout. When LORAX_WIRE.md is beside this
checkout, the table is also checked against it; when it is not, that one check says so with a warning
(and a skip), never silently.

Notation: `Message: number name type, ...` where a type starting with `?` is proto3 `optional` and one
starting with `*` is `repeated`; `| oneof NAME: a b` lists a oneof's members; `enum Name: number VALUE, ...`;
`rpc Name: Request -> Response`.
"""

import re
import warnings
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from lorax_server.pb import generate_pb2 as pb

WIRE = Path(__file__).resolve().parents[2].parent / "shared" / "LORAX_WIRE.md"

EXPECTED = """
package generate.v1
service LoraxService
rpc Info: InfoRequest -> InfoResponse
rpc ServiceDiscovery: ServiceDiscoveryRequest -> ServiceDiscoveryResponse
rpc ClearCache: ClearCacheRequest -> ClearCacheResponse
rpc FilterBatch: FilterBatchRequest -> FilterBatchResponse
rpc Warmup: WarmupRequest -> WarmupResponse
rpc Prefill: PrefillRequest -> PrefillResponse
rpc Embed: EmbedRequest -> EmbedResponse
rpc Classify: ClassifyRequest -> ClassifyResponse
rpc Decode: DecodeRequest -> DecodeResponse
rpc Health: HealthRequest -> HealthResponse
rpc DownloadAdapter: DownloadAdapterRequest -> DownloadAdapterResponse
rpc LoadAdapter: LoadAdapterRequest -> LoadAdapterResponse
rpc OffloadAdapter: OffloadAdapterRequest -> OffloadAdapterResponse
HealthRequest:
HealthResponse:
PreloadedAdapter: 1 adapter_parameters AdapterParameters, 2 adapter_source AdapterSource, 3 adapter_index uint32
InfoRequest:
InfoResponse: 1 requires_padding bool, 2 dtype string, 3 device_type string, 4 window_size ?uint32,
    5 block_size uint32, 6 speculate uint32, 7 preloaded_adapters *PreloadedAdapter, 8 supports_generation bool,
    9 supports_embeddings bool, 10 supports_classification bool, 11 chunked_prefill bool,
    12 requires_block_allocator bool
ServiceDiscoveryRequest:
ServiceDiscoveryResponse: 1 urls *string
ClearCacheRequest: 1 id ?uint64
ClearCacheResponse:
NextTokenChooserParameters: 1 temperature float, 2 top_k uint32, 3 top_p float, 4 typical_p float, 5 do_sample bool,
    6 seed uint64, 7 repetition_penalty float, 8 frequency_penalty float, 9 presence_penalty float,
    10 watermark bool, 11 adapter_id string, 12 schema ?string, 13 return_k_alternatives uint32
StoppingCriteriaParameters: 1 max_new_tokens uint32, 2 stop_sequences *string, 3 ignore_eos_token bool
Image: 1 data bytes, 2 mimetype string
InputChunk: 1 text string, 2 image Image | oneof chunk: text image
TokenizedInputs: 1 ids *uint32, 2 input_chunks *InputChunk
Request: 1 id uint64, 2 inputs string, 3 tokenized_inputs TokenizedInputs, 4 truncate uint32,
    5 parameters NextTokenChooserParameters, 6 stopping_parameters StoppingCriteriaParameters,
    7 prefill_logprobs bool, 8 adapter_index uint32, 9 blocks *uint32, 10 slots *uint32, 11 cache_len uint32,
    12 chunk_len ?uint32
Batch: 1 id uint64, 2 requests *Request, 3 size uint32, 4 max_tokens uint32, 5 max_blocks uint32
CachedBatch: 1 id uint64, 2 request_ids *uint64, 3 size uint32, 4 max_tokens uint32, 5 current_tokens uint32
GeneratedText: 1 text string, 2 generated_tokens uint32, 3 skipped_tokens uint32, 4 finish_reason FinishReason,
    5 seed ?uint64
AlternativeTokens: 1 ids *uint32, 2 logprobs *float, 3 texts *string
NextTokens: 1 ids *uint32, 2 logprobs *float, 3 texts *string, 4 is_special *bool,
    5 alternative_tokens *AlternativeTokens
Generation: 1 request_id uint64, 2 prefill_tokens NextTokens, 3 next_tokens NextTokens,
    4 generated_text ?GeneratedText, 5 prefill_tokens_length uint32
FilterBatchRequest: 1 batch_id uint64, 2 request_ids *uint64
FilterBatchResponse: 1 batch CachedBatch
PrefillRequest: 1 batch Batch, 2 cached_batch CachedBatch
PrefillResponse: 1 generations *Generation, 2 batch ?CachedBatch
DecodeRequest: 1 batches *CachedBatch
DecodeResponse: 1 generations *Generation, 2 batch ?CachedBatch
Embedding: 1 request_id uint64, 2 values *float
EmbedRequest: 1 batch Batch
EmbedResponse: 1 embeddings *Embedding, 2 errorMsg string
Entity: 1 entity string, 2 score float, 3 index uint32, 4 word string, 5 start uint32, 6 end uint32
EntityList: 1 request_id uint64, 2 entities *Entity, 4 input_ids *uint32
ClassifyPredictionList: 1 request_id uint64, 2 predictions *string, 3 scores *float
ClassifyRequest: 1 batch Batch
ClassifyResponse: 1 classify_prediction_lists *ClassifyPredictionList, 2 errorMsg string
WarmupRequest: 1 batch Batch, 2 max_input_length uint32, 3 max_prefill_tokens uint32, 4 max_new_tokens uint32
WarmupResponse: 1 max_supported_total_tokens ?uint32
AdapterParameters: 1 adapter_ids *string, 2 weights *float, 3 merge_strategy MergeStrategy, 4 density float,
    5 majority_sign_method MajoritySignMethod
DownloadAdapterRequest: 1 adapter_parameters AdapterParameters, 2 adapter_source AdapterSource, 3 api_token ?string
DownloadAdapterResponse: 1 downloaded bool, 2 memory_fraction float
LoadAdapterRequest: 1 adapter_parameters AdapterParameters, 2 adapter_source AdapterSource, 3 adapter_index uint32,
    4 api_token ?string
LoadAdapterResponse: 1 loaded bool
OffloadAdapterRequest: 1 adapter_parameters AdapterParameters, 2 adapter_source AdapterSource, 3 adapter_index uint32
OffloadAdapterResponse: 1 offloaded bool
enum FinishReason: 0 FINISH_REASON_LENGTH, 1 FINISH_REASON_EOS_TOKEN, 2 FINISH_REASON_STOP_SEQUENCE
enum AdapterSource: 0 HUB, 1 S3, 2 LOCAL, 3 PBASE
enum MergeStrategy: 0 LINEAR, 1 TIES, 2 DARE_LINEAR, 3 DARE_TIES
enum MajoritySignMethod: 0 TOTAL, 1 FREQUENCY
"""

SCALARS = {FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "string",
           FieldDescriptor.TYPE_BYTES: "bytes",
           FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_UINT64: "uint64",
           FieldDescriptor.TYPE_FLOAT: "float"}
LABELS = {"?": "optional", "*": "repeated"}


class Wire:
    """messages: name -> {number: (label, type, name)}; oneofs: message -> {oneof: member names};
    enums: name -> {number: value}; rpcs: [(name, request, response)]."""

    def __init__(self):
        self.package, self.service = None, None
        self.messages, self.oneofs, self.enums, self.rpcs = {}, {}, {}, []


def parse_expected(text: str) -> Wire:
    wire = Wire()
    for line in re.sub(r"\n\s+", " ", text).strip().splitlines():  # continuation lines join their entry
        head, _, body = line.partition(":")
        words = head.split()
        if words[0] in ("package", "service"):
            setattr(wire, words[0], words[1])
        elif words[0] == "rpc":
            request, response = (s.strip() for s in body.split("->"))
            wire.rpcs.append((words[1], request, response))
        elif words[0] == "enum":
            wire.enums[words[1]] = {int(n): v for n, v in (item.split() for item in body.split(","))}
        else:
            fields, _, oneof = body.partition("|")
            entries = [item.split() for item in fields.split(",") if item.strip()]
            wire.messages[head] = {int(n): (LABELS.get(t[0], ""), t.lstrip("?*"), name) for n, name, t in entries}
            if oneof:
                name, _, members = oneof.strip().removeprefix("oneof ").partition(":")
                wire.oneofs.setdefault(head, {})[name.strip()] = set(members.split())
    return wire


# The markdown of ../shared/LORAX_WIRE.md, read only to check the table above against it.
MD_FIELD = re.compile(r"^- (\d+): (?:(optional|repeated) )?(\w+) `(\w+)`$")
MD_ENUM_VALUE = re.compile(r"^- (\d+): `(\w+)`$")
MD_ONEOF = re.compile(r"^- oneof `(\w+)`: (.+)$")
MD_RPC = re.compile(r"^- rpc `(\w+)\((\w+)\) returns \((\w+)\)`$")
MD_SERVICE = re.compile(r"^package `([\w.]+)`, service `(\w+)`")


def parse_markdown(text: str) -> Wire:
    wire, current, name = Wire(), None, None
    for line in text.splitlines():
        if m := MD_SERVICE.match(line):
            wire.package, wire.service = m.groups()
        elif line.startswith("### enum "):
            current = wire.enums.setdefault(line.split()[-1], {})
        elif line.startswith("### "):
            name = line.split()[-1]
            current = wire.messages.setdefault(name, {})
        elif m := MD_RPC.match(line):
            wire.rpcs.append(m.groups())
        elif (m := MD_FIELD.match(line)) and current is not None:
            current[int(m.group(1))] = (m.group(2) or "", m.group(3), m.group(4))
        elif (m := MD_ENUM_VALUE.match(line)) and current is not None:
            current[int(m.group(1))] = m.group(2)
        elif m := MD_ONEOF.match(line):
            wire.oneofs.setdefault(name, {})[m.group(1)] = {s.strip() for s in m.group(2).split(",")}
    return wire


def describe(field):
    """(label, type, name) as the table writes them; proto3 `optional` is a synthetic one-field oneof."""
    if field.is_repeated:
        label = "repeated"
    else:
        oneof = field.containing_oneof
        label = "optional" if oneof is not None and oneof.name == f"_{field.name}" else ""
    kind = (field.message_type.name if field.message_type else field.enum_type.name if field.enum_type
            else SCALARS[field.type])
    return label, kind, field.name


@pytest.fixture(scope="module")
def expected():
    return parse_expected(EXPECTED)


def test_the_table_is_complete(expected):
    assert len(expected.messages) == 44 and len(expected.enums) == 4 and len(expected.rpcs) == 13
    assert sum(len(fields) for fields in expected.messages.values()) == 133


def test_every_message_field_matches(expected):
    assert set(pb.DESCRIPTOR.message_types_by_name) == set(expected.messages)
    for name, fields in expected.messages.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        assert {f.number: describe(f) for f in descriptor.fields} == fields, name


def test_every_real_oneof_matches(expected):
    for name, descriptor in pb.DESCRIPTOR.message_types_by_name.items():
        real = {o.name: {f.name for f in o.fields} for o in descriptor.oneofs if o.name != f"_{o.fields[0].name}"}
        assert real == expected.oneofs.get(name, {}), name


def test_every_enum_matches(expected):
    assert set(pb.DESCRIPTOR.enum_types_by_name) == set(expected.enums)
    for name, values in expected.enums.items():
        assert {v.number: v.name for v in pb.DESCRIPTOR.enum_types_by_name[name].values} == values


def test_every_rpc_matches(expected):
    assert pb.DESCRIPTOR.package == expected.package
    service = pb.DESCRIPTOR.services_by_name[expected.service]
    ours = [(m.name, m.input_type.name, m.output_type.name) for m in service.methods]
    assert sorted(ours) == sorted(expected.rpcs)


def test_the_table_is_the_one_in_lorax_wire_md(expected):
    if not WIRE.exists():
        message = (f"{WIRE} is not beside this checkout: the wire table in {Path(__file__).name} was checked "
                   f"against our descriptors but not against LORAX_WIRE.md")
        warnings.warn(pytest.PytestWarning(message))
        pytest.skip(message)
    md = parse_markdown(WIRE.read_text())
    assert (md.package, md.service) == (expected.package, expected.service)
    assert md.messages == expected.messages
    assert md.oneofs == expected.oneofs
    assert md.enums == expected.enums
    assert sorted(md.rpcs) == sorted(expected.rpcs)
