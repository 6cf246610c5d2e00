"""Hugging Face Hub references (`hf://ORG/NAME@REVISION`) as inputs, and pushing an output.

huggingface_hub does all the network work and reads the user's settings itself:
HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE. This module
picks the files surgeon needs and turns huggingface_hub's exceptions into
HubError messages that give the fix.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from surgeon.checkpoint import Checkpoint, open_checkpoint
from surgeon.errors import CheckpointError, HubError

logger = logging.getLogger(__name__)

HUB_SCHEME = "hf://"
# Top-level files surgeon reads or copies into the output. Weights in other formats are never fetched.
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
SIDE_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class HubReference:
    """A model repository on the Hub and an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_reference(reference: str | Path) -> HubReference | None:
    """Parse `hf://ORG/NAME` or `hf://ORG/NAME@REVISION`, or return None for a local path."""
    text = str(reference)
    if not text.startswith(HUB_SCHEME):
        return None
    repo_id, _, revision = text[len(HUB_SCHEME) :].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise HubError(
            f"invalid Hub model reference {text!r}",
            value=text,
            fix="write hf://ORG/NAME or hf://ORG/NAME@REVISION, e.g. hf://HuggingFaceTB/SmolLM2-135M",
        )
    if "@" in text and not revision:
        raise HubError(f"empty revision in {text!r}", value=text, fix="name a branch, tag or commit after '@', or drop the '@'")
    return HubReference(repo_id, revision or None)


def resolve_model_reference(reference: str | Path) -> Path:
    """Return the local folder for a model reference: the path itself, or a Hub snapshot in the cache.

    A Hub reference downloads only config, index, safetensors shards and
    tokenizer files into the Hub cache (HF_HUB_CACHE), or reuses them from it.
    """
    hub_reference = parse_hub_reference(reference)
    if hub_reference is None:
        return _local_folder(Path(reference))

    from huggingface_hub import snapshot_download

    with translate_hub_errors(hub_reference):
        folder = snapshot_download(
            hub_reference.repo_id,
            revision=hub_reference.revision,
            allow_patterns=WEIGHT_PATTERNS + SIDE_FILE_PATTERNS,
        )
    logger.info("resolved %s to %s", hub_reference, folder)
    return Path(folder)


def open_model_reference(reference: str | Path) -> Checkpoint:
    """Resolve a model reference and open its checkpoint, recording the Hub commit it came from."""
    folder = resolve_model_reference(reference)
    hub_reference = parse_hub_reference(reference)
    if hub_reference is None:
        return open_checkpoint(folder)

    # A cache snapshot is models--ORG--NAME/snapshots/COMMIT/, and its files link into models--ORG--NAME/blobs/.
    checkpoint = open_checkpoint(folder, allowed_root=folder.parent.parent)
    checkpoint.source = str(HubReference(hub_reference.repo_id, folder.name))
    return checkpoint


def _local_folder(path: Path) -> Path:
    if not path.exists() and _REPO_ID.fullmatch(str(path)) and "/" in str(path):
        raise CheckpointError(
            "input folder not found",
            path=path,
            fix=f"to download it from the Hugging Face Hub, write {HUB_SCHEME}{path}",
        )
    return path


@contextlib.contextmanager
def translate_hub_errors(reference: HubReference | str) -> Iterator[None]:
    """Turn huggingface_hub's errors for `reference` into HubError with a fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = reference.repo_id if isinstance(reference, HubReference) else reference
    try:
        yield
    except GatedRepoError as error:
        raise HubError(
            f"{repo_id} is a gated repository and this token has no access",
            value=str(reference),
            fix=f"accept the conditions at https://huggingface.co/{repo_id}, then set HF_TOKEN or run `hf auth login`",
        ) from error
    except RepositoryNotFoundError as error:
        raise HubError(
            f"repository {repo_id} not found, or it is private and no valid token was sent",
            value=str(reference),
            fix="check the ORG/NAME spelling; for a private repository set HF_TOKEN or run `hf auth login`",
        ) from error
    except RevisionNotFoundError as error:
        revision = reference.revision if isinstance(reference, HubReference) else None
        raise HubError(
            f"revision {revision!r} not found in {repo_id}",
            value=str(reference),
            fix="name an existing branch, tag or commit after '@', or drop '@REVISION' to use main",
        ) from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached (" + " ".join(str(error).split())[:200] + ")"
        fix = "unset HF_HUB_OFFLINE" if offline else "check the network and HF_ENDPOINT"
        raise HubError(
            f"{reference} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and {reason}",
            value=str(reference),
            fix=f"{fix}, or point HF_HUB_CACHE at a cache that holds this model",
        ) from error
    except RemoteEntryNotFoundError as error:
        raise HubError(
            f"a file surgeon needs is missing from {reference} ({error})",
            value=str(reference),
            fix="check that the repository holds a safetensors checkpoint with config.json",
        ) from error
    except ValueError as error:
        # A server that returns something other than the Hub's JSON (a proxy's HTML page, say).
        raise HubError(
            f"the Hub server's response for {reference} is invalid ({error})",
            value=str(reference),
            fix="check that HF_ENDPOINT, if set, points at a Hugging Face Hub server",
        ) from error
    except HfHubHTTPError as error:
        raise HubError(
            "Hub request for " + str(reference) + " failed: " + " ".join(str(error).split())[:300],
            value=str(reference),
            fix="retry later; if HF_ENDPOINT is set, check that it points at a Hub server",
        ) from error


def list_upload_files(folder: Path) -> list[str]:
    """Check a folder before an upload and return the names of the files to upload.

    A `surgeon apply` output gets the quick `surgeon verify` check, in which only
    the model card may differ from the written one. Only the files its manifest
    names are uploaded, so journals, temporary files and later additions stay
    local. A `surgeon train` folder is opened as a checkpoint, which checks its
    headers and index, and its top-level files are uploaded.
    """
    from surgeon.verify import is_trained_folder, read_manifest, verify_output
    from surgeon.writer.output import MANIFEST_NAME, MODEL_CARD_NAME

    if is_trained_folder(folder):
        open_checkpoint(folder).close()
        names = _listed_top_level_files(folder)
    else:
        verify_output(folder, editable=frozenset({MODEL_CARD_NAME}))
        output = read_manifest(folder)["output"]
        if "files" in output:
            names = [shard["file"] for shard in output["shards"]] + list(output["files"]) + [MANIFEST_NAME]
        else:
            names = _listed_top_level_files(folder)

    for name in names:
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise HubError(f"{name} is not a regular file, and only regular files are uploaded", path=path, fix=f"replace {name} with the file itself")
    skipped = sorted(path.name for path in folder.iterdir() if path.name not in names)
    if skipped:
        logger.warning("not uploading %s: not part of the checkpoint", ", ".join(skipped))
    return sorted(names)


def _listed_top_level_files(folder: Path) -> list[str]:
    """Return the top-level regular files, leaving out links, hidden files and unfinished `.tmp` files."""
    return [
        path.name
        for path in folder.iterdir()
        if not path.name.startswith(".") and not path.name.endswith(".tmp") and not path.is_symlink() and path.is_file()
    ]


def check_push_target(repo_id: str) -> None:
    """Reject a malformed repository id, or pushing while offline, before any work that the push would follow."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"invalid repository id {repo_id!r} to push to: {str(error).rstrip('.')}", value=repo_id, fix="write ORG/NAME, e.g. my-org/SmolLM2-tli") from error
    if "/" not in repo_id or not _REPO_ID.fullmatch(repo_id):
        raise HubError(f"invalid repository id {repo_id!r} to push to", value=repo_id, fix="write ORG/NAME, e.g. my-org/SmolLM2-tli")
    if constants.HF_HUB_OFFLINE:
        raise HubError("cannot push while HF_HUB_OFFLINE is set", value=repo_id, fix="unset HF_HUB_OFFLINE, then run the command again")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Check the output folder, create the repository if needed, upload the folder and return the commit URL.

    The upload is resumable: running it again after an interruption skips the
    files the Hub already has.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_push_target(repo_id)
    names = list_upload_files(folder)
    patterns = [glob.escape(name) for name in names]

    api = HfApi()
    with translate_hub_errors(repo_id):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        upload_large_folder = getattr(api, "upload_large_folder", None)
        if upload_large_folder is not None:
            # NOTE: only huggingface_hub versions before 2.0 take this path, and no test covers it.
            upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", private=private, allow_patterns=patterns)
            return f"{api.endpoint}/{repo_id}"
        # huggingface_hub 2.x has no upload_large_folder. With hf_xet installed, its upload_folder
        # commits large folders in several commits and resumes when run again.
        try:
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, repo_type="model", commit_message="Upload model written by surgeon", allow_patterns=patterns
            )
        except ValueError as error:
            # huggingface_hub raises ValueError when the Hub rejects README.md metadata.
            raise HubError(f"the Hub rejected the upload: {error}", path=folder / "README.md", fix="fix the model card metadata, then push again") from error
    logger.info("pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url
