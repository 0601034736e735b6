"""One injected worker failure mid-training: Ray Train restarts the workers, they continue from the last
checkpoint with the step count it held, and the run finishes."""

import json

import pytest
import torch

from trainers.align import AlignConfig, align
from trainers.checkpoint import load_model
from trainers.finetune import FinetuneConfig, finetune
from trainers.loop import INJECTED_FAILURE, load_optimizer_tensors, optimizer_tensors
from trainers.models import ModelSize

pytestmark = pytest.mark.integration

SIZE = ModelSize(hidden=16, num_heads=2, inner=32, num_layers=1, max_history=8)


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    tensors = optimizer_tensors(optimizer)
    # Two parameters (weight, bias), each with step, exp_avg, exp_avg_sq.
    assert sorted(tensors) == ["0.exp_avg", "0.exp_avg_sq", "0.step", "1.exp_avg", "1.exp_avg_sq", "1.step"]
    # Every gradient entry is 4 (weight: sum of four ones; bias: four), so exp_avg = (1 - 0.9) * 4 = 0.4.
    assert torch.allclose(tensors["0.exp_avg"], torch.full((2, 3), 0.4))
    again = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    load_optimizer_tensors(again, tensors)
    state = again.state_dict()["state"]
    assert float(state[1]["step"]) == 1.0 and torch.allclose(state[1]["exp_avg_sq"], torch.full((2,), 0.016))


def test_finetune_resumes_after_a_worker_failure(ray_session, fake_features, tmp_path):
    # One worker, 400 video and 160 comment train examples, batch 256: 2 steps per epoch, so step 3 is the
    # first step of epoch 2 and the last checkpoint before it is epoch 1's (step 2). materialize_max_mb=0:
    # the examples stream from Parquet every epoch, as a large features folder does.
    out = tmp_path / "ckpt"
    finetune(FinetuneConfig(features=str(fake_features), out=str(out), epochs=2, patience=2, batch_size=256,
                            num_workers=1, fail_once_at_step=3, max_eval_examples=50, log_every=1000,
                            materialize_max_mb=0, size=SIZE))
    assert (out / INJECTED_FAILURE).read_text().strip() == "3"  # the failure did happen
    info = json.loads((out / "train.json").read_text())
    assert info["resumed_from"] == [2]
    assert [(h["epoch"], h["step"]) for h in info["history"]] == [(1, 2), (2, 4)]
    assert [h["examples"] for h in info["history"]] == [400 + 160, 400 + 160]  # every example, every epoch
    assert info["epochs_run"] == 2 and info["best_epoch"] in (1, 2)
    assert load_model(out)[0] == "sr"


def test_align_resumes_after_a_worker_failure(ray_session, tiny_llm, fake_features, tmp_path):
    # Checkpoints at steps 2 and 4; the failure after step 3 sends the worker back to step 2, not to 0.
    out = tmp_path / "aligned"
    align(AlignConfig(features=str(fake_features), out=str(out), llm=str(tiny_llm), llm_mode="lora",
                      max_steps=5, batch_size=8, checkpoint_every=2, max_prompt_tokens=64, num_workers=1,
                      fail_once_at_step=3, log_every=100, size=SIZE))
    assert (out / INJECTED_FAILURE).read_text().strip() == "3"
    info = json.loads((out / "train.json").read_text())
    state = json.loads((out / "state.json").read_text())
    assert info["resumed_from"] == [2] and info["step"] == 5 and state["step"] == 5 and state["final"]
    assert [h["step"] for h in info["history"]] == [5]  # one (interrupted, then finished) epoch
    assert (out / "optimizer.safetensors").is_file()
    assert load_model(out)[0] == "sr"
