"""One EHR row as text for the text encoder: one short sentence per covariate ("age: 63 years",
"sex: male", "treated with chemotherapy"), worded from the config's column descriptions only.

Nothing is inferred from a column's name: a column reads as its readable name, its value (or the
value's label) and its unit; a column is the center or a treatment only when config
``prognosis.ehr`` says so. Outcome columns (time, event) are never described.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from duplus.prognosis.ehr import EHRSchema, binary_code

UNKNOWN = "unknown"


def field_sentences(row: Mapping[str, Any], schema: EHRSchema) -> dict[str, str]:
    """One sentence per covariate (and the center, when it is not a covariate), in schema order.

    A missing value reads "<name>: unknown": the text route must still say that the field exists,
    as the table route keeps a missing indicator.

    Example:
        >>> field_sentences({"age": 63.0, "sex": "2"}, schema)   # age {unit: years}, sex {labels: {1: male, 2: female}}
        {'age': 'age: 63 years', 'sex': 'sex: female'}
    """
    columns = list(schema.covariates)
    if schema.center and schema.center not in columns:
        columns.append(schema.center)
    return {column: _sentence(row, schema, column) for column in columns}


def ehr_to_sentence(row: Mapping[str, Any], schema: EHRSchema) -> str:
    """The field sentences joined into one ("age: 63 years; sex: female; center: CHUM."), fixed
    order, missing fields left out (equal rows give equal text)."""
    present = [text for column, text in field_sentences(row, schema).items() if _value(row, column) is not None]
    return "; ".join(present) + "." if present else "no recorded covariates."


def _sentence(row: Mapping[str, Any], schema: EHRSchema, column: str) -> str:
    name = schema.display_name(column)
    value = _value(row, column)
    if value is None:
        return f"{name}: {UNKNOWN}"
    text = schema.text_of(column)
    if column in schema.binary:
        code = binary_code(value)
        labels = {binary_code(k): v for k, v in text.labels.items()}
        if code in labels:
            return f"{name}: {labels[code]}"
        if column in schema.treatments:
            return f"treated with {name}" if code == 1.0 else f"not treated with {name}"
        return f"{name}: {'yes' if code == 1.0 else 'no'}"
    if column == schema.center:
        return f"{name}: {text.labels.get(str(value), value)}"
    if column in schema.numeric and _is_number(value):
        unit = f" {text.unit}" if text.unit else ""
        return f"{name}: {_number(value)}{unit}"
    label = text.labels.get(str(value))
    unit = f" {text.unit}" if text.unit and label is None else ""
    return f"{name}: {label if label is not None else value}{unit}"


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
    # Three significant digits: a creatinine of 0.87 keeps its digits, an age of 63 stays 63.
    number = float(value)
    return f"{number:.3g}" if abs(number) < 1000 else f"{round(number):d}"
