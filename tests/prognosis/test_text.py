"""The EHR-as-text route: per-field embeddings keep the record, and the real encoder on a real
cohort (veterans' lung cancer, shipped with scikit-survival) scores like the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from duplus.prognosis import evaluate as ev
from duplus.prognosis.ehr import EHRSchema, validate_ehr
from duplus.prognosis.heads import MLPSettings
from duplus.prognosis.models import Cohort, ModelSettings
from duplus.prognosis.text import text_features

VETERANS = {"prognosis": {"ehr": {
    "id": "pid", "time": "Survival_in_days", "event": "Status",
    "numeric": ["Age_in_years", "Karnofsky_score", "Months_from_Diagnosis"],
    "categorical": ["Celltype", "Treatment"], "binary": ["Prior_therapy"],
    "columns": {"Age_in_years": {"name": "age", "unit": "years"},
                "Karnofsky_score": {"name": "Karnofsky performance score"},
                "Months_from_Diagnosis": {"name": "time since diagnosis", "unit": "months"},
                "Celltype": {"name": "cell type", "labels": {"adeno": "adenocarcinoma", "large": "large cell",
                                                             "smallcell": "small cell", "squamous": "squamous cell"}},
                "Treatment": {"name": "chemotherapy arm"}, "Prior_therapy": {"name": "prior therapy"}}}}}


def fake_encode(sentences: list[str]) -> np.ndarray:
    """A deterministic 'encoder': the same sentence always gives the same vector."""
    return np.stack([np.random.default_rng(abs(hash(s)) % 2**32).normal(size=16) for s in sentences])


def test_each_coded_field_keeps_its_levels_and_numbers_stay_numbers():
    schema = EHRSchema(id="pid", time="t", event="e", numeric=("age",), categorical=("grade",), binary=("hpv",))
    frame = validate_ehr(pd.DataFrame({
        "pid": list("abcdef"), "t": [1, 2, 3, 4, 5, 6], "e": [1, 0, 1, 0, 1, 1],
        "age": [40, 50, np.nan, 70, 80, 90], "grade": ["I", "II", "III", "I", "II", None],
        "hpv": [1, 0, 1, 0, None, 1]}), schema).frame
    calls = []

    def encode(sentences):
        calls.append(list(sentences))
        return fake_encode(sentences)

    text = text_features(frame, schema, encode)
    assert sorted(text.embeddings) == ["grade", "hpv"]
    # Distinct sentences only: 3 grades + unknown, yes / no / unknown.
    assert sorted(map(len, calls)) == [3, 4]
    train, test = np.arange(6), np.arange(6)
    X_train, X_test = text.design(train, test)
    # grade: 4 distinct sentences -> 3 components; hpv: 3 -> 2; age z-scored + its missing indicator.
    assert X_train.shape == (6, 3 + 2 + 2)
    # Rows with equal fields get equal codes; the level structure survives the reduction.
    grade = X_train[:, :3]
    assert np.allclose(grade[0], grade[3]) and not np.allclose(grade[0], grade[1])
    age = X_train[:, 5]
    assert np.argsort(age[[0, 1, 3, 4, 5]]).tolist() == [0, 1, 2, 3, 4]


def test_the_whole_sentence_is_one_block():
    schema = EHRSchema(id="pid", time="t", event="e", numeric=("age",), categorical=("grade",))
    frame = validate_ehr(pd.DataFrame({"pid": list("abc"), "t": [1, 2, 3], "e": [1, 0, 1], "age": [40, 50, 60],
                                       "grade": ["I", "II", "I"]}), schema).frame
    text = text_features(frame, schema, fake_encode, encoding="sentence")
    assert list(text.embeddings) == ["sentence"] and text.numbers is None
    with pytest.raises(ValueError, match="prognosis.text.encoding must be one of"):
        text_features(frame, schema, fake_encode, encoding="tokens")


def veterans(encoding: str) -> Cohort:
    from sksurv.datasets import load_veterans_lung_cancer

    from duplus.prompts.encoder import TextEncoder

    X, y = load_veterans_lung_cancer()
    frame = X.copy()
    frame["pid"] = [f"V{i}" for i in range(len(frame))]
    frame["Survival_in_days"], frame["Status"] = y["Survival_in_days"], y["Status"]
    schema = EHRSchema.from_config(VETERANS)
    table = validate_ehr(frame, schema, source="sksurv veterans")
    encoder = TextEncoder("minilm")
    text = text_features(table.frame, schema, lambda s: encoder.encode(s).numpy(), encoding)
    return Cohort(ids=table.ids, time=table.time, event=table.event, ehr=table.frame, schema=schema, text=text)


@pytest.mark.learning
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_record_as_text_scores_like_the_table_on_a_real_cohort(seed):
    """Veterans' lung cancer (137 patients, 128 deaths), 5-fold, real all-MiniLM-L6-v2.

    Measured for seeds 0 / 1 / 2, identical under ATEN_CPU_CAPABILITY=default and =avx2:
    per-field text 0.698 / 0.673 / 0.705, tabular head 0.687 / 0.696 / 0.683 (largest gap 0.023),
    whole record in one sentence 0.538 / 0.613 / 0.604 (0.06-0.16 below the per-field text).
    """
    fields, sentence = veterans("fields"), veterans("sentence")
    folds, _ = ev.make_folds(fields.event, None, 5, seed=seed)
    settings = ModelSettings(mlp=MLPSettings(epochs=150, hidden=32, seed=seed), seed=seed)
    c = ev.summarize(ev.cross_validate(fields, ["ehr_mlp", "ehr_text"], folds, settings).folds)
    c = c.set_index("model")["harrell_c_mean"]
    whole = ev.summarize(ev.cross_validate(sentence, ["ehr_text"], folds, settings).folds)["harrell_c_mean"].iloc[0]
    assert c["ehr_text"] > 0.64                                # chance is 0.5; Cox PH scores about 0.70
    assert abs(c["ehr_text"] - c["ehr_mlp"]) < 0.045
    assert c["ehr_text"] > whole + 0.03                        # the one-sentence route loses part of the record
