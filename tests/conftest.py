import os
from pathlib import Path

import pytest

from core.runtime import setup_process

setup_process()  # what every entry point does first (HF_HUB_OFFLINE and friends)

# Ray Data (2.60) starts a pool of 32 FooterReader actors, one Python process each, for every read_parquet just
# to read Parquet footers; on 2 cores that pool cost 20-50 s per features build or training-data read, more
# than the reads. One actor reads the few small files of a test as well. Set before any Ray starts, so the
# session's local Ray, the test `ray start --head` (tests/lsvcr/test_continuous_jobs.py) and the jobs and
# workers they start inherit it; a value already in the environment wins.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Ray's processes push their metrics to the metrics agent every 10 s by default; the Prometheus test
# (tests/ingestion/test_ray_metrics.py) waits for the push, so a 2 s interval takes 6-8 s off it.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds on 2 cores)."""
    import ray

    from core.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    """A real KRaft broker for the session, on its own ports and run folder so a demo broker can run beside it."""
    os.environ["LSVCR_KAFKA_PORT"] = os.environ.get("LSVCR_TEST_KAFKA_PORT", "19192")
    os.environ["LSVCR_KAFKA_CONTROLLER_PORT"] = os.environ.get("LSVCR_TEST_KAFKA_CONTROLLER_PORT", "19193")
    os.environ["LSVCR_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))
    from devtools import broker

    cfg = broker.BrokerConfig()
    bootstrap = broker.start(cfg)
    os.environ["LSVCR_KAFKA_BOOTSTRAP"] = bootstrap
    yield bootstrap
    broker.stop(cfg)
    os.environ.pop("LSVCR_KAFKA_BOOTSTRAP", None)


def make_tiny_llm(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama and a word-level tokenizer, saved as a local HF checkpoint
    folder (no hub download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>"] + [str(i) for i in range(200)] + (
        "below is a user's history on short-video platform oldest first videos watched comment sections "
        "visited task recommend the next video this will watch answer with its title user now watching "
        "write under it that would engage top none no title comment engaged , . : - \" ( )").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
