"""`lorax-server serve --sharded` under torchrun: two ranks, each on its own socket, driven in lockstep as the
LoRAX router does, give the generations of one process."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.client import ShardClient, generated_ids, make_request
from tests.server.test_generation import PROMPTS

ADAPTERS = DEFAULT_MODEL_DIR.parent / "adapters"  # the embedded `zen` and `shout`


def run_everywhere(clients, batch_id, requests):
    """Sends the same calls to every shard at once; returns each shard's token ids per request."""
    def one(client):
        steps = []
        client.run_to_completion(batch_id, requests, on_step=steps.append)
        return generated_ids(steps)

    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(one, clients))


def load_everywhere(clients, index: int, name: str) -> None:
    """LoadAdapter on every shard at once, as the router does."""
    with ThreadPoolExecutor(len(clients)) as pool:
        assert all(pool.map(lambda c: c.load_adapter(index, str(ADAPTERS / name)), clients))


def test_two_shards_generate_what_one_process_does(served, tmp_path):
    """The base model, then base + `zen` (attention and experts) + `shout` (attention and lm_head) mixed."""
    single, _ = served
    requests = [make_request(i, p, max_new_tokens=8, ignore_eos_token=True) for i, p in enumerate(PROMPTS)]
    with_adapters = [make_request(i, p, max_new_tokens=8, ignore_eos_token=True, adapter_index=i % 3)
                     for i, p in enumerate(PROMPTS)]
    want = run_everywhere([single], 70, requests)[0]
    for index, name in ((1, "zen"), (2, "shout")):
        load_everywhere([single], index, name)
    want_with_adapters = run_everywhere([single], 72, with_adapters)[0]
    assert want_with_adapters != want  # the adapters change what is generated
    socket = str(tmp_path / "lorax")
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "lorax_server.cli", "serve", str(DEFAULT_MODEL_DIR),
                               "--uds-path", socket, "--sharded", "--dtype", "float32", "--kv-cache-mib", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        clients = [ShardClient(f"unix://{socket}-{rank}") for rank in range(2)]
        for client in clients:
            client.wait_ready(timeout=120)
        for got in run_everywhere(clients, 71, requests):
            assert got == want
        for index, name in ((1, "zen"), (2, "shout")):
            load_everywhere(clients, index, name)
        for got in run_everywhere(clients, 73, with_adapters):
            assert got == want_with_adapters
    finally:
        server.terminate()
        server.wait(timeout=60)
