import numpy as np
import torch

from features.folder import FeaturesFolder
from trainers.align import STATE_COLUMN, AlignConfig, sr_config
from trainers.data import collate, item_time_tensors, object_column, text_tensors
from trainers.models import ModelSize
from trainers.models.sr import SRModel
from trainers.teacher import STUDENT, TEACHER, rank_teacher

SIZE = ModelSize(hidden=16, num_heads=2, inner=32, num_layers=1, max_history=8, dropout=0.0)


def test_a_teacher_that_knows_the_target_ranks_it_first(fake_features):
    """States that are the target's own item vector (+ the task's mean, which the probe subtracts), through an
    identity adapter: the teacher ranks every target first; the untrained student does not."""
    folder = FeaturesFolder(fake_features)
    torch.manual_seed(0)
    sr = SRModel(sr_config(AlignConfig(features="f", out="o", size=SIZE), 32)).eval()
    sr.set_text_tables(*text_tensors(folder))
    sr.set_item_times(*item_time_tensors(folder))
    adapter = torch.nn.Linear(16, 16)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(16))
        adapter.bias.zero_()
    for task in ("video", "comment"):
        rows = next(folder.iter_examples(task, "train", batch_size=40))
        mean = np.full(16, 0.5, np.float32)
        with torch.no_grad():
            targets = sr.timeless_item_vectors(task, collate(rows, 8)["target"]).numpy()
        rows[STATE_COLUMN] = object_column(list(targets + mean))
        ranking = rank_teacher(folder, sr, adapter, mean, rows, task)
        assert len(ranking.ranks[TEACHER]) + ranking.skipped == len(rows["target"]) and ranking.skipped < 40
        assert (ranking.ranks[TEACHER] == 0).all()
        assert (ranking.ranks[STUDENT] > 0).any()
