"""One decision per op family: which implementation runs, chosen once, overridable by environment.

Each family lists its implementations fastest first. The first one that is available on the device is
chosen, unless `LORAX_<FAMILY>_BACKEND` names one: asking for an unavailable implementation is an error
that says why; choosing automatically never fails, because every family ends in a pure-PyTorch reference.
"""

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend that cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    impl: object
    # Returns None when usable on this device, else the reason it is not.
    why_unavailable: Callable[[torch.device], Optional[str]] = lambda device: None


# family -> name of the backend chosen last, for start-up logs and the server's Info.
CHOSEN: Dict[str, str] = {}


def choose(family: str, backends: Sequence[Backend], device: torch.device) -> Backend:
    variable = f"LORAX_{family.upper()}_BACKEND"
    requested = os.getenv(variable)
    if requested:
        by_name = {b.name: b for b in backends}
        if requested not in by_name:
            raise BackendUnavailable(f"{variable}={requested}: unknown backend; known: {sorted(by_name)}")
        reason = by_name[requested].why_unavailable(device)
        if reason is not None:
            raise BackendUnavailable(f"{variable}={requested} is not available on {device}: {reason}")
        chosen = by_name[requested]
    else:
        chosen = next(b for b in backends if b.why_unavailable(device) is None)
    if CHOSEN.get(family) != chosen.name:
        logger.info("backend for %s: %s", family, chosen.name)
    CHOSEN[family] = chosen.name
    return chosen
