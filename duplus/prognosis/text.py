"""The EHR-as-text route: the record's sentences through the text encoder, as model inputs.

Two encodings (config ``prognosis.text.encoding``):

- ``fields`` (default): one short sentence per covariate ("sex: female", "tumour grade: III"),
  each embedded on its own and kept side by side, every field reduced to a few components by a PCA
  fitted on the training fold; numeric covariates reach the head as numbers instead. Why: in one
  sentence per patient the encoder's vector is dominated by the wording that all patients share,
  and a PCA of such vectors keeps the template's variation, not the patient's (the whole-sentence
  route scored at chance on real cohorts). Per field, the distinct sentences of a coded field
  (its levels, written with their labels) span exactly the space its levels need, so nothing of
  the record is lost. A sentence embedding does not order numbers (the vectors of "age: 63" and
  "age: 64" are not closer than those of "age: 63" and "age: 36" in any reliable direction), so
  a number travels as its value, z-scored, median-imputed with a missing indicator, the same way
  the table route gives it.
- ``sentence``: the whole record in one sentence, one embedding, reduced by a PCA of at most
  ``MAX_SENTENCE_DIM`` components; kept to compare with (bench/prognosis_cohorts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from duplus.prognosis.ehr import EHRSchema
from duplus.prognosis.ehr_preprocessor import EHRPreprocessor
from duplus.prognosis.sentence import ehr_to_sentence, field_sentences

ENCODINGS = ("fields", "sentence")
# Components kept per field: a coded field with L levels needs L - 1; 8 covers most codings
# while a 16-level field (a disease chapter) cannot take over the design.
MAX_FIELD_DIM = 8
MAX_SENTENCE_DIM = 16

Encode = Callable[[list[str]], np.ndarray]


@dataclass
class TextFeatures:
    """Text-route inputs of a cohort, rows aligned with it.

    embeddings: block name (a covariate, or "sentence") -> (N, D) encoder vectors of its sentences.
    numbers: the numeric covariates (validated EHR columns) given to the head as numbers, with the
        schema that names them; None when there are none.
    """

    embeddings: dict[str, np.ndarray]
    numbers: pd.DataFrame | None = None
    schema: EHRSchema | None = None
    encoding: str = "fields"

    def __len__(self) -> int:
        first = next(iter(self.embeddings.values()), None)
        return len(first) if first is not None else len(self.numbers)

    @property
    def dim(self) -> int:
        """Width of the encoder vectors (before any reduction)."""
        return int(sum(block.shape[1] for block in self.embeddings.values()))

    def design(self, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs of the training and test rows; every statistic is fitted on ``train``."""
        cap = MAX_FIELD_DIM if self.encoding == "fields" else MAX_SENTENCE_DIM
        parts_train, parts_test = [], []
        for block in self.embeddings.values():
            a, b = block[train].astype(np.float64), block[test].astype(np.float64)
            # Components beyond the distinct training sentences only carry rounding noise.
            distinct = len(np.unique(np.round(a, 6), axis=0))
            k = min(cap, distinct - 1, a.shape[1])
            if k < 1:
                continue      # one sentence for every training row: nothing to learn from
            pca = PCA(n_components=k, random_state=0).fit(a)
            a, b = pca.transform(a), pca.transform(b)
            scale = np.where(a.std(axis=0) > 1e-8, a.std(axis=0), 1.0)
            parts_train.append(a / scale)
            parts_test.append(b / scale)
        if self.numbers is not None:
            prep = EHRPreprocessor(self.schema).fit(self.numbers.iloc[train])
            parts_train.append(prep.transform(self.numbers.iloc[train]).astype(np.float64))
            parts_test.append(prep.transform(self.numbers.iloc[test]).astype(np.float64))
        if not parts_train:
            return np.zeros((len(train), 0)), np.zeros((len(test), 0))
        return np.concatenate(parts_train, axis=1), np.concatenate(parts_test, axis=1)


def text_features(frame: pd.DataFrame, schema: EHRSchema, encode: Encode, encoding: str = "fields") -> TextFeatures:
    """Encode the validated EHR rows ``frame`` with ``encode`` (sentences -> (n, D) vectors).

    Each distinct sentence is encoded once: a coded field has few, so the encoder runs on tens of
    sentences, not on one per patient and field.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"config prognosis.text.encoding must be one of {ENCODINGS}, got {encoding!r}")
    rows = frame.to_dict("records")
    if encoding == "sentence":
        return TextFeatures({"sentence": _encode_unique([ehr_to_sentence(r, schema) for r in rows], encode)},
                            encoding=encoding)
    sentences = [field_sentences(r, schema) for r in rows]
    coded = [c for c in sentences[0] if c not in schema.numeric] if sentences else []
    embeddings = {c: _encode_unique([s[c] for s in sentences], encode) for c in coded}
    numbers = None
    numbers_schema = None
    if schema.numeric:
        numbers_schema = replace(schema, categorical=(), binary=(), center=None, treatments=(), columns={})
        numbers = frame[list(schema.numeric)].reset_index(drop=True)
    return TextFeatures(embeddings, numbers, numbers_schema, encoding)


def _encode_unique(sentences: Sequence[str], encode: Encode) -> np.ndarray:
    unique = sorted(set(sentences))
    vectors = np.asarray(encode(unique), dtype=np.float64)
    index = {s: i for i, s in enumerate(unique)}
    return vectors[[index[s] for s in sentences]]
