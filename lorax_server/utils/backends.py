"""One decision per op family: which implementation runs, chosen once, overridable by environment.

Each family lists its implementations fastest first. The first one that is available on the device is
chosen, unless `LORAX_<FAMILY>_BACKEND` names one: asking for an unavailable implementation is an error
that says why; choosing automatically never fails, because every family ends in a pure-PyTorch reference.
"""

import importlib.util
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
    impl: object  # the implementation, or a zero-argument loader of it when `lazy` (modules needing triton)
    # Returns None when usable on this device, else the reason it is not.
    why_unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    lazy: bool = False

    def load(self):
        return self.impl() if self.lazy else self.impl


def needs_cuda_and_triton(device: torch.device) -> Optional[str]:
    """Triton kernels run on CUDA devices, and only where the triton package is installed."""
    if device.type != "cuda":
        return f"Triton kernels need a CUDA device, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


# family -> name of the backend chosen last, for start-up logs and the server's Info.
CHOSEN: Dict[str, str] = {}


def choose(family: str, backends: Sequence[Backend], device: torch.device):
    """The implementation of the chosen backend (loaded)."""
    return choose_backend(family, backends, device).load()


def choose_backend(family: str, backends: Sequence[Backend], device: torch.device) -> Backend:
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
