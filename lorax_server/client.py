"""A small client of the shard service: what the LoRAX router does, enough to drive a generation."""

from typing import Dict, List, Sequence

import grpc

from lorax_server.pb import generate_pb2 as pb
from lorax_server.pb import generate_pb2_grpc


def make_request(request_id: int, inputs: str = "", ids: Sequence[int] = (), max_new_tokens: int = 16,
                 adapter_index: int = 0, **options) -> pb.Request:
    """A pb.Request; `options` may hold any NextTokenChooserParameters field, `stop_sequences`,
    `ignore_eos_token`, `truncate`, `prefill_logprobs`, `blocks` and `slots`."""
    stopping = pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens,
                                             stop_sequences=options.pop("stop_sequences", []),
                                             ignore_eos_token=options.pop("ignore_eos_token", False))
    request_fields = {k: options.pop(k) for k in ("truncate", "prefill_logprobs", "blocks", "slots") if k in options}
    return pb.Request(id=request_id, inputs=inputs, tokenized_inputs=pb.TokenizedInputs(ids=list(ids)),
                      parameters=pb.NextTokenChooserParameters(**options), stopping_parameters=stopping,
                      adapter_index=adapter_index, **request_fields)


class ShardClient:
    def __init__(self, url: str):
        self.channel = grpc.insecure_channel(url)
        self.stub = generate_pb2_grpc.LoraxServiceStub(self.channel)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def run_to_completion(self, batch_id: int, requests: List[pb.Request],
                          on_step=None) -> Dict[int, pb.GeneratedText]:
        """Prefill, then Decode until every request finished; returns the GeneratedText of each request."""
        response = self.stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests,
                                                                      size=len(requests))))
        finished = {}
        while True:
            for generation in response.generations:
                if on_step is not None:
                    on_step(generation)
                if generation.HasField("generated_text"):
                    finished[generation.request_id] = generation.generated_text
            if not response.HasField("batch"):
                return finished
            response = self.stub.Decode(pb.DecodeRequest(batches=[response.batch]))

    def load_adapter(self, index: int, path: str, source: int = pb.LOCAL) -> bool:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(
            adapter_parameters=pb.AdapterParameters(adapter_ids=[path]), adapter_source=source,
            adapter_index=index)).loaded

    def close(self) -> None:
        self.channel.close()


def generated_ids(generations) -> Dict[int, List[int]]:
    """request id -> the token ids it received, from a stream of pb.Generation."""
    ids: Dict[int, List[int]] = {}
    for g in generations:
        ids.setdefault(g.request_id, []).extend(g.next_tokens.ids)
    return ids




LIVENESS_ID = 2**64 - 1  # the batch and request id of the router's liveness probe


def liveness_probe(block_size: int) -> pb.PrefillRequest:
    """The Prefill LoRAX's router sends as its liveness probe (router/src/health.rs): one token on block 0,
    which the router keeps for it (and this shard never hands out), even while batches are live."""
    request = pb.Request(id=LIVENESS_ID, inputs="liveness", tokenized_inputs=pb.TokenizedInputs(ids=[75]),
                         truncate=10, parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0,
                                                                               typical_p=1.0, repetition_penalty=1.0),
                         stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1),
                         blocks=[0], slots=list(range(block_size)), adapter_index=0)
    return pb.PrefillRequest(batch=pb.Batch(id=LIVENESS_ID, requests=[request], size=1, max_tokens=2))
