"""Summaries of a comparison over seeds (`brcd compare`): each model's test scores (mAP and the others of the run's
results, in each paradigm), their mean, sample standard deviation, range and value per seed, from the runs' results
(metrics.json's layout)."""
from __future__ import annotations

import statistics
from typing import Dict, List

# The score every model has, in the paradigm every model is tested in: what tells a model's results apart.
PRIMARY = "map_symmetric"


def summarise_seeds(per_seed: Dict[int, dict]) -> dict:
    """per_seed: {seed: a run's results ({model: {"map_symmetric", ...}, ...})}, every run with the same models.
    Returns {"seeds": [...], "models": {model: {score: {"mean", "std", "min", "max", "by_seed"}}}}, the models in
    the first run's order, each score (a number in the model's results) the first run gives it; "std" is the sample
    standard deviation, None for one seed."""
    if not per_seed:
        raise ValueError("per_seed is empty: a comparison needs at least one seed's results")
    seeds: List[int] = list(per_seed)
    tested = lambda results: [m for m, v in results.items() if isinstance(v, dict) and PRIMARY in v]
    models = tested(per_seed[seeds[0]])
    for seed in seeds[1:]:
        if tested(per_seed[seed]) != models:
            raise ValueError(f"seed {seed} tested the models {tested(per_seed[seed])}, seed {seeds[0]} {models}")
    summary = {}
    for model in models:
        summary[model] = {}
        for score, first in per_seed[seeds[0]][model].items():
            if isinstance(first, bool) or not isinstance(first, (int, float)):
                continue  # the code statistics: a description of each run's codes, not a score
            missing = [seed for seed in seeds if score not in per_seed[seed][model]]
            if missing:
                raise ValueError(f"seed {missing[0]} has no {score} for {model}; seed {seeds[0]} has")
            values = [float(per_seed[seed][model][score]) for seed in seeds]
            summary[model][score] = {"mean": statistics.fmean(values),
                                     "std": statistics.stdev(values) if len(values) > 1 else None,
                                     "min": min(values), "max": max(values), "by_seed": values}
    return {"seeds": seeds, "models": summary}
