"""LSVCR-stream: the command line, configs and the end-to-end pipeline."""

import os
from pathlib import Path

# Process-wide defaults, set before Ray or transformers are imported: never reach a model hub, and keep
# Ray Data's per-dataset INFO lines out of the console (they still go to the session's ray-data.log), and
# keep Ray Train from routing workers' print through a logger that echoes every line twice.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
