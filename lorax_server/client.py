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


