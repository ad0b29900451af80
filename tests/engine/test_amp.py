"""engine/amp.py: the one autocast helper every loop enters."""
import pytest
import torch

from bcssl.engine.amp import AMP_MODES, autocast


def test_modes_give_the_dtype_they_name_and_none_is_a_no_op():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("none", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    assert autocast("fp16", "cpu").fast_dtype == torch.float16
    assert AMP_MODES == ("none", "bf16", "fp16")


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="none, bf16, fp16; got 'fp8'"):
        autocast("fp8", "cpu")
