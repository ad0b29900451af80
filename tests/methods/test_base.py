"""What every method shares (bcssl/methods/base.py): which backbone the evaluations use."""
import pytest

from bcssl.config import ConfigError, load_config
from bcssl.methods import create_method
from tests.conftest import TINY_HEAD, TINY_MODEL

SMALL = {"dino": TINY_HEAD, "byol": ["method.byol.proj_hidden_dim=32", "method.byol.proj_dim=16"],
         "moco_v3": ["method.moco_v3.proj_hidden_dim=32", "method.moco_v3.proj_dim=16"],
         "care": ["method.care.proj_hidden_dim=32", "method.care.proj_dim=16", "method.care.fmap_size=4",
                  "method.care.dim_head=8", "method.care.blocks=2"]}
# the papers' evaluation scripts: DINO evaluates its teacher, BYOL / MoCo v3 / CARE their online encoder
PAPER_DEFAULT = {"dino": "teacher", "byol": "student", "moco_v3": "student", "care": "student"}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_encoder_picks_the_student_or_the_teacher_backbone(name):
    cfg = load_config(None, [f"method.name={name}", *TINY_MODEL, *SMALL[name]])
    method = create_method(name, cfg.model, cfg.method)
    student = method.eval_backbone("student")
    teacher = method.eval_backbone("teacher")
    assert student is not teacher
    assert any(p is q for p in method.student.parameters() for q in student.parameters())  # optimised
    assert not any(p.requires_grad for p in teacher.parameters())  # the EMA copy
    assert method.eval_backbone() is method.eval_backbone(PAPER_DEFAULT[name])
    assert method.eval_backbone("auto") is method.eval_backbone(PAPER_DEFAULT[name])
    with pytest.raises(ValueError, match="eval.encoder"):
        method.eval_backbone("ema")


def test_eval_encoder_is_validated_when_the_config_loads():
    assert load_config(None, ["eval.encoder=student"]).eval.encoder == "student"
    with pytest.raises(ConfigError, match="eval.encoder must be auto, student or teacher"):
        load_config(None, ["eval.encoder=online"])
