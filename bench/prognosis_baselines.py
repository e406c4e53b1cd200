"""Settings of the Cox PH and random survival forest baselines (config ``prognosis.baselines``)
on the benchmark cohorts of bench/prognosis_cohorts.py: repeated k-fold Harrell's C of each
candidate, mean over cohorts; JSON on stdout. The schema's defaults are this benchmark's choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.prognosis_cohorts import load_cohort  # noqa: E402
from duplus.prognosis import evaluate as ev  # noqa: E402
from duplus.prognosis.models import ModelSettings  # noqa: E402

CANDIDATES = {
    "ehr_coxph": [{"cox_alpha": a} for a in (0.1, 1.0, 10.0, 30.0, 100.0, 300.0)],
    "ehr_rsf": [{"rsf_trees": t, "rsf_min_leaf": leaf} for t in (50, 200) for leaf in (3, 5, 15)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohorts", nargs="+", default=["whas500", "gbsg2", "veterans", "aids"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-patients", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def encode(sentences: list[str]) -> np.ndarray:      # the baselines read no text
        return np.zeros((len(sentences), 1), np.float32)

    results: dict[str, dict[str, dict[str, float]]] = {}
    start = time.perf_counter()
    for name in args.cohorts:
        cohort = load_cohort(name, encode, args.max_patients, args.seed)[0]
        for model, candidates in CANDIDATES.items():
            for candidate in candidates:
                key = f"{model} " + ",".join(f"{k}={v}" for k, v in candidate.items())
                values = []
                for repeat in range(args.repeats):
                    folds, _ = ev.make_folds(cohort.event, None, args.folds, seed=args.seed + repeat)
                    settings = ModelSettings(seed=args.seed + repeat, **candidate)
                    table = ev.cross_validate(cohort, [model], folds, settings).folds
                    values.append(float(np.nanmean(table["harrell_c"])))
                results.setdefault(key, {})[name] = round(float(np.mean(values)), 4)
    for scores in results.values():
        scores["mean"] = round(float(np.mean([scores[c] for c in args.cohorts])), 4)
    best = {model: max((k for k in results if k.startswith(model + " ")), key=lambda k: results[k]["mean"])
            for model in CANDIDATES}
    print(json.dumps({"cohorts": args.cohorts, "folds": args.folds, "repeats": args.repeats,
                      "max_patients": args.max_patients, "harrell_c": results, "best": best,
                      "seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
