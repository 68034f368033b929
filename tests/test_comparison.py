"""brcd.comparison: the summary of a comparison over seeds."""
import pytest

from brcd.comparison import summarise_seeds


def test_summary_of_two_seeds():
    per_seed = {7: {"teacher": {"map_symmetric": 0.5}, "student_brcd": {"map_symmetric": 0.25, "map_asymmetric": 0.5},
                    "throughput_images_per_s": {"teacher": 10.0}, "seconds": 3.0},
                2: {"teacher": {"map_symmetric": 0.5}, "student_brcd": {"map_symmetric": 0.75, "map_asymmetric": 0.25},
                    "throughput_images_per_s": {"teacher": 11.0}, "seconds": 4.0}}
    summary = summarise_seeds(per_seed)
    assert summary["seeds"] == [7, 2] and list(summary["models"]) == ["teacher", "student_brcd"]
    assert summary["models"]["teacher"] == {"map_symmetric": {"mean": 0.5, "min": 0.5, "max": 0.5,
                                                              "by_seed": [0.5, 0.5]}}
    assert summary["models"]["student_brcd"]["map_symmetric"] == {"mean": 0.5, "min": 0.25, "max": 0.75,
                                                                  "by_seed": [0.25, 0.75]}
    assert summary["models"]["student_brcd"]["map_asymmetric"]["by_seed"] == [0.5, 0.25]


def test_summary_refuses_runs_that_tested_other_models():
    with pytest.raises(ValueError, match="per_seed is empty"):
        summarise_seeds({})
    with pytest.raises(ValueError, match="seed 1 tested the models"):
        summarise_seeds({0: {"teacher": {"map_symmetric": 0.5}}, 1: {"student_sp": {"map_symmetric": 0.5}}})
