"""Checkpoints on the Hugging Face Hub: ``hf-hub:`` specs, downloads into the user's cache, one-line errors.

    hf-hub:hustvl/Vim-small-midclstok/vim_s_midclstok_80p5acc.pth     # a file
    hf-hub:Soptq/R-Meeto@<commit>/Vim-S_15epoch_80.0                 # a folder holding one checkpoint
    hf-hub:user/my-export                                            # a repo (an rmeeto export)

Everything goes through ``huggingface_hub`` (its cache layout under ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, tokens); this module only picks the file and turns the client's
exceptions into a :class:`~rmeeto.models.checkpoint.CheckpointError` naming the repo, revision and file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile

from rmeeto.models.checkpoint import CheckpointError

PREFIX = "hf-hub:"
#: Files that hold weights, by suffix.
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubRef:
    """A place on the Hub: ``repo_id`` (owner/name), ``path`` inside it ("" = the repo root; a file when it
    ends in a checkpoint suffix, else a folder), ``revision`` (branch, tag or commit; None = main)."""

    repo_id: str
    path: str = ""
    revision: str | None = None

    @property
    def is_file(self) -> bool:
        return self.path.endswith(CHECKPOINT_SUFFIXES)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.repo_id}{rev}{'/' + self.path if self.path else ''}"


def is_hub_spec(value: object) -> bool:
    """Whether ``value`` is an ``hf-hub:`` string (or a Path made from one, as argparse ``type=Path`` gives)."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(PREFIX)


def parse(spec: str | os.PathLike) -> HubRef:
    """``hf-hub:owner/name[@revision][/path]`` → HubRef; ValueError naming the spec when malformed."""
    spec = os.fspath(spec)
    if not is_hub_spec(spec):
        raise ValueError(f"{spec!r}: not a Hub reference (expected {PREFIX}owner/name[@revision][/path])")
    parts = spec[len(PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{spec!r}: expected {PREFIX}owner/name[@revision][/path]")
    name, _, revision = parts[1].partition("@")
    return HubRef(f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None)


def fetch(ref: HubRef) -> Path:
    """The local cached path of the checkpoint ``ref`` names (downloaded if needed); a folder ref is listed
    and must hold exactly one checkpoint file. CheckpointError naming the repo and file otherwise."""
    filename = ref.path if ref.is_file else choose_checkpoint(ref, list_files(ref))
    return download(ref.repo_id, filename, ref.revision)


def download(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """``hf_hub_download`` into the user's cache, then check the bytes against the Hub's sha256 ETag."""
    where = f"{PREFIX}{repo_id}{'@' + revision if revision else ''}/{filename}"
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, library_name="rmeeto"))
    except Exception as err:
        raise _hub_error(where, err) from err
    verify_download(path, where)
    return path


def verify_download(path: Path, where: str) -> None:
    """Compare a cached file with its blob name when that is a sha256 (LFS files: the Hub's ETag)."""
    blob = path.resolve()
    if not _SHA256.fullmatch(blob.name):
        return
    digest = file_sha256(blob)
    if digest != blob.name:
        raise CheckpointError(f"{where}: corrupt download {blob} (sha256 {digest[:12]}…, the Hub says "
                              f"{blob.name[:12]}…); delete that file and download again")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(ref: HubRef) -> list[str]:
    """Repo paths of the files directly inside the folder ``ref.path``: from the Hub, or from the local
    cache when the Hub cannot be reached (offline mode, no network)."""
    try:
        entries = HfApi().list_repo_tree(ref.repo_id, path_in_repo=ref.path or None, revision=ref.revision)
        return [entry.path for entry in entries if isinstance(entry, RepoFile)]
    except (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException) as err:
        cached = cached_files(ref)
        if cached is None:
            raise CheckpointError(f"{ref}: cannot reach the Hub ({type(err).__name__}) and nothing of it is in "
                                  f"the cache {constants.HF_HUB_CACHE}") from err
        return cached
    except Exception as err:
        raise _hub_error(str(ref), err) from err


def cached_files(ref: HubRef) -> list[str] | None:
    """Repo paths of the files in folder ``ref.path`` of the cached snapshot (None if not cached)."""
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
    revision = ref.revision or constants.DEFAULT_REVISION
    commit = revision if _COMMIT.fullmatch(revision) else None
    ref_file = storage / "refs" / revision
    if commit is None and ref_file.is_file():
        commit = ref_file.read_text().strip()
    folder = storage / "snapshots" / (commit or "") / ref.path
    if commit is None or not folder.is_dir():
        return None
    return sorted(str(PurePosixPath(ref.path) / p.name) if ref.path else p.name
                  for p in folder.iterdir() if p.is_file())


def choose_checkpoint(ref: HubRef, files: list[str]) -> str:
    """The one checkpoint among ``files`` (a single ``*best*`` one wins over others); CheckpointError
    listing them when there is none or the choice is ambiguous."""
    candidates = [f for f in files if f.endswith(CHECKPOINT_SUFFIXES)]
    best = [f for f in candidates if "best" in PurePosixPath(f).name.lower()]
    if len(candidates) == 1 or len(best) == 1:
        return (best or candidates)[0]
    if not candidates:
        raise CheckpointError(f"{ref}: no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) there; "
                              f"files: {', '.join(files) or 'none'}")
    raise CheckpointError(f"{ref}: {len(candidates)} checkpoint files, name one: "
                          + ", ".join(f"{PREFIX}{ref.repo_id}/{f}" for f in candidates))


def _hub_error(where: str, err: Exception) -> CheckpointError:
    """One line for what went wrong while reaching ``where`` (order matters: subclasses first)."""
    if isinstance(err, RevisionNotFoundError):
        why = "no such revision on the Hub"
    elif isinstance(err, RepositoryNotFoundError):
        why = "no such repository on the Hub (or it is private: log in with `hf auth login`)"
    elif isinstance(err, LocalEntryNotFoundError):
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        why = f"cannot reach the Hub{offline} and the file is not in the cache {constants.HF_HUB_CACHE}"
    elif isinstance(err, EntryNotFoundError):
        why = "not found in the repository"
    elif isinstance(err, HfHubHTTPError):
        why = f"the Hub answered HTTP {err.response.status_code}"
    elif isinstance(err, (OfflineModeIsEnabled, httpx2.HTTPError, OSError)):
        why = f"cannot reach the Hub ({type(err).__name__}: {err})"
    else:
        raise err
    return CheckpointError(f"{where}: {why}")


CITATIONS = """\
```bibtex
@misc{shi2024rmeeto,
  title  = {Faster Vision Mamba is Rebuilt in Minutes via Merged Token Re-training},
  author = {Shi, Mingjia and Zhou, Yuhao and Yu, Ruiji and Li, Zekai and Liang, Zhiyuan and Zhao, Xuanlei and
            Peng, Xiaojiang and Rajpurohit, Tanmay and Vedantam, Ramakrishna and Zhao, Wangbo and Wang, Kai and
            You, Yang},
  year   = {2024}
}
@article{ma2025mtr,
  title   = {Training-free Token Reduction for Vision Mamba},
  author  = {Ma, Qiankun and Zhang, Ziyao and Su, Chi and Chen, Jie and Song, Zhen and Zheng, Hairong and Gao, Wen},
  journal = {arXiv preprint arXiv:2507.14042},
  year    = {2025}
}
```"""


def model_card(config: dict, repo_id: str, gflops: tuple[float, float] | None) -> str:
    """README.md for an rmeeto export: architecture, reduction, GFLOPs (unreduced, reduced), the accuracy and
    dataset recorded in ``extra`` (``top1``, ``dataset``), normalisation, how to load it, both papers."""
    model, extra = config["model"], config.get("extra") or {}
    arch = model["config"]
    reduction = config.get("reduction")
    dataset = extra.get("dataset")
    front = ["---", "library_name: rmeeto", "pipeline_tag: image-classification",
             "tags: [vision-mamba, token-reduction, rmeeto, timm]"]
    front += [f"datasets: [{json_str(dataset)}]"] if dataset else []
    size = arch.get("img_size")
    rows = [("architecture", f"{model.get('name') or 'custom'} ({model.get('family', 'VimConfig')}: embed dim "
                             f"{arch.get('embed_dim')}, depth {arch.get('depth')}, patch {arch.get('patch_size')}, "
                             f"{size}×{size} input, {arch.get('num_classes')} classes)")]
    if reduction:
        settings = {k: v for k, v in reduction.items() if k not in ("method", "options")}
        settings.update(reduction.get("options") or {})
        rows.append(("token reduction", f"{reduction.get('method')}: "
                     + ", ".join(f"{k}={v}" for k, v in settings.items())))
    else:
        rows.append(("token reduction", "none"))
    if gflops:
        before, after = gflops
        rows.append(("GFLOPs", f"{before:.2f} unreduced → {after:.2f} ({(after - before) / before:+.1%})"))
    if extra.get("top1") is not None:
        rows.append(("top-1", f"{extra['top1']} % on {dataset or 'an unrecorded dataset'} (measured before export)"))
    weights = config.get("weights", {})
    rows.append(("weights", f"{'EMA' if weights.get('ema') else 'live'} weights, sha256 {weights.get('sha256', '?')}"))
    data = config.get("data") or {}
    if data:
        rows.append(("input normalisation", f"mean {data.get('mean')}, std {data.get('std')}"))
    others = {k: v for k, v in extra.items() if k not in ("top1", "dataset")}
    rows += [(f"recorded: {k}", str(v)) for k, v in others.items()]
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    usage = (f"```python\nimport rmeeto.export\n\nmodel = rmeeto.export.load(\"{PREFIX}{repo_id}\")"
             "  # eval mode, reduction attached\n```\n\n"
             f"or `python eval.py --export {PREFIX}{repo_id} --data <val set>`.")
    return "\n".join(front + ["---", "", f"# {repo_id.split('/')[-1]}", "",
                              "A token-reduced Vision Mamba exported by rmeeto (R-MeeTo / MTR).", "", *table, "",
                              "## How to load", "", usage, "", "## Citation", "", CITATIONS, ""])


def json_str(value: object) -> str:
    """A YAML-safe scalar (JSON strings are valid YAML)."""
    return json.dumps(str(value))
