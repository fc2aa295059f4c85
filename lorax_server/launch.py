"""Loading a model and serving it on this rank's socket: what `lorax-server serve` does."""

from typing import Optional, Sequence

from lorax_server.server import start_server


def load_and_serve(model_dir: str, uds_path: str, dtype: Optional[str] = None, adapter_ids: Sequence[str] = (),
                   sharded: bool = False, kv_cache_bytes: Optional[int] = None, wait: bool = True,
                   expert_parallel: bool = False):
    """Loads the model (one process per rank under torchrun when sharded), preloads adapters at
    indices 1, 2, ... and serves until terminated."""
    from lorax_server.models import get_model

    model = get_model(model_dir, sharded=sharded, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
                      expert_parallel=expert_parallel)
    preloaded = []
    for index, adapter_dir in enumerate(adapter_ids, start=1):
        model.adapters.load(index, adapter_dir, adapter_dir)
        preloaded.append((index, adapter_dir))
    group = model.model.lm_head.process_group
    server, service = start_server(model, uds_path, group.rank(), group.size(), preloaded)
    if wait:
        server.wait_for_termination()
    return server, service
