"""rmeeto.load_checkpoint on a DeepSpeed ZeRO-2 checkpoint directory written by a real DeepSpeed engine (CPU, gloo).

The test runs this file as a script (DeepSpeed's process group stays out of the pytest process): it trains the
tiny Vim one step under ZeRO-2 inside a holder whose keys are the LightningModule's (``model.*``), saves the
checkpoint as Lightning's DeepSpeedStrategy does (tag ``checkpoint``) and the expected weights beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rmeeto
from rmeeto.models import CheckpointError

TINY = {"img_size": 32, "depth": 2, "embed_dim": 32}


def write_checkpoint(out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = rmeeto.create_model("vim_demo", **TINY)
    optimizer = torch.optim.AdamW(holder.model.parameters(), lr=1e-2)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=holder, optimizer=optimizer,
                                      config={"train_batch_size": 2, "zero_optimization": {"stage": 2}})
    loss = engine.module.model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(str(out / "last.ckpt"), tag="checkpoint", client_state={"global_step": 1})
    torch.save(engine.module.model.state_dict(), out / "expected.pt")


def test_load_checkpoint_reads_a_deepspeed_directory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, timeout=600, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 0, result.stdout[-4000:]
    directory = tmp_path / "last.ckpt"
    assert (directory / "latest").read_text() == "checkpoint"

    model = rmeeto.load_checkpoint(rmeeto.create_model("vim_demo", **TINY), directory)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    fresh = rmeeto.create_model("vim_demo", **TINY)
    assert not torch.equal(fresh.head.weight, expected["head.weight"])
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[key]), key

    (directory / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last\.ckpt: not a readable DeepSpeed checkpoint"):
        rmeeto.load_checkpoint(fresh, directory)


if __name__ == "__main__":
    write_checkpoint(Path(sys.argv[1]))
