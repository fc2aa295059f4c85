"""`make run`: serve the embedded model with two embedded adapters, and send one mixed batch over gRPC.

Starts `lorax-server serve` as a child process on a unix socket, waits for it, sends one Prefill and
then Decode calls for a batch where every prompt goes once to the base model and once to each adapter,
prints what each request produced and the throughput, and stops the server.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorax_server.client import ShardClient, make_request

ASSETS = Path(__file__).parent / "assets"
ADAPTERS = {1: "zen", 2: "shout"}  # index -> embedded adapter (lorax_server/assets/adapters/NAME)
PROMPTS = ["The for statement", "Beautiful is"]


def run_demo(max_new_tokens: int = 32) -> None:
    socket = str(Path(tempfile.mkdtemp()) / "lorax")
    command = [sys.executable, "-m", "lorax_server.cli", "serve", str(ASSETS / "tiny_mixtral"), "--uds-path", socket,
               "--dtype", "float32"]
    for name in ADAPTERS.values():
        command += ["--preloaded-adapter-ids", str(ASSETS / "adapters" / name)]
    server = subprocess.Popen(command)
    try:
        client = ShardClient(f"unix://{socket}-0")
        client.wait_ready(timeout=120)
        print_batch(client, max_new_tokens)
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def print_batch(client: ShardClient, max_new_tokens: int) -> None:
    plan = [(prompt, index) for prompt in PROMPTS for index in (0, *ADAPTERS)]
    requests = [make_request(i, prompt, max_new_tokens=max_new_tokens, adapter_index=index)
                for i, (prompt, index) in enumerate(plan)]
    start = time.perf_counter()
    finished = client.run_to_completion(1, requests)
    elapsed = time.perf_counter() - start
    for i, (prompt, index) in enumerate(plan):
        label = ADAPTERS.get(index, "base")
        text = finished[i].text.replace("\n", " ")
        print(f"[{label:>5}] {prompt}\033[1m{text}\033[0m")
    tokens = sum(g.generated_tokens for g in finished.values())
    print(f"{len(requests)} requests in one batch (base + {len(ADAPTERS)} adapters), {tokens} tokens in "
          f"{elapsed:.2f}s: {tokens / elapsed:.1f} tokens/s over gRPC")
