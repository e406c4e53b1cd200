"""One EHR row as an English sentence, the text route into the text encoder: "A 63-year-old male,
HPV positive, current smoker, performance status 1, treated with chemotherapy."
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from duplus.prognosis.ehr import EHRSchema

_SEX = {"gender", "sex"}
_AGE = {"age"}
_WEIGHT = {"weight"}
_HPV = {"hpv", "hpv status", "p16"}
_TOBACCO = {"tobacco", "smoking", "smoker", "tobacco consumption"}
_ALCOHOL = {"alcohol", "alcohol consumption"}
_PERFORMANCE = {"performance status", "ecog", "performance"}
_CENTER = {"center", "centre", "site"}
_TREATMENTS = {"surgery", "chemotherapy", "radiotherapy", "immunotherapy"}

_YES = {"1", "1.0", "true", "yes", "y", "current", "positive", "pos", "+"}
_NO = {"0", "0.0", "false", "no", "n", "never", "negative", "neg", "-", "none"}
_FORMER = {"former", "ex", "past", "previous", "quit"}


def ehr_to_sentence(row: Mapping[str, Any], schema: EHRSchema) -> str:
    """Describe one validated EHR row (``EHRTable.frame`` row) in one sentence.

    Missing fields are left out; the order of clauses is fixed (subject, weight, HPV, tobacco,
    alcohol, performance status, other covariates in schema order, center, treatments), so equal
    rows give equal text. Outcome columns (time, event) are never described.

    Example:
        >>> ehr_to_sentence({"age": 63, "gender": 1, "hpv": 1, "tobacco": "current",
        ...                  "performance_status": "1", "chemotherapy": 1}, schema)
        'A 63-year-old male, HPV positive, current smoker, performance status 1, treated with chemotherapy.'
    """
    roles = {c: "numeric" for c in schema.numeric}
    roles.update({c: "categorical" for c in schema.categorical})
    roles.update({c: "binary" for c in schema.binary})
    by_kind: dict[str, str] = {}
    for column in roles:
        kind = _kind(column)
        if kind != "other":
            by_kind.setdefault(kind, column)
    used = set(by_kind.values())

    age = _value(row, by_kind.get("age"))
    sex = _sex(_value(row, by_kind.get("sex")))
    subject = "A " + " ".join(part for part in (
        f"{int(math.floor(float(age)))}-year-old" if _is_number(age) else None,
        sex or "patient") if part)
    clauses = [subject]
    weight = _value(row, by_kind.get("weight"))
    if _is_number(weight):
        clauses.append(f"weighing {_number(weight)} kg")
    for kind, phrase in (("hpv", _hpv), ("tobacco", _tobacco), ("alcohol", _alcohol),
                         ("performance", lambda v: f"performance status {v}")):
        value = _value(row, by_kind.get(kind))
        if value is not None:
            clauses.append(phrase(value))
    for column, role in roles.items():
        value = _value(row, column)
        if column in used or _kind(column) == "treatment" or value is None:
            continue
        clauses.append(_generic(column, role, value))
    center = _value(row, by_kind.get("center"))
    if center is not None:
        clauses.append(f"center {center}")
    treatment = _treatments(row, [c for c in roles if _kind(c) == "treatment"])
    if treatment:
        clauses.append(treatment)
    return ", ".join(clauses) + "."


def _kind(column: str) -> str:
    name = column.lower().replace("_", " ").strip()
    for kind, names in (("age", _AGE), ("sex", _SEX), ("weight", _WEIGHT), ("hpv", _HPV),
                        ("tobacco", _TOBACCO), ("alcohol", _ALCOHOL), ("performance", _PERFORMANCE),
                        ("center", _CENTER), ("treatment", _TREATMENTS)):
        if name in names:
            return kind
    return "other"


def _value(row: Mapping[str, Any], column: str | None) -> Any:
    """The row's value, or None when the column is absent or the value missing."""
    if column is None or column not in row:
        return None
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _is_number(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _number(value: Any) -> str:
    return f"{round(float(value), 1):g}"


def _token(value: Any) -> str:
    return str(value).strip().lower()


def _sex(value: Any) -> str | None:
    token = None if value is None else _token(value)
    if token in {"1", "m", "male", "man"}:
        return "male"
    if token in {"0", "f", "female", "woman"}:
        return "female"
    return None if token is None else token


def _hpv(value: Any) -> str:
    token = _token(value)
    if token in _YES:
        return "HPV positive"
    if token in _NO:
        return "HPV negative"
    return f"HPV {value}"


def _tobacco(value: Any) -> str:
    token = _token(value)
    if token in _YES or token == "smoker":
        return "current smoker"
    if token in _FORMER:
        return "former smoker"
    if token in _NO or token in {"non-smoker", "nonsmoker"}:
        return "non-smoker"
    return f"tobacco {value}"


def _alcohol(value: Any) -> str:
    token = _token(value)
    if token in _YES:
        return "drinks alcohol"
    if token in _FORMER:
        return "former drinker"
    if token in _NO:
        return "no alcohol use"
    if token in {"light", "moderate", "heavy"}:
        return f"{token} drinker"
    return f"alcohol {value}"


def _generic(column: str, role: str, value: Any) -> str:
    name = column.replace("_", " ")
    if role == "binary":
        return name if _token(value) in _YES else f"no {name}"
    if role == "numeric" and _is_number(value):
        return f"{name} {_number(value)}"
    return f"{name} {value}"


def _treatments(row: Mapping[str, Any], columns: list[str]) -> str | None:
    """Given treatments are listed; when none was given, the known absent ones are."""
    given, absent = [], []
    for column in columns:
        value = _value(row, column)
        if value is None:
            continue
        (given if _token(value) in _YES else absent).append(column.replace("_", " "))
    if given:
        return "treated with " + _join(given, "and")
    if absent:
        return "no " + _join(absent, "or")
    return None


def _join(items: list[str], word: str) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {word} " + items[-1]
