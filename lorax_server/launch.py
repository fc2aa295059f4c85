"""Loading a model and serving it on this rank's socket: what `lorax-server serve` does."""

import logging
import signal
import sys
import threading
from typing import List, Optional, Sequence, Tuple

from lorax_server.server import start_server, stop_server
from lorax_server.utils.sources import HUB, resolve

logger = logging.getLogger(__name__)


def preload_adapters(model, adapter_ids: Sequence[str], source: str) -> List[Tuple[int, str, str]]:
    """Loads `adapter_ids` (from `source`) at adapter indices 1, 2, ... as upstream does; returns the
    (index, adapter id, source name) of each, for Info's `preloaded_adapters`."""
    preloaded = []
    for index, adapter_id in enumerate(adapter_ids, start=1):
        model.adapters.load(index, resolve(adapter_id, source), adapter_id)
        preloaded.append((index, adapter_id, source))
    if preloaded:
        logger.info("preloaded %d adapters (source %s) at indices 1..%d", len(preloaded), source, len(preloaded))
    return preloaded


def load_and_serve(model_id: str, uds_path: str, dtype: Optional[str] = None,
                   preloaded_adapter_ids: Sequence[str] = (), sharded: bool = False,
                   kv_cache_bytes: Optional[int] = None, wait: bool = True, expert_parallel: bool = False, *,
                   adapter_id: str = "", revision: Optional[str] = None, quantize: Optional[str] = None,
                   compile: Optional[bool] = None, trust_remote_code: bool = False, source: str = HUB,
                   adapter_source: str = HUB, preloaded_adapter_source: Optional[str] = None,
                   merge_adapter_weights: bool = False, embedding_dim: Optional[int] = None,
                   kv_cache_dtype: Optional[str] = None):
    """Loads the model (one process per rank when sharded: the LoRAX launcher's RANK / WORLD_SIZE /
    MASTER_ADDR / MASTER_PORT, or torchrun's), preloads adapters at indices 1, 2, ... from
    `preloaded_adapter_source` (default: `adapter_source`) and serves on unix://{uds_path}-{rank}.

    With `wait`, serves until SIGTERM or SIGINT, then stops gracefully (no new calls, the ones in flight
    finish within server.STOP_GRACE_S, the socket file is removed) and returns; else returns
    (grpc server, service) at once."""
    from lorax_server.models import get_model

    served = []  # the grpc server, once it exists
    if wait:
        stop_on_signals(served)
    model = get_model(model_id, adapter_id, revision, sharded, quantize, compile, dtype, trust_remote_code, source,
                      adapter_source, merge_adapter_weights, embedding_dim, kv_cache_bytes=kv_cache_bytes,
                      expert_parallel=expert_parallel, kv_cache_dtype=kv_cache_dtype)
    preloaded = preload_adapters(model, preloaded_adapter_ids, preloaded_adapter_source or adapter_source)
    group = model.model.lm_head.process_group
    server, service = start_server(model, uds_path, group.rank(), group.size(), preloaded)
    served.append((server, service.urls[group.rank()].removeprefix("unix://")))
    if wait:
        server.wait_for_termination()
        logger.info("server stopped")
    return server, service


def stop_on_signals(served: list) -> None:
    """SIGTERM and SIGINT stop the server in `served`, a [(grpc server, socket path)] (so that
    wait_for_termination returns and the process exits 0); before there is one, they end the process with
    status 128 + the signal number. Every rank gets the signal from the launcher and stops on its own."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        if not served:
            sys.exit(128 + signum)
        logger.info("signal %s received: finishing the calls in flight, then stopping",
                    signal.Signals(signum).name)
        stop_server(*served[0])

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
