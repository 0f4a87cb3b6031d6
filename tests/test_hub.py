"""Hugging Face Hub: downloads, cache, offline mode, revisions, errors and push, against a Hub stand-in.

:class:`HubStandIn` is a small HTTP server on 127.0.0.1 that answers the few Hub endpoints the real
``huggingface_hub`` client calls (resolve with its X-Repo-Commit/ETag headers, tree listing, repo and branch
creation, YAML validation, preupload and NDJSON commit). The client is pointed at it through its own
configuration (``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``: module constants it reads at import,
set here in ``huggingface_hub.constants``; one test sets the real environment variables in a fresh process).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import lightning as L
import pytest
import torch
from huggingface_hub import constants

import rmeeto
import rmeeto.reduction
from rmeeto import export
from rmeeto import hub as hub_module
from rmeeto.lit import RMeeToModule
from rmeeto.lit.push import PushToHub
from rmeeto.models import CheckpointError

TINY = {"depth": 4}  # vim_tiny with four blocks: the public checkpoints' key names, a small file


class HubStandIn(ThreadingHTTPServer):
    """repos: repo id → {branch: commit}; commits: commit → {path: bytes}; ``corrupt``: paths served with
    flipped bytes (same length, so only a content check can notice)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict[str, str]] = {}
        self.commits: dict[str, dict[str, bytes]] = {}
        self.corrupt: set[str] = set()
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add ``files`` on top of ``branch`` (created from nothing if new); returns the commit id."""
        branches = self.repos.setdefault(repo_id, {})
        tree = dict(self.commits.get(branches.get(branch, ""), {}))
        tree.update(files)
        sha = hashlib.sha1(f"{repo_id}{len(self.commits)}{sorted(tree)}".encode()).hexdigest()
        self.commits[sha] = tree
        branches[branch] = sha
        return sha


def _oid(data: bytes, path: str) -> str:
    """The Hub's ETag: sha256 for LFS files (weights), the git blob id for small text files."""
    if path.endswith((".pth", ".safetensors")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code, **(headers or {})})

    def _resolve(self, repo_id: str, revision: str) -> str | None:
        """Commit of ``revision`` in ``repo_id``; sends the 404 and returns None when there is none."""
        branches = self.server.repos.get(repo_id)
        if branches is None:
            self._error(404, "RepoNotFound")
            return None
        if revision in branches:
            return branches[revision]
        if revision in self.server.commits:
            return revision
        self._error(404, "RevisionNotFound")
        return None

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        self.server.requests.append(f"{self.command} {'/'.join(parts)}")
        if len(parts) >= 5 and parts[2] == "resolve":  # owner/name/resolve/rev/path...
            repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            commit = self._resolve(repo_id, revision)
            if commit is None:
                return
            tree = self.server.commits[commit]
            if path not in tree:
                self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
                return
            data = tree[path]
            served = bytes(b ^ 0xFF for b in data) if path in self.server.corrupt else data
            self._send(200, served, {"X-Repo-Commit": commit, "ETag": f'"{_oid(data, path)}"'},
                       "application/octet-stream")
        elif len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":  # api/models/o/n/tree/rev
            repo_id, revision, folder = "/".join(parts[2:4]), parts[5], "/".join(parts[6:])
            commit = self._resolve(repo_id, revision)
            if commit is None:
                return
            prefix = f"{folder}/" if folder else ""
            children: dict[str, dict] = {}
            for path, data in self.server.commits[commit].items():
                if not path.startswith(prefix):
                    continue
                head, sep, _ = path[len(prefix):].partition("/")
                if sep:
                    children[prefix + head] = {"type": "directory", "oid": "0" * 40, "size": 0, "path": prefix + head}
                else:
                    children[path] = {"type": "file", "oid": _oid(data, path), "size": len(data), "path": path}
            if folder and not children:
                self._error(404, "EntryNotFound")
                return
            self._json(sorted(children.values(), key=lambda e: e["path"]))
        else:
            self._error(404, "NotFound")

    def do_POST(self) -> None:
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        self.server.requests.append(f"POST {'/'.join(parts)}")
        body = self._body()
        if parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{self.server.url}/{repo_id}"
            if repo_id in self.server.repos:  # the Hub names the existing repo in its 409
                self._send(409, json.dumps({"error": "You already created this model repo", "url": url}).encode())
                return
            self.server.commit(repo_id, {})
            self._json({"url": url})
        elif parts == ["api", "validate-yaml"]:
            self._json({"errors": [], "warnings": []})
        elif len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("branch", "preupload", "commit"):
            repo_id, revision = "/".join(parts[2:4]), parts[5]
            if repo_id not in self.server.repos:
                self._error(404, "RepoNotFound")
                return
            branches = self.server.repos[repo_id]
            if parts[4] == "branch":
                if revision in branches:
                    self._error(409, "BranchExists")
                    return
                branches[revision] = branches["main"]
                self._json({})
            elif parts[4] == "preupload":
                files = json.loads(body)["files"]
                self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                      for f in files]})
            else:
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                sha = self.server.commit(repo_id, files, branch=revision)
                self._json({"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                            "pullRequestUrl": None})
        else:
            self._error(404, "NotFound")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running stand-in, with the client's endpoint and cache pointed at it and at ``tmp_path/hf/hub``."""
    server = HubStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    point_client_at(monkeypatch, server.url, tmp_path / "hf" / "hub")
    yield server
    server.shutdown()
    server.server_close()


def point_client_at(monkeypatch, endpoint: str, cache: Path) -> None:
    """What HF_ENDPOINT and HF_HUB_CACHE set when huggingface_hub is imported."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def vim_checkpoint(seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A Vim-Ti (four blocks) checkpoint as the Vim authors save theirs: ``{"model": ..., "args": Namespace}``."""
    torch.manual_seed(seed)
    state = rmeeto.create_model("vim_tiny", **TINY).state_dict()
    buffer = io.BytesIO()
    torch.save({"model": state, "epoch": 299, "args": argparse.Namespace(model="vim_tiny")}, buffer)
    return buffer.getvalue(), state


def same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


VIM_T = ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")


def test_a_tag_downloads_into_the_hf_cache_and_loads_strictly(hub, tmp_path):
    data, state = vim_checkpoint(0)
    commit = hub.commit(VIM_T[0], {VIM_T[1]: data, "README.md": b"# Vim-Ti\n"})
    model = rmeeto.create_model("vim_tiny_patch16_224_midclstok.in1k", pretrained=True, **TINY)
    assert same_weights(model, state)
    assert model.pretrained_cfg["paper_top1"] == 76.1 and model.pretrained_cfg["paper_gflops"] == 1.45
    snapshot = tmp_path / "hf/hub/models--hustvl--Vim-tiny-midclstok/snapshots" / commit / VIM_T[1]
    assert snapshot.is_symlink() and snapshot.resolve().name == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "hf/hub/models--hustvl--Vim-tiny-midclstok/refs/main").read_text() == commit

    downloads = sum(r.startswith("GET") for r in hub.requests)
    again = rmeeto.create_model("vim_tiny", pretrained=True, **TINY)  # the default tag; served from the cache
    assert same_weights(again, state) and sum(r.startswith("GET") for r in hub.requests) == downloads
    with pytest.raises(CheckpointError, match=r"does not fit this model.*'layers\.4"):  # strict: 4 blocks, not 24
        rmeeto.create_model("vim_tiny", pretrained=True)


def test_rmeeto_folders_are_listed_for_their_one_checkpoint(hub):
    data, state = vim_checkpoint(1)
    hub.commit("Soptq/R-Meeto", {"Vim-Ti_30epoch_75.3/checkpoint.pth": data, "Vim-Ti_30epoch_75.3/log.txt": b"ok",
                                 "Vim-S_15epoch_80.0/a.pth": data, "Vim-S_15epoch_80.0/b.pth": data})
    model = rmeeto.create_model("vim_tiny_patch16_224_midclstok.rmeeto_r5", pretrained=True, **TINY)
    assert same_weights(model, state)
    assert model.pretrained_cfg["reduction"] == {"method": "rmeeto", "r": 5}
    rmeeto.reduction.apply(model, **model.pretrained_cfg["reduction"])
    with pytest.raises(CheckpointError, match=r"Vim-S_15epoch_80\.0: 2 checkpoint files, name one: "
                                              r"hf-hub:Soptq/R-Meeto/Vim-S_15epoch_80\.0/a\.pth"):
        rmeeto.create_model("vim_small_patch16_224_midclstok.rmeeto_r11", pretrained=True, **TINY)
    with pytest.raises(CheckpointError, match=r"Vim-B_15epochs_81\.3: not found in the repository"):
        rmeeto.create_model("vim_base_patch16_224_midclstok.rmeeto_r11", pretrained=True, **TINY)


def test_revisions_pin_the_weights(hub):
    old_data, old_state = vim_checkpoint(2)
    new_data, new_state = vim_checkpoint(3)
    old = hub.commit(VIM_T[0], {VIM_T[1]: old_data})
    hub.commit(VIM_T[0], {VIM_T[1]: new_data})
    hub.repos[VIM_T[0]]["v1"] = old
    latest = rmeeto.create_model("vim_tiny", pretrained=f"hf-hub:{VIM_T[0]}/{VIM_T[1]}", **TINY)
    assert same_weights(latest, new_state) and "paper_top1" not in latest.pretrained_cfg
    for revision in (old, "v1"):  # a Path, as eval.py's argparse gives it, works too
        pinned = rmeeto.create_model("vim_tiny", pretrained=Path(f"hf-hub:{VIM_T[0]}@{revision}/{VIM_T[1]}"), **TINY)
        assert same_weights(pinned, old_state), revision
    import timm  # timm's own form: owner/name@revision in hf_hub_id

    overlay = timm.create_model("vim_tiny_patch16_224_midclstok", pretrained=True, **TINY,
                                pretrained_cfg_overlay={"hf_hub_id": f"{VIM_T[0]}@{old}"})
    assert same_weights(overlay, old_state)
    with pytest.raises(CheckpointError, match=r"@nope/vim_t_midclstok_76p1acc\.pth: no such revision"):
        rmeeto.create_model("vim_tiny", pretrained=f"hf-hub:{VIM_T[0]}@nope/{VIM_T[1]}", **TINY)


def test_missing_repo_or_file_and_corrupt_downloads_are_one_line_errors(hub):
    data, _ = vim_checkpoint(4)
    hub.commit(VIM_T[0], {VIM_T[1]: data, "other.pth": data})
    with pytest.raises(CheckpointError, match=r"^hf-hub:hustvl/Vim-tiny-midclstok/nope\.pth: not found in the "
                                              r"repository$"):
        rmeeto.create_model("vim_tiny", pretrained="hf-hub:hustvl/Vim-tiny-midclstok/nope.pth", **TINY)
    with pytest.raises(CheckpointError, match=r"^hf-hub:someone/missing/w\.pth: no such repository"):
        rmeeto.create_model("vim_tiny", pretrained="hf-hub:someone/missing/w.pth", **TINY)
    with pytest.raises(CheckpointError, match=r"^hf-hub:hustvl/Vim-tiny-midclstok: 2 checkpoint files, name one"):
        rmeeto.load_checkpoint(rmeeto.create_model("vim_tiny", **TINY), "hf-hub:hustvl/Vim-tiny-midclstok")
    hub.corrupt.add("other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: corrupt download .*delete that file") as err:
        rmeeto.create_model("vim_tiny", pretrained="hf-hub:hustvl/Vim-tiny-midclstok/other.pth", **TINY)
    assert "\n" not in str(err.value)


def test_offline_mode_uses_the_cache_and_says_what_is_missing(hub, monkeypatch):
    data, state = vim_checkpoint(5)
    hub.commit(VIM_T[0], {VIM_T[1]: data})
    hub.commit("Soptq/R-Meeto", {"Vim-Ti_30epoch_75.3/best_checkpoint.pth": data,
                                 "Vim-Ti_30epoch_75.3/checkpoint.pth": data})
    rmeeto.create_model("vim_tiny", pretrained=True, **TINY)
    rmeeto.create_model("vim_tiny_patch16_224_midclstok.rmeeto_r5", pretrained=True, **TINY)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    assert same_weights(rmeeto.create_model("vim_tiny", pretrained=True, **TINY), state)
    assert same_weights(rmeeto.create_model("vim_tiny_patch16_224_midclstok.rmeeto_r5", pretrained=True, **TINY),
                        state)  # the folder is listed from the cached snapshot
    assert len(hub.requests) == requests
    with pytest.raises(CheckpointError, match=r"vim_s_midclstok_80p5acc\.pth: cannot reach the Hub \(HF_HUB_OFFLINE "
                                              r"is set\) and the file is not in the cache"):
        rmeeto.create_model("vim_small", pretrained=True, depth=2)


def test_no_network_and_nothing_cached(tmp_path, monkeypatch):
    with socket_closed() as port:
        point_client_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hub")
        with pytest.raises(CheckpointError, match=r"vim_t_midclstok_76p1acc\.pth: cannot reach the Hub and the file "
                                                  r"is not in the cache"):
            rmeeto.create_model("vim_tiny", pretrained=True, **TINY)
        with pytest.raises(CheckpointError, match=r"Soptq/R-Meeto/Vim-Ti_30epoch_75\.3: cannot reach the Hub"):
            rmeeto.create_model("vim_tiny_patch16_224_midclstok.rmeeto_r5", pretrained=True, **TINY)


class socket_closed:
    """A 127.0.0.1 port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass


def reduced_demo() -> rmeeto.models.VisionMamba:
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", img_size=32, depth=4, embed_dim=32)
    rmeeto.reduction.apply(model, "rmeeto", r=2)
    return model.eval()


def test_push_then_load_back_without_lightning(hub, tmp_path):
    model = reduced_demo()
    export.save(model, tmp_path / "export", extra={"top1": 91.5, "dataset": "digits-val"}, mean=(0.5,) * 3,
                std=(0.2,) * 3)
    url = export.push_to_hub(tmp_path / "export", "me/vim-demo-rmeeto")
    commit = hub.repos["me/vim-demo-rmeeto"]["main"]
    assert url.endswith(f"/me/vim-demo-rmeeto/commit/{commit}")
    files = hub.commits[commit]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert files["model.safetensors"] == (tmp_path / "export/model.safetensors").read_bytes()
    card = files["README.md"].decode()
    for expected in ("library_name: rmeeto", "VimConfig: embed dim 32, depth 4", "token reduction | rmeeto",
                     "GFLOPs", "unreduced →", "91.5 % on digits-val", 'rmeeto.export.load("hf-hub:me/vim-demo-rmeeto")',
                     "Faster Vision Mamba is Rebuilt in Minutes", "Training-free Token Reduction for Vision Mamba"):
        assert expected in card, expected

    loaded = export.load("hf-hub:me/vim-demo-rmeeto")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)

    torch.manual_seed(1)
    export.save(rmeeto.create_model("vim_demo", img_size=32, depth=4, embed_dim=32), tmp_path / "v2")
    export.push_to_hub(tmp_path / "v2", "me/vim-demo-rmeeto", revision="v2")
    assert hub.repos["me/vim-demo-rmeeto"]["main"] == commit  # the branch moved, main did not
    with torch.no_grad():
        assert torch.equal(export.load("hf-hub:me/vim-demo-rmeeto")(x), model(x))
        assert export.load("hf-hub:me/vim-demo-rmeeto@v2").token_reducer is None


def test_a_broken_export_is_refused_before_any_upload(hub, tmp_path):
    export.save(reduced_demo(), tmp_path / "export")
    weights = tmp_path / "export/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not the ones"):
        export.push_to_hub(tmp_path / "export", "me/broken")
    assert hub.requests == []


def test_push_to_hub_callback_uploads_at_the_end_of_fit(hub, tmp_path, demo_shards):
    from rmeeto.data import Augment, WebDatasetDataModule

    L.seed_everything(0)
    module = RMeeToModule(model_overrides={"img_size": 32, "depth": 4, "embed_dim": 32},
                          reduction={"method": "rmeeto", "r": 2}, mixup=0.0, cutmix=0.0)
    data = WebDatasetDataModule(str(demo_shards), img_size=32, batch_size=16, num_workers=0,
                                augment=Augment(auto_augment=None, reprob=0.0))
    push = PushToHub("me/demo-run", dataset="demo digits")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[push], val_check_interval=1)
    trainer.fit(module, datamodule=data)
    files = hub.commits[hub.repos["me/demo-run"]["main"]]
    config = json.loads(files["config.json"])
    assert config["extra"]["global_step"] == 2 and config["extra"]["dataset"] == "demo digits"
    assert 0 <= config["extra"]["top1"] <= 100 and f"{config['extra']['top1']} % on demo digits" in \
        files["README.md"].decode()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(export.load("hf-hub:me/demo-run")(x), module.model.eval()(x))


def test_hf_home_and_hf_hub_offline_are_read_from_the_environment(hub, tmp_path):
    """A fresh process with only environment variables set finds what an earlier download cached."""
    data, state = vim_checkpoint(6)
    hub.commit(VIM_T[0], {VIM_T[1]: data})
    rmeeto.create_model("vim_tiny", pretrained=True, **TINY)  # cached under tmp_path/hf/hub
    torch.save(state, tmp_path / "expected.pth")
    script = (
        "import torch, rmeeto\n"
        f"model = rmeeto.create_model('vim_tiny', pretrained=True, depth={TINY['depth']})\n"
        f"expected = torch.load({str(tmp_path / 'expected.pth')!r})\n"
        "assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())\n"
        "print('loaded', model.pretrained_cfg['paper_top1'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with socket_closed() as port:
        env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{port}")
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                cwd=Path(__file__).parents[1], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "loaded 76.1"


@pytest.mark.parametrize("spec,expected", [
    ("hf-hub:hustvl/Vim-small-midclstok", ("hustvl/Vim-small-midclstok", "", None)),
    ("hf-hub:Soptq/R-Meeto@abc123/Vim-S_15epoch_80.0", ("Soptq/R-Meeto", "Vim-S_15epoch_80.0", "abc123")),
    ("hf-hub:a/b/sub/w.pth", ("a/b", "sub/w.pth", None)),
])
def test_hub_references_parse_and_print_back(spec, expected):
    ref = hub_module.parse(spec)
    assert (ref.repo_id, ref.path, ref.revision) == expected and str(ref) == spec
    with pytest.raises(ValueError, match="owner/name"):
        hub_module.parse("hf-hub:just-a-name")


def test_deit_weights_come_through_timms_own_pretrained_config(hub):
    """create_deit(pretrained=True) is timm's download (timm/deit_*.fb_in1k on the Hub), loaded strictly."""
    import timm
    from safetensors.torch import save

    from rmeeto.models.deit import create_deit

    torch.manual_seed(0)
    state = timm.create_model("deit_tiny_patch16_224", depth=2).state_dict()
    hub.commit("timm/deit_tiny_patch16_224.fb_in1k", {"model.safetensors": save(state)})
    model = create_deit("deit_tiny_patch16_224", pretrained=True, depth=2)
    assert same_weights(model.vit, state)
    assert any("timm/deit_tiny_patch16_224.fb_in1k" in r for r in hub.requests)
