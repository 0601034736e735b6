import json

import pytest

from tests.trainers.conftest import make_features
from trainers.align import AlignConfig, align
from trainers.checkpoint import load_model
from trainers.finetune import FinetuneConfig, finetune
from trainers.models import ModelSize

pytestmark = pytest.mark.integration

SIZE = ModelSize(hidden=16, num_heads=2, inner=32, num_layers=1, max_history=8)


def test_align_then_finetune_on_two_workers(ray_session, tiny_llm, tmp_path):
    features = make_features(tmp_path / "features", num_users=100)
    aligned = align(AlignConfig(features=str(features), out=str(tmp_path / "aligned"), llm=str(tiny_llm),
                                llm_mode="lora", max_steps=4, batch_size=8, checkpoint_every=2,
                                max_prompt_tokens=96, num_workers=2, log_every=2, size=SIZE))
    kind, model = load_model(aligned)
    assert kind == "sr" and not model.config.random_positions and not model.config.use_id_embedding
    info = json.loads((tmp_path / "aligned" / "train.json").read_text())
    assert info["step"] == 4 and info["workers"] == 2 and info["examples_per_s"] > 0 and info["tokens_per_s"] > 0
    assert info["lm_loss"] > 0 and info["seq_sup_loss"] > 0 and info["vc_loss"] > 0
    assert (tmp_path / "aligned" / "llm" / "lora" / "adapter_model.safetensors").is_file()
    out = finetune(FinetuneConfig(features=str(features), out=str(tmp_path / "lsvcr"), init=aligned, epochs=1,
                                  num_workers=2, batch_size=64, max_eval_examples=100, size=SIZE))
    train = json.loads((tmp_path / "lsvcr" / "train.json").read_text())
    assert load_model(out)[0] == "sr" and train["finetune_config"]["init"] == aligned
