"""The EHR routes on real survival cohorts that install offline (scikit-survival's WHAS500, GBSG2,
veterans' lung cancer, AIDS, FLCHAIN): repeated k-fold Harrell's and Uno's C of Cox PH, random
survival forest, the tabular neural head, the record as text (per-field sentences, and the whole
record in one sentence for comparison) and table + text, all on the same folds; JSON on stdout.

Each cohort's columns are described the way a user would in config ``prognosis.ehr.columns``
(readable names, units, labels of coded values), so the text is what the record says.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from duplus.prognosis import evaluate as ev  # noqa: E402
from duplus.prognosis.ehr import EHRSchema, validate_ehr  # noqa: E402
from duplus.prognosis.heads import MLPSettings  # noqa: E402
from duplus.prognosis.models import Cohort, ModelSettings  # noqa: E402
from duplus.prognosis.text import text_features  # noqa: E402

# Column roles and descriptions as the config's prognosis.ehr section would give them (codebooks:
# Hosmer & Lemeshow (WHAS500), Schumacher et al. (GBSG2), Kalbfleisch & Prentice (veterans),
# Hosmer, Lemeshow & May (AIDS ACTG 320), Dispenzieri et al. (FLCHAIN)).
NO_YES = {0: "no", 1: "yes"}
COHORTS = {
    "whas500": ("load_whas500", {}, dict(
        numeric=["age", "bmi", "diasbp", "hr", "los", "sysbp"],
        binary=["afb", "av3", "chf", "cvd", "gender", "miord", "mitype", "sho"],
        columns={"age": {"unit": "years"}, "bmi": {"name": "body mass index", "unit": "kg/m2"},
                 "diasbp": {"name": "diastolic blood pressure", "unit": "mmHg"},
                 "hr": {"name": "heart rate", "unit": "beats per minute"},
                 "los": {"name": "length of hospital stay", "unit": "days"},
                 "sysbp": {"name": "systolic blood pressure", "unit": "mmHg"},
                 "afb": {"name": "atrial fibrillation", "labels": NO_YES},
                 "av3": {"name": "complete heart block", "labels": NO_YES},
                 "chf": {"name": "congestive heart failure", "labels": NO_YES},
                 "cvd": {"name": "history of cardiovascular disease", "labels": NO_YES},
                 "gender": {"name": "sex", "labels": {0: "male", 1: "female"}},
                 "miord": {"name": "myocardial infarction order", "labels": {0: "first", 1: "recurrent"}},
                 "mitype": {"name": "myocardial infarction type", "labels": {0: "non Q-wave", 1: "Q-wave"}},
                 "sho": {"name": "cardiogenic shock", "labels": NO_YES}})),
    "gbsg2": ("load_gbsg2", {}, dict(
        numeric=["age", "estrec", "pnodes", "progrec", "tsize"], categorical=["menostat", "tgrade"],
        binary=["horTh"], treatments=["horTh"],
        columns={"age": {"unit": "years"}, "estrec": {"name": "estrogen receptor", "unit": "fmol/l"},
                 "pnodes": {"name": "positive lymph nodes"},
                 "progrec": {"name": "progesterone receptor", "unit": "fmol/l"},
                 "tsize": {"name": "tumour size", "unit": "mm"},
                 "menostat": {"name": "menopausal status", "labels": {"Pre": "premenopausal", "Post": "postmenopausal"}},
                 "tgrade": {"name": "tumour grade"}, "horTh": {"name": "hormonal therapy"}})),
    "veterans": ("load_veterans_lung_cancer", {}, dict(
        numeric=["Age_in_years", "Karnofsky_score", "Months_from_Diagnosis"],
        categorical=["Celltype", "Treatment"], binary=["Prior_therapy"],
        columns={"Age_in_years": {"name": "age", "unit": "years"},
                 "Karnofsky_score": {"name": "Karnofsky performance score"},
                 "Months_from_Diagnosis": {"name": "time since diagnosis", "unit": "months"},
                 "Celltype": {"name": "cell type", "labels": {"adeno": "adenocarcinoma", "large": "large cell",
                                                              "smallcell": "small cell", "squamous": "squamous cell"}},
                 "Treatment": {"name": "chemotherapy arm"}, "Prior_therapy": {"name": "prior therapy"}})),
    "aids": ("load_aids", {"endpoint": "aids"}, dict(
        numeric=["age", "cd4", "priorzdv"], categorical=["ivdrug", "karnof", "raceth", "sex", "txgrp"],
        binary=["hemophil", "strat2", "tx"],
        columns={"age": {"unit": "years"}, "cd4": {"name": "CD4 count", "unit": "cells/ul"},
                 "priorzdv": {"name": "prior zidovudine use", "unit": "months"},
                 "ivdrug": {"name": "intravenous drug use", "labels": {1: "never", 2: "currently", 3: "previously"}},
                 "karnof": {"name": "Karnofsky performance score"},
                 "raceth": {"name": "race or ethnicity", "labels": {1: "white non-Hispanic", 2: "black non-Hispanic",
                                                                   3: "Hispanic", 4: "Asian or Pacific Islander",
                                                                   5: "American Indian or Alaskan native"}},
                 "txgrp": {"name": "treatment group", "labels": {1: "zidovudine and lamivudine",
                                                               2: "zidovudine, lamivudine and indinavir",
                                                               3: "stavudine and lamivudine",
                                                               4: "stavudine, lamivudine and indinavir"}},
                 "hemophil": {"name": "hemophilia", "labels": NO_YES},
                 # Coded 1/2, not 0/1: a categorical whose labels say what the codes mean.
                 "sex": {"labels": {1: "male", 2: "female"}},
                 "strat2": {"name": "CD4 stratum", "labels": {0: "CD4 up to 50", 1: "CD4 above 50"}},
                 "tx": {"name": "indinavir in the regimen", "labels": NO_YES}})),
    "flchain": ("load_flchain", {}, dict(
        numeric=["age", "creatinine", "kappa", "lambda"], categorical=["chapter", "flc.grp", "sample.yr"],
        binary=["mgus", "sex"],
        columns={"age": {"unit": "years"}, "creatinine": {"name": "serum creatinine", "unit": "mg/dl"},
                 "kappa": {"name": "serum free light chain kappa", "unit": "mg/l"},
                 "lambda": {"name": "serum free light chain lambda", "unit": "mg/l"},
                 "chapter": {"name": "cause of death chapter"}, "flc.grp": {"name": "free light chain decile"},
                 "sample.yr": {"name": "year of the blood sample"},
                 "mgus": {"name": "monoclonal gammopathy", "labels": NO_YES},
                 "sex": {"labels": {"F": "female", "M": "male"}}})),
}
MODELS = ["ehr_coxph", "ehr_rsf", "ehr_mlp", "ehr_text", "ehr_tabular_text", "ehr_text_sentence"]


def load_cohort(name: str, encode, max_patients: int | None, seed: int) -> tuple[Cohort, Cohort]:
    """The cohort with per-field text, and the same cohort with whole-sentence text."""
    import sksurv.datasets

    loader, kwargs, roles = COHORTS[name]
    X, y = getattr(sksurv.datasets, loader)(**kwargs)
    event_field, time_field = y.dtype.names
    frame = X.copy()
    if name == "flchain":
        # 'chapter' is the cause of death, known only after the outcome: a leak, left out.
        roles = {**roles, "categorical": [c for c in roles["categorical"] if c != "chapter"],
                 "columns": {k: v for k, v in roles["columns"].items() if k != "chapter"}}
    frame["pid"] = [f"{name}-{i}" for i in range(len(frame))]
    frame[time_field], frame[event_field] = y[time_field], y[event_field]
    if max_patients and len(frame) > max_patients:
        frame = frame.sample(n=max_patients, random_state=seed).reset_index(drop=True)
    config = {"prognosis": {"ehr": {"id": "pid", "time": time_field, "event": event_field,
                                    "numeric": roles.get("numeric", []), "categorical": roles.get("categorical", []),
                                    "binary": roles.get("binary", []), "treatments": roles.get("treatments", []),
                                    "columns": roles.get("columns", {})}}}
    schema = EHRSchema.from_config(config)
    table = validate_ehr(frame, schema, source=f"sksurv {loader}")
    base = dict(ids=table.ids, time=table.time, event=table.event, ehr=table.frame, schema=schema)
    return (Cohort(**base, text=text_features(table.frame, schema, encode, "fields")),
            Cohort(**base, text=text_features(table.frame, schema, encode, "sentence")))


def bench(name: str, encode, folds: int, repeats: int, settings: ModelSettings, max_patients: int | None,
          seed: int) -> dict:
    cohort, sentence_cohort = load_cohort(name, encode, max_patients, seed)
    start = time.perf_counter()
    per_model: dict[str, list[float]] = {m: [] for m in MODELS}
    uno: dict[str, list[float]] = {m: [] for m in MODELS}
    for repeat in range(repeats):
        assignment, _ = ev.make_folds(cohort.event, None, folds, seed + repeat)
        result = ev.cross_validate(cohort, MODELS[:-1], assignment, settings)
        sentence = ev.cross_validate(sentence_cohort, ["ehr_text"], assignment, settings)
        sentence.folds["model"] = "ehr_text_sentence"
        for frame in (result.folds, sentence.folds):
            for model, part in frame.groupby("model"):
                per_model[model].extend(float(c) for c in part["harrell_c"])
                uno[model].extend(float(c) for c in part["uno_c"])
    out = {"patients": len(cohort), "events": int(cohort.event.sum()), "folds": folds, "repeats": repeats,
           "text_sentence_example": _example(sentence_cohort), "seconds": round(time.perf_counter() - start, 1)}
    for model in MODELS:
        values, unos = np.asarray(per_model[model]), np.asarray(uno[model])
        out[model] = {"harrell_c_mean": round(float(np.nanmean(values)), 4),
                      "harrell_c_std": round(float(np.nanstd(values, ddof=1)), 4),
                      "uno_c_mean": round(float(np.nanmean(unos)), 4)}
    return out


def _example(cohort: Cohort) -> str:
    from duplus.prognosis.sentence import ehr_to_sentence

    return ehr_to_sentence(cohort.ehr.iloc[0].to_dict(), cohort.schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohorts", nargs="+", default=["whas500", "gbsg2", "veterans", "aids", "flchain"],
                        choices=sorted(COHORTS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-patients", type=int, default=2000,
                        help="cohorts above this are subsampled once (FLCHAIN has 7874)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    import torch

    from duplus.prompts.encoder import TextEncoder

    torch.set_num_threads(1)
    encoder = TextEncoder("minilm")

    def encode(sentences: list[str]) -> np.ndarray:
        return encoder.encode(sentences).numpy()

    settings = ModelSettings(mlp=MLPSettings(epochs=args.epochs, hidden=args.hidden, seed=args.seed), seed=args.seed)
    cohorts = {}
    for name in args.cohorts:
        cohorts[name] = bench(name, encode, args.folds, args.repeats, settings, args.max_patients, args.seed)
        print(f"{name}: " + ", ".join(f"{m} {cohorts[name][m]['harrell_c_mean']:.3f}" for m in MODELS),
              file=sys.stderr)
    summary = {m: round(float(np.mean([c[m]["harrell_c_mean"] for c in cohorts.values()])), 4) for m in MODELS}
    report = {
        "benchmark": "prognosis_cohorts",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "processor": platform.processor() or platform.machine()},
        "settings": {"folds": args.folds, "repeats": args.repeats, "epochs": args.epochs, "hidden": args.hidden,
                     "encoder": encoder.name, "max_patients": args.max_patients},
        "cohorts": cohorts,
        "mean_harrell_c": summary,
        "text_minus_tabular_mlp": round(summary["ehr_text"] - summary["ehr_mlp"], 4),
        "tabular_text_minus_tabular_mlp": {name: round(c["ehr_tabular_text"]["harrell_c_mean"]
                                                      - c["ehr_mlp"]["harrell_c_mean"], 4)
                                           for name, c in cohorts.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from duplus.atomic import write_text

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
