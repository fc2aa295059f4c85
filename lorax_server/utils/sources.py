"""Where a model or adapter id lives on this machine, by LoRAX source ("hub", "local", "s3", "pbase").

No hub or bucket is reachable from a serving machine: "hub" means a local directory when the id is one
(as upstream), else the id's snapshot in the local Hugging Face cache (what upstream reads when
HF_HUB_OFFLINE is set); "local" is a directory (a relative id that is not one is looked up under the
cache directory, as upstream); "s3" and "pbase" are refused by name.

The cache is the one huggingface_hub uses: $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE (what the LoRAX
launcher sets), else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
A model `org/name` lies in `models--org--name/snapshots/<commit>`; a revision (default "main") is a
branch or tag named in `models--org--name/refs/`, or a commit.
"""

import os
import re
from pathlib import Path
from typing import Optional

from lorax_server.pb import generate_pb2 as pb

HUB, LOCAL, S3, PBASE = "hub", "local", "s3", "pbase"
SOURCES = (HUB, LOCAL, S3, PBASE)
READABLE = (HUB, LOCAL)  # the sources this server reads from; the others need a network
DEFAULT_REVISION = "main"

# A Hugging Face repo id: "name" or "namespace/name", each part of letters, digits, '-', '_' and '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class SourceError(ValueError):
    """A source this server cannot read from (or does not know)."""


def source_name(adapter_source: int) -> str:
    """pb.AdapterSource -> its lower-case name ("hub", "local", ...); SourceError for a value it does not have."""
    try:
        return pb.AdapterSource.Name(adapter_source).lower()
    except ValueError:
        raise SourceError(f"adapter_source {adapter_source} is not an AdapterSource; one of "
                          f"{', '.join(name.lower() for name in pb.AdapterSource.keys())}") from None


def check_source(source: str) -> None:
    """Raises SourceError unless this server can read from `source`."""
    if source not in SOURCES:
        raise SourceError(f"unknown source '{source}'; one of {', '.join(SOURCES)}")
    if source not in READABLE:
        raise SourceError(f"source '{source}' is not reachable from this server: use a local directory "
                          f"(source local) or the local Hugging Face cache (source hub)")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache directory (read from the environment at every call)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.getenv(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.getenv("HF_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def is_repo_id(model_or_adapter_id: str) -> bool:
    return bool(_REPO_ID.match(model_or_adapter_id)) and ".." not in model_or_adapter_id


def cached_snapshot(repo_id: str, revision: Optional[str] = None, cache: Optional[Path] = None) -> Path:
    """The snapshot directory of `repo_id` at `revision` in the local Hugging Face cache.

    FileNotFoundError (one line, naming what was looked for) when the cache does not hold it."""
    cache = hf_hub_cache() if cache is None else Path(cache)
    revision = revision or DEFAULT_REVISION
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    where = f"the local Hugging Face cache {cache}"
    if not repo.is_dir():
        raise FileNotFoundError(f"'{repo_id}' is neither a local directory nor in {where} (no {repo.name}); "
                                f"nothing can be downloaded on this machine: put it there first")
    commit = revision
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        named = f"revision '{revision}'" + (f" (commit {commit})" if commit != revision else "")
        raise FileNotFoundError(f"'{repo_id}' at {named} is not in {where} (no {repo.name}/snapshots/{commit}); "
                                f"nothing can be downloaded on this machine: put it there first")
    return snapshot


def resolve(model_or_adapter_id: str, source: str, revision: Optional[str] = None) -> Path:
    """The local directory holding `model_or_adapter_id`; FileNotFoundError when it is not on this machine.

    `revision` selects the snapshot of a hub id in the cache; a local directory is used as it is (upstream
    ignores the revision of a local directory too)."""
    check_source(source)
    path = Path(model_or_adapter_id).expanduser()
    if path.is_dir():
        return path
    if source == LOCAL:
        if not path.is_absolute():  # upstream: a relative local id names a directory in the cache
            under_cache = hf_hub_cache() / model_or_adapter_id
            if under_cache.is_dir():
                return under_cache
        raise FileNotFoundError(f"'{model_or_adapter_id}' is not a local directory (source local)")
    if not is_repo_id(model_or_adapter_id):
        raise FileNotFoundError(f"'{model_or_adapter_id}' is not a local directory, nor a Hugging Face model id "
                                f"(source hub)")
    return cached_snapshot(model_or_adapter_id, revision)
