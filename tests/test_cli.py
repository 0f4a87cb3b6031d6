"""train.py's command line (rmeeto.lit.cli): one-line errors, early checks of --ckpt_path and output dirs, the
scan backend line."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from rmeeto.data import ShardError
from rmeeto.lit.callbacks import main_process_only
from rmeeto.lit.cli import error_line, main, run

ROOT = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "depth": 4, "embed_dim": 32}


@pytest.fixture(autouse=True)
def one_thread_and_clean_argv(monkeypatch):
    """LightningCLI(args=…) must not see pytest's own command line; tiny models run fastest single-threaded."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run(shards: Path | str, out: Path, *extra: str) -> list[str]:
    """``fit`` arguments for a few steps of a tiny Vim on the demo shards, everything written under ``out``."""
    return [
        "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--model.pretrained", "null",
        "--model.model_overrides", yaml.safe_dump(TINY, default_flow_style=True).strip(),
        "--model.reduction", "{method: rmeeto, r: 2}",
        "--data.init_args.root", str(shards), "--data.init_args.img_size", "32",
        "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(out / "run"), "--trainer.logger.init_args.save_dir", str(out / "run"),
        "--checkpoint.dirpath", str(out / "ckpt"), "--checkpoint.every_n_train_steps", "1",
        "--export.export_dir", str(out / "export"),
        *extra,
    ]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_yaml_typo_names_the_key_on_the_last_line_without_the_usage(tmp_path, capsys):
    for block, key in ((({"reduction": {"method": "rmeeto", "rr": 8}}), "model.reduction: Option 'rr' is not accepted"),
                       ({"reduction": {"method": "rmeeto", "r": 8, "parity": "evn"}}, "model.reduction.parity"),
                       ({"lrr": 0.1}, "model.lrr")):
        config = tmp_path / "typo.yaml"
        config.write_text(yaml.safe_dump({"model": block}))
        assert run(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert last_line(err).startswith("error: ") and key in last_line(err), err
        assert "usage:" not in err and "Traceback" not in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--model.model", "vim_nope"], "unknown model 'vim_nope'"),
    (["--model.reduction", "{method: rmeeto, r: 40}"], "r=40 tokens to merge"),
    (["--model.pretrained", "/nonexistent/vim.pth"], "checkpoint not found: /nonexistent/vim.pth"),
    (["--data.init_args.root", "/nonexistent/shards"], "/nonexistent/shards"),
])
def test_known_errors_are_one_line_without_traceback(tmp_path, capsys, extra, message):
    assert run(tiny_run("/nonexistent/shards", tmp_path, *extra)) == 1
    err = capsys.readouterr().err
    assert last_line(err).startswith("error: ") and message in last_line(err), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    args = tiny_run(tmp_path, tmp_path, "--model.model", "vim_nope")
    assert run(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "unknown model 'vim_nope'" in last_line(err)
    monkeypatch.setenv("RMEETO_DEBUG", "1")
    assert run(args) == 1
    assert "Traceback" in capsys.readouterr().err


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert run(tiny_run(tmp_path, tmp_path, "--ckpt_path", "last")) == 1
    assert f"no last*.ckpt in checkpoint.dirpath {tmp_path / 'ckpt'}" in last_line(capsys.readouterr().err)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(256)) * 4)
    assert run(tiny_run(tmp_path, tmp_path, "--ckpt_path", str(junk))) == 1
    err = capsys.readouterr().err
    assert f"{junk}: not a PyTorch checkpoint" in last_line(err) and "weights_only" not in err


class BatchCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


@pytest.mark.parametrize("output", ["export.export_dir", "checkpoint.dirpath"])
def test_unwritable_output_dirs_fail_before_training(demo_shards, tmp_path, capsys, output):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    counter = BatchCounter()
    args = tiny_run(demo_shards, tmp_path, f"--{output}", str(blocker / "out"))
    with pytest.raises(OSError, match=f"{output} {blocker / 'out'} is not writable"):
        main(args, trainer_defaults={"callbacks": [counter]})
    assert counter.batches == 0
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "export").exists()
    assert "scan backend: cpu (device cpu" in capsys.readouterr().out


class BrokenShard(IterableDataset):
    def __iter__(self) -> Any:
        raise ShardError("truncated tar header", shard="/data/train-000003.tar", key="n01440764_10026")


def test_error_from_a_dataloader_worker_is_one_line():
    with pytest.raises(ShardError) as info:
        next(iter(DataLoader(BrokenShard(), num_workers=1)))
    assert "Traceback" in str(info.value)  # the worker's traceback travels in the message
    line = error_line(info.value)
    assert line == ("rmeeto.data.shards.ShardError: shard /data/train-000003.tar, sample 'n01440764_10026': "
                    "truncated tar header")


class SignalInWorker(IterableDataset):
    """Sends SIGUSR1 to its own (worker) process, then yields one item."""

    def __iter__(self) -> Any:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)  # let the handler run
        yield 0


def test_requeue_signal_is_handled_in_the_training_process_only(tmp_path):
    """A forked DataLoader worker inherits the training process's handler; after main_process_only it ignores it."""
    def handled_by(log: Path) -> list[int]:
        return [int(pid) for pid in log.read_text().split()] if log.exists() else []

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        for guarded in (False, True):
            log = tmp_path / f"guarded_{guarded}.txt"
            signal.signal(signal.SIGUSR1, lambda *_, log=log: log.open("a").write(f"{os.getpid()}\n"))
            if guarded:
                main_process_only(signal.SIGUSR1)
            list(DataLoader(SignalInWorker(), num_workers=1))
            os.kill(os.getpid(), signal.SIGUSR1)
            handlers = handled_by(log)
            assert handlers[-1] == os.getpid()
            assert (len(handlers) == 1) == guarded, handlers  # unguarded, the worker ran the handler too
    finally:
        signal.signal(signal.SIGUSR1, previous)
