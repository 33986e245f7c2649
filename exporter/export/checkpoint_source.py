"""`--checkpoint` as a local directory or a Hugging Face repo id, resolved to a local directory.

A repo id (`OpenGVLab/InternVL-14B-224px`) is fetched with huggingface_hub's `snapshot_download` into
its own cache (~/.cache/huggingface/hub, or HF_HOME / HF_HUB_CACHE): a second run, or a run with
HF_HUB_OFFLINE=1, reads the cached snapshot without touching the network. The library does the
caching, resuming and authentication; nothing of that is written here.
"""
from __future__ import annotations

import re
from pathlib import Path

from bridge_export.runtime.errors import UserError

# ORG/NAME as the hub spells repo ids (letters, digits, '-', '_', '.'), optionally @REVISION
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[\w./-]+))?$")
# InternVL-14B-224px ships safetensors shards beside its pytorch_model-*.bin ones: fetch one set, not both
# (27.7 GB each). A repo without safetensors (some fine-tunes) gets its .bin shards in a second pass.
IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx"]
BIN_ONLY = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


class CheckpointNotFound(UserError, FileNotFoundError):
    """--checkpoint names neither a directory here nor a repo id that could be fetched."""


def download_hint(repo: str) -> str:
    """The command that fetches `repo` by hand, for when this tool cannot."""
    local = repo.split("/")[-1]
    return f"hf download {repo} --local-dir {local} (pip install huggingface_hub), then --checkpoint {local}"


def resolve_checkpoint(value: str | Path) -> Path:
    """A local checkpoint directory for `value`: the directory itself, or a repo id's cached snapshot.

    Refused in one line when `value` is neither: a missing directory, a repo id without huggingface_hub,
    or one that cannot be fetched (offline with nothing cached, no such repo, a gated repo without a token).
    """
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointNotFound(f"--checkpoint {value} is a file: give the checkpoint's directory")
        return path
    m = REPO_ID.match(str(value))
    if m is None or str(value).startswith((".", "/", "~")):
        raise CheckpointNotFound(f"--checkpoint {value}: no such directory (nor a Hugging Face repo id ORG/NAME)")
    repo, revision = m.group("repo"), m.group("rev")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CheckpointNotFound(f"--checkpoint {value} is not a directory here; to use it as a Hugging Face repo "
                                 f"id install huggingface_hub, or download it: {download_hint(repo)}") from None
    from bridge_export.runtime.progress import get_logger

    get_logger(__name__).info(f"checkpoint: {repo} from the Hugging Face cache (downloading what is missing)")
    try:
        path = Path(snapshot_download(repo, revision=revision, ignore_patterns=IGNORE))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=BIN_ONLY))
        return path
    except GatedRepoError:
        raise CheckpointNotFound(f"{repo} is gated: accept its terms on huggingface.co and log in (hf auth login)"
                                 ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise CheckpointNotFound(f"{repo}{'@' + revision if revision else ''} was not found on the Hugging Face "
                                 "hub: check the name (or log in for a private repo)") from None
    except LocalEntryNotFoundError:
        raise CheckpointNotFound(f"{repo} is not in the Hugging Face cache and the hub cannot be reached "
                                 f"(offline?): download it where there is a network: {download_hint(repo)}"
                                 ) from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointNotFound(f"could not fetch {repo} ({first}): {download_hint(repo)}") from None
