"""Code competitions (pipeline/kernel/): the spec says which kind a competition is; the notebook written
from the chain's outputs reproduces the pipeline's own submission offline, on a folder laid out as
Kaggle mounts it, and refuses a missing weight file or a changed class order."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_profile


def test_a_competition_is_a_file_competition_unless_the_spec_says_code():
    assert load_profile("smoke").competition.submission == "file"
    cfg = load_profile("smoke", {"competition.submission": "code"})
    assert cfg.competition.submission == "code"
    assert cfg.submit.dataset_slug(cfg.ingest.competition) == "state-farm-distracted-driver-detection-models"
    assert cfg.submit.kernel_slug(cfg.ingest.competition) == "state-farm-distracted-driver-detection-inference"
    assert len(cfg.submit.kernel_slug("x" * 60)) == 50


@pytest.mark.parametrize("override, message", [
    ({"competition.submission": "notebook"}, "competition.submission: Input should be 'file' or 'code'"),
    ({"submit.dataset": "Models"}, "submit.dataset: .*6-50 lower-case letters"),
    ({"submit.owner": "two words"}, "submit.owner: .*Kaggle username"),
])
def test_code_competition_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("smoke", override)
