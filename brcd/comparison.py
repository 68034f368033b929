"""Summaries of a comparison over seeds (`brcd compare`): each model's test mAP in each paradigm, its mean, range
and value per seed, from the runs' results (metrics.json's layout)."""
from __future__ import annotations

from typing import Dict, List

PARADIGMS = ("map_symmetric", "map_asymmetric")


def summarise_seeds(per_seed: Dict[int, dict]) -> dict:
    """per_seed: {seed: a run's results ({model: {"map_symmetric", ...}, ...})}, every run with the same models.
    Returns {"seeds": [...], "models": {model: {paradigm: {"mean", "min", "max", "by_seed"}}}}, the models in the
    first run's order, each paradigm a model was tested in."""
    if not per_seed:
        raise ValueError("per_seed is empty: a comparison needs at least one seed's results")
    seeds: List[int] = list(per_seed)
    tested = lambda results: [m for m, v in results.items() if isinstance(v, dict) and PARADIGMS[0] in v]
    models = tested(per_seed[seeds[0]])
    for seed in seeds[1:]:
        if tested(per_seed[seed]) != models:
            raise ValueError(f"seed {seed} tested the models {tested(per_seed[seed])}, seed {seeds[0]} {models}")
    summary = {}
    for model in models:
        summary[model] = {}
        for paradigm in PARADIGMS:
            if paradigm not in per_seed[seeds[0]][model]:
                continue
            values = [float(per_seed[seed][model][paradigm]) for seed in seeds]
            summary[model][paradigm] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                        "by_seed": values}
    return {"seeds": seeds, "models": summary}
