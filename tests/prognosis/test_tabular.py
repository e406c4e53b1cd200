"""EHRPreprocessor: statistics come from the training rows only; test rows cannot leak in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from duplus.errors import EHRError
from duplus.prognosis.ehr import EHRSchema
from duplus.prognosis.ehr_preprocessor import EHRPreprocessor

SCHEMA = EHRSchema(id="pid", time="t", event="e", numeric=("age",), categorical=("site",), binary=("hpv",))


def frame(age, site, hpv) -> pd.DataFrame:
    return pd.DataFrame({"age": np.asarray(age, dtype=float), "site": pd.Series(site, dtype=object),
                         "hpv": np.asarray(hpv, dtype=float)})


TRAIN = frame([50, 60, 70, np.nan], ["A", "B", "B", None], [1, 0, 1, np.nan])
TEST = frame([np.nan, 1000, 60], [None, "C", "A"], [np.nan, 0, 1])


def test_statistics_are_the_training_rows_only():
    prep = EHRPreprocessor(SCHEMA).fit(TRAIN)
    assert list(prep.get_feature_names_out()) == ["age", "site=A", "site=B", "hpv", "age_missing",
                                                   "site_missing", "hpv_missing"]
    # training: median 60 imputes the gap -> [50, 60, 70, 60], mean 60, std sqrt(50)
    std = np.sqrt(50.0)
    out = prep.transform(TEST)
    np.testing.assert_allclose(out[:, 0], [0.0, 940 / std, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1:3], [[0, 1], [0, 0], [1, 0]])   # mode B; unseen C -> zeros
    np.testing.assert_array_equal(out[:, 3], [1, 0, 1])                    # mode of hpv is 1
    np.testing.assert_array_equal(out[:, 4:], [[1, 1, 1], [0, 0, 0], [0, 0, 0]])


def test_transform_of_a_row_does_not_depend_on_the_other_test_rows():
    prep = EHRPreprocessor(SCHEMA).fit(TRAIN)
    together = prep.transform(TEST)
    alone = np.concatenate([prep.transform(TEST.iloc[[i]]) for i in range(len(TEST))])
    np.testing.assert_array_equal(together, alone)
    # Had the test rows been used for fitting, the extreme age would move mean, std and median.
    leaky = EHRPreprocessor(SCHEMA).fit(pd.concat([TRAIN, TEST], ignore_index=True)).transform(TEST)
    assert not np.allclose(leaky[:, 0], together[:, 0])


def test_no_indicator_for_columns_complete_in_training_and_errors():
    complete = frame([1, 2, 3], ["A", "A", "B"], [0, 1, 0])
    prep = EHRPreprocessor(SCHEMA).fit(complete)
    assert "age_missing" not in prep.get_feature_names_out()
    assert prep.transform(TEST).shape == (3, 4)
    with pytest.raises(EHRError, match="before fit"):
        EHRPreprocessor(SCHEMA).transform(TEST)
    with pytest.raises(EHRError, match="lack column"):
        prep.transform(TEST.drop(columns=["site"]))


def test_columns_without_training_spread_are_zero_for_every_row():
    schema = EHRSchema(id="pid", time="t", event="e", numeric=("age", "w", "k"), categorical=("site",),
                       binary=("hpv",))
    train = pd.DataFrame({"age": [50.0, 60.0, 70.0], "w": [np.nan] * 3, "k": [5.0] * 3,
                          "site": pd.Series(["A"] * 3, dtype=object), "hpv": [1.0] * 3})
    test = pd.DataFrame({"age": [55.0, 65.0], "w": [70.0, 90.0], "k": [5.0, 900.0],
                         "site": pd.Series(["A", "B"], dtype=object), "hpv": [0.0, 1.0]})
    prep = EHRPreprocessor(schema).fit(train)
    assert list(prep.get_feature_names_out()) == ["age", "w", "k", "site=A", "hpv", "w_missing"]
    out = prep.transform(test)
    # Only age varied in training; every other column (all-missing w and its always-set indicator,
    # constant k, a single site level, constant hpv) would carry values the model never saw vary.
    np.testing.assert_allclose(out[:, 0], [-0.5 / np.sqrt(2 / 3), 0.5 / np.sqrt(2 / 3)], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1:], np.zeros((2, 5)))
    np.testing.assert_array_equal(prep.transform(train)[:, 1:], np.zeros((3, 5)))
