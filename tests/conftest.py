"""Shared pytest set-up.

Every test uses tiny models, for which one intra-op thread is several times faster than many on a small shared
machine; the thread count is set once for the session here (and restored after it) instead of at import time in
individual test modules. Tests that need another count set it themselves and restore it.
"""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random CompactVLM (Llama LM, one 32-px CLIP encoder, 16 visual tokens) saved with save_pretrained: the
    model directory the serving, UI and lmms-eval tests load."""
    from compactvl.encoders.tiny import tiny_encoder  # here: importing compactvl is not needed by every test module
    from compactvl.model import CompactVLM
    from compactvl.testing import tiny_lm, tiny_tokenizer

    path = tmp_path_factory.mktemp("saved") / "model"
    CompactVLM.build(lm=tiny_lm("llama"), tokenizer=tiny_tokenizer(),
                     encoders=[tiny_encoder("clip", image_size=32)]).eval().save_pretrained(path)
    return path
