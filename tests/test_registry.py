"""The stage registry's ordering of model names (pipeline/registry.py)."""

from pipeline.registry import model_rank


def test_model_rank_lists_models_in_dag_order_members_by_number():
    names = ["calibrate", "member10", "pseudo", "other", "member2", "ensemble", "head", "pretrain", "finetune", "member0"]
    assert sorted(names, key=model_rank) == ["pretrain", "head", "finetune", "pseudo", "member0", "member2", "member10",
                                             "ensemble", "calibrate", "other"]
