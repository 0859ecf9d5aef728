"""hf:// checkpoints: a file, a folder or the whole of a Hugging Face Hub model repo, fetched with huggingface_hub.

The grammar is huggingface_hub's own (its HfFileSystem's): `hf://<owner>/<name>[@<revision>][/<path>]`, so
`hf://FoundationVision/Infinity/infinity_2b_reg.pth` is one file, `hf://mit-han-lab/hart-0.7b-1024px@<commit>/llm`
a folder at a pinned commit and `hf://google/flan-t5-xl` a whole repo. A revision is a branch, tag or commit;
one holding a slash is written percent-encoded (`@refs%2Fpr%2F1`).

Files land in huggingface_hub's own cache (HF_HOME, HF_HUB_CACHE), so a node shares them with any other tool that
uses it; HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE act as they do for huggingface_hub, which reads them when first
imported (a process's environment, as a Ray worker's).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import unquote

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

SCHEME = "hf://"
# Weights of other frameworks, which no torch loader here reads: left out of folders and whole repos, where they can
# be most of the bytes (google/flan-t5-xl holds its weights as Flax and TensorFlow files too).
OTHER_FRAMEWORKS = ("*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite", "*.ot")


class HubError(RuntimeError):
    """A repo, revision or path that cannot be had; the message names the URI and what to change."""


@dataclass(frozen=True)
class HubPath:
    """Where an hf:// URI points: `path` "" is the whole repo; `revision` None is the default branch."""

    repo_id: str
    revision: str | None
    path: str

    def label(self) -> str:
        return f"{self.repo_id}@{self.revision or constants.DEFAULT_REVISION}"


def parse(uri: str) -> HubPath:
    """The repo, revision and path of `hf://<owner>/<name>[@<revision>][/<path>]`."""
    parts = uri.removeprefix(SCHEME).strip("/").split("/")
    if not uri.startswith(SCHEME) or len(parts) < 2 or not all(parts[:2]):
        raise HubError(f"checkpoint {uri}: not an hf:// URI; write hf://<owner>/<name>[@<revision>][/<path>], "
                       "e.g. hf://FoundationVision/Infinity/infinity_2b_reg.pth")
    name, _, revision = parts[1].partition("@")
    if "@" in parts[0] or any("@" in p for p in parts[2:]) or not name or (revision == "" and "@" in parts[1]):
        raise HubError(f"checkpoint {uri}: the revision goes after the repo name, as hf://<owner>/<name>@<revision>"
                       "/<path> (and a path holds no @)")
    return HubPath(f"{parts[0]}/{name}", unquote(revision) or None, "/".join(p for p in parts[2:] if p))


def download(uri: str) -> Path:
    """The local path (in huggingface_hub's cache) of the file or folder an hf:// URI names, fetched if needed."""
    where = parse(uri)
    patterns = [where.path, f"{where.path}/*"] if where.path else None
    skipped = [pattern for pattern in OTHER_FRAMEWORKS if not fnmatch(where.path, pattern)]  # unless named
    try:
        snapshot = Path(snapshot_download(where.repo_id, revision=where.revision, allow_patterns=patterns,
                                          ignore_patterns=skipped))
    except RevisionNotFoundError:
        raise HubError(f"checkpoint {uri}: repo {where.repo_id} has no revision {where.revision!r} on "
                       f"{constants.ENDPOINT}; give a branch, tag or commit of it after @") from None
    except RepositoryNotFoundError:
        raise HubError(f"checkpoint {uri}: repo {where.repo_id} not found on {constants.ENDPOINT}, or it is private "
                       "or gated: check the repo id, and for a private or gated repo set HF_TOKEN to a token with "
                       "access") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        fix = ("HF_HUB_OFFLINE is set: fetch it once with network access, or unset HF_HUB_OFFLINE"
               if constants.HF_HUB_OFFLINE else f"cannot reach {constants.ENDPOINT} (HF_ENDPOINT): {exc}")
        raise HubError(f"checkpoint {uri}: {where.label()} is not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}) and {fix}") from None
    local = snapshot / where.path
    if where.path and not local.exists():
        raise HubError(f"checkpoint {uri} not found: {where.label()} holds no file or folder {where.path!r}; check "
                       f"the path against the repo's files ({constants.ENDPOINT}/{where.repo_id}/tree/"
                       f"{where.revision or constants.DEFAULT_REVISION})")
    return local
