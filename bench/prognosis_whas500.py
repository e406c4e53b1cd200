"""Cox PH vs the EHR-only MLP_Prog on real clinical tables shipped with scikit-survival (WHAS500,
GBSG2): k-fold Harrell's C (mean, std) on the same folds, printed as JSON (--help for options).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from duplus.prognosis import evaluate as ev  # noqa: E402
from duplus.prognosis.ehr import EHRSchema, validate_ehr  # noqa: E402
from duplus.prognosis.heads import MLPSettings  # noqa: E402
from duplus.prognosis.models import Cohort, ModelSettings  # noqa: E402

TABLES = {
    "whas500": ("load_whas500", dict(numeric=("age", "bmi", "diasbp", "hr", "los", "sysbp"),
                                     binary=("afb", "av3", "chf", "cvd", "gender", "miord", "mitype", "sho"))),
    "gbsg2": ("load_gbsg2", dict(numeric=("age", "estrec", "pnodes", "progrec", "tsize"),
                                 categorical=("menostat", "tgrade"), binary=("horTh",))),
}


def load_cohort(name: str) -> Cohort:
    import sksurv.datasets

    loader, roles = TABLES[name]
    X, y = getattr(sksurv.datasets, loader)()
    event_field, time_field = y.dtype.names
    frame = X.copy()
    frame["pid"] = [f"{name}-{i}" for i in range(len(frame))]
    frame[time_field], frame[event_field] = y[time_field], y[event_field]
    schema = EHRSchema(id="pid", time=time_field, event=event_field, **roles)
    table = validate_ehr(frame, schema, source=f"sksurv {loader}")
    return Cohort(ids=table.ids, time=table.time, event=table.event, ehr=table.frame, schema=schema)


def bench(name: str, folds: int, epochs: int, seed: int) -> dict:
    cohort = load_cohort(name)
    assignment, stratified_by = ev.make_folds(cohort.event, None, folds, seed)
    settings = ModelSettings(mlp=MLPSettings(epochs=epochs, hidden=32, seed=seed), seed=seed)
    start = time.perf_counter()
    result = ev.cross_validate(cohort, ["ehr_coxph", "ehr_mlp"], assignment, settings)
    summary = ev.summarize(result.folds).set_index("model")
    out = {"patients": len(cohort), "events": int(cohort.event.sum()), "folds": folds,
           "stratified_by": stratified_by, "seconds": round(time.perf_counter() - start, 2)}
    for model in ("ehr_coxph", "ehr_mlp"):
        row = summary.loc[model]
        per_fold = result.folds[result.folds["model"] == model]
        out[model] = {"harrell_c_mean": round(float(row["harrell_c_mean"]), 4),
                      "harrell_c_std": round(float(row["harrell_c_std"]), 4),
                      "uno_c_mean": round(float(row["uno_c_mean"]), 4),
                      "ibs_mean": round(float(row["ibs_mean"]), 4),
                      "harrell_c_folds": [round(float(c), 4) for c in per_fold["harrell_c"]]}
    cox, mlp = out["ehr_coxph"], out["ehr_mlp"]
    out["mlp_within_one_std_of_cox"] = bool(mlp["harrell_c_mean"] >= cox["harrell_c_mean"] - cox["harrell_c_std"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    np.random.seed(args.seed)
    report = {"benchmark": "prognosis_whas500", "model_settings": {"epochs": args.epochs, "hidden": 32},
              "tables": {name: bench(name, args.folds, args.epochs, args.seed) for name in TABLES}}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from duplus.atomic import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
