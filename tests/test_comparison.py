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
    assert summary["models"]["teacher"] == {"map_symmetric": {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5,
                                                              "by_seed": [0.5, 0.5]}}
    assert summary["models"]["student_brcd"]["map_symmetric"] == {"mean": 0.5, "std": 0.5**0.5 / 2, "min": 0.25,
                                                                  "max": 0.75, "by_seed": [0.25, 0.75]}
    assert summary["models"]["student_brcd"]["map_asymmetric"]["by_seed"] == [0.5, 0.25]


def test_every_score_is_summarised_and_the_code_statistics_are_not():
    scores = lambda p, n: {"map_symmetric": p, "ndcg_at_50_symmetric": n, "code_statistics": {"distinct_share": p}}
    per_seed = {0: {"student_sp": scores(0.5, 0.25)}, 1: {"student_sp": scores(0.75, 0.5)},
                2: {"student_sp": scores(1.0, 0.75)}}
    summary = summarise_seeds(per_seed)["models"]["student_sp"]
    assert set(summary) == {"map_symmetric", "ndcg_at_50_symmetric"}
    assert summary["ndcg_at_50_symmetric"] == {"mean": 0.5, "std": 0.25, "min": 0.25, "max": 0.75,
                                               "by_seed": [0.25, 0.5, 0.75]}
    assert summarise_seeds({4: per_seed[0]})["models"]["student_sp"]["map_symmetric"]["std"] is None  # one seed
    del per_seed[2]["student_sp"]["ndcg_at_50_symmetric"]
    with pytest.raises(ValueError, match="seed 2 has no ndcg_at_50_symmetric for student_sp"):
        summarise_seeds(per_seed)


def test_summary_refuses_runs_that_tested_other_models():
    with pytest.raises(ValueError, match="per_seed is empty"):
        summarise_seeds({})
    with pytest.raises(ValueError, match="seed 1 tested the models"):
        summarise_seeds({0: {"teacher": {"map_symmetric": 0.5}}, 1: {"student_sp": {"map_symmetric": 0.5}}})
