"""Where a model or adapter id lives on this machine, by LoRAX source ("hub", "local", "s3", "pbase").

No hub or bucket is reachable from a serving machine: "hub" means a local directory when the id is one
(as upstream), else the id's snapshot in the local Hugging Face cache; "local" is a directory; "s3" and
"pbase" are refused by name.
"""

from pathlib import Path
from typing import Optional

from lorax_server.pb import generate_pb2 as pb

HUB, LOCAL, S3, PBASE = "hub", "local", "s3", "pbase"
SOURCES = (HUB, LOCAL, S3, PBASE)


class SourceError(ValueError):
    """A source this server cannot read from (or does not know)."""


def source_name(adapter_source: int) -> str:
    """pb.AdapterSource -> its lower-case name ("hub", "local", ...)."""
    return pb.AdapterSource.Name(adapter_source).lower()


def resolve(model_or_adapter_id: str, source: str, revision: Optional[str] = None) -> Path:
    """The local directory holding `model_or_adapter_id`; FileNotFoundError when it is not on this machine."""
    if source not in SOURCES:
        raise SourceError(f"unknown source '{source}'; one of {', '.join(SOURCES)}")
    if source in (S3, PBASE):
        raise SourceError(f"source '{source}' is not reachable from this server: use a local directory "
                          f"(source local) or the local Hugging Face cache (source hub)")
    path = Path(model_or_adapter_id)
    if path.is_dir():
        return path
    raise FileNotFoundError(f"'{model_or_adapter_id}' is not a local directory (source {source})")
