"""EHR (clinical table) schema from config.prognosis.ehr, and loading + validation of the table;
every problem raises EHRError naming the file, the column and the offending ids or rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from duplus.errors import EHRError
from duplus.settings import Settings, schema_default

log = logging.getLogger(__name__)

# Spellings accepted for binary covariates. Sex follows the HECKTOR convention (1 = male).
_TRUE = {"1", "1.0", "true", "yes", "y", "positive", "pos", "+", "m", "male"}
_FALSE = {"0", "0.0", "false", "no", "n", "negative", "neg", "-", "f", "female"}
# Events must be exactly 0/1; booleans are accepted because sksurv tables store them so.
_EVENT_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
_MAX_LISTED = 10


@dataclass(frozen=True)
class ColumnText:
    """How the text route describes one column (config ``prognosis.ehr.columns.<column>``).

    name: the readable name ("sex", "Karnofsky score"); default: the column name with ``_`` and
        ``.`` read as spaces. unit: written after a number ("years"). labels: coded value -> its
        meaning (``{1: male, 2: female}``); keys of a binary column are read like its values
        (1/0, yes/no, M/F ...), so ``{1: HPV positive, 0: HPV negative}`` works for either spelling.
    """

    name: str | None = None
    unit: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EHRSchema:
    """Roles of the EHR table's columns (config ``prognosis.ehr``).

    center: the column naming each patient's center (institution): folds are stratified by it when
        the images give no center, and the text route reads it as "center: X". treatments: binary
        columns that are treatments, read as "treated with X" / "not treated with X". Neither is
        ever guessed from a column's name: a column called ``site`` may be a tumour subsite.
    columns: per-column text descriptions (``ColumnText``); a column without one reads
        "name: value".
    """

    id: str = schema_default("prognosis", "ehr", "id")
    time: str = schema_default("prognosis", "ehr", "time")
    event: str = schema_default("prognosis", "ehr", "event")
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    binary: tuple[str, ...] = ()
    table: str | None = None
    allow_unmatched: bool = False
    center: str | None = None
    treatments: tuple[str, ...] = ()
    columns: Mapping[str, ColumnText] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "EHRSchema":
        """Build from the full config dict (reads ``prognosis.ehr``)."""
        ehr = Settings.of(config).prognosis.ehr
        schema = cls(id=ehr.id, time=ehr.time, event=ehr.event, numeric=ehr.numeric, categorical=ehr.categorical,
                     binary=ehr.binary, table=ehr.table, allow_unmatched=ehr.allow_unmatched, center=ehr.center,
                     treatments=ehr.treatments, columns=_column_texts(ehr.columns))
        schema.check()
        return schema

    def text_of(self, column: str) -> ColumnText:
        """The column's description, or an empty one (its name, no unit, values as they are)."""
        return self.columns.get(column) or ColumnText()

    def display_name(self, column: str) -> str:
        return self.text_of(column).name or column.replace("_", " ").replace(".", " ").strip()

    @property
    def covariates(self) -> tuple[str, ...]:
        return self.numeric + self.categorical + self.binary

    @property
    def required(self) -> tuple[str, ...]:
        extra = (self.center,) if self.center and self.center not in self.covariates else ()
        return (self.id, self.time, self.event) + self.covariates + extra

    def check(self) -> None:
        """A column may have one role only; a repeated name is a config mistake. Treatments must
        be binary covariates, described columns covariates (or the center); all problems at once."""
        problems = []
        not_binary = [c for c in self.treatments if c not in self.binary]
        if not_binary:
            problems.append(f"treatments {not_binary} are not listed under binary (a treatment is given or not; "
                            f"a --configfile merged into config.yaml keeps its treatments unless it sets its own, "
                            f"e.g. treatments: [])")
        known = set(self.covariates) | ({self.center} if self.center else set())
        unused = sorted(set(self.columns) - known)
        if unused:
            # Not an error: a --configfile merged into config.yaml inherits the demo's descriptions.
            log.warning("config prognosis.ehr.columns describes %s, which are not covariates or the center; "
                        "those descriptions are unused", unused)
        if self.center in (self.id, self.time, self.event):
            problems.append(f"center '{self.center}' is the id, time or event column")
        if problems:
            raise EHRError("config prognosis.ehr: " + "; ".join(problems))
        seen: dict[str, str] = {}
        roles = [("id", [self.id]), ("time", [self.time]), ("event", [self.event]),
                 ("numeric", self.numeric), ("categorical", self.categorical), ("binary", self.binary)]
        for role, columns in roles:
            for column in columns:
                if column in seen:
                    raise EHRError(f"config prognosis.ehr: column '{column}' is listed as both "
                                   f"{seen[column]} and {role}; give each column one role")
                seen[column] = role


@dataclass
class EHRTable:
    """A validated EHR table: one row per patient, ids as strings, in file order.

    ``frame`` holds the id column (str), time (float), event (int 0/1), numerics (float, NaN when
    missing), categoricals (str, None when missing) and binaries (float 0/1, NaN when missing).
    """

    frame: pd.DataFrame
    schema: EHRSchema
    source: str
    unmatched: list[str] = field(default_factory=list)

    @property
    def ids(self) -> np.ndarray:
        return self.frame[self.schema.id].to_numpy(dtype=str)

    @property
    def time(self) -> np.ndarray:
        return self.frame[self.schema.time].to_numpy(dtype=float)

    @property
    def event(self) -> np.ndarray:
        return self.frame[self.schema.event].to_numpy(dtype=int).astype(bool)


def load_ehr(path: str | os.PathLike, schema: EHRSchema, image_ids: Iterable[str] | None = None,
             allow_unmatched: bool | None = None) -> EHRTable:
    """Read and validate the EHR CSV at ``path``.

    Args:
        path: the clinical CSV.
        schema: column roles.
        image_ids: case ids that have an image; ids of the table not among them are an error
            unless ``allow_unmatched`` (default: ``schema.allow_unmatched``), then they are dropped.
        allow_unmatched: override of the schema's flag.

    Raises:
        EHRError: unreadable file, missing columns, duplicate or missing ids, missing, negative or
            non-numeric times, events not in {0, 1}, non-numeric or infinite numerics, unknown
            binary values, unmatched ids.
    """
    source = str(path)
    if not Path(path).is_file():
        raise EHRError(f"EHR table {source} does not exist (config prognosis.ehr.table, or "
                       f"clinical.csv in the dataset's raw folder)")
    try:
        # Ids stay text: "007" and "7" are different patients.
        frame = pd.read_csv(path, dtype={schema.id: str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise EHRError(f"EHR table {source} cannot be read as CSV: {error}") from error
    return validate_ehr(frame, schema, source=source, image_ids=image_ids, allow_unmatched=allow_unmatched)


def validate_ehr(frame: pd.DataFrame, schema: EHRSchema, source: str = "<table>",
                 image_ids: Iterable[str] | None = None, allow_unmatched: bool | None = None) -> EHRTable:
    """Validate an in-memory EHR table (see ``load_ehr``); ``source`` names it in errors."""
    schema.check()
    missing = [c for c in schema.required if c not in frame.columns]
    if missing:
        raise EHRError(f"EHR table {source}: missing column(s) {missing}; the table has "
                       f"{list(map(str, frame.columns))} (config prognosis.ehr names the columns)")
    out = pd.DataFrame(index=pd.RangeIndex(len(frame)))
    out[schema.id] = _ids(frame, schema.id, source)
    ids = out[schema.id]
    out[schema.time] = _times(frame[schema.time], ids, schema.time, source)
    out[schema.event] = _events(frame[schema.event], ids, schema.event, source)
    for column in schema.numeric:
        out[column] = _numeric(frame[column], ids, column, source)
    for column in schema.categorical:
        out[column] = _categorical(frame[column])
    for column in schema.binary:
        out[column] = _binary(frame[column], ids, column, source)
    if schema.center and schema.center not in schema.covariates:
        out[schema.center] = _categorical(frame[schema.center])

    unmatched: list[str] = []
    if image_ids is not None:
        known = {str(i) for i in image_ids}
        unmatched = [i for i in ids if i not in known]
        allow = schema.allow_unmatched if allow_unmatched is None else allow_unmatched
        if unmatched and not allow:
            raise EHRError(f"EHR table {source}, column '{schema.id}': {len(unmatched)} id(s) match no "
                           f"image case: {_listing(unmatched)}; fix the ids or set "
                           f"prognosis.ehr.allow_unmatched: true to drop them")
        if unmatched:
            log.warning("EHR table %s: dropping %d id(s) with no image: %s", source, len(unmatched),
                        _listing(unmatched))
            out = out[~ids.isin(unmatched)].reset_index(drop=True)
        without_ehr = sorted(known - set(out[schema.id]))
        if without_ehr:
            log.warning("EHR table %s has no row for %d image case(s): %s", source, len(without_ehr),
                        _listing(without_ehr))
    return EHRTable(frame=out, schema=schema, source=source, unmatched=unmatched)


def check_cohort(table: EHRTable, n_folds: int) -> list[str]:
    """Problems that make a cross-validated survival analysis of ``table`` meaningless, all in one
    EHRError naming the columns: a covariate missing in every row, one follow-up time for every
    patient. Returns the warnings (also logged), each naming its column, for cohort.json and the
    report: no event at all (every metric is then NaN), fewer events than folds (folds are then
    dealt so that events spread)."""
    schema, frame = table.schema, table.frame
    problems = []
    empty = [c for c in schema.covariates if len(frame) and frame[c].isna().all()]
    if empty:
        problems.append(f"covariate(s) {empty} missing in every row (remove them from prognosis.ehr)")
    times = frame[schema.time].to_numpy(dtype=float)
    if len(times) > 1 and np.ptp(times) == 0:
        problems.append(f"column '{schema.time}': every patient has the same follow-up time {times[0]:g}, "
                        f"so no patient outlives another")
    if problems:
        raise EHRError(f"EHR table {table.source}: " + "; ".join(problems))
    events = int(frame[schema.event].sum())
    warnings = []
    if events == 0:
        warnings.append(f"EHR table {table.source} has no event (column '{schema.event}' is 0 for all {len(frame)} "
                        f"patients): every metric is undefined (NaN) and there are no risk groups")
    elif events < n_folds:
        warnings.append(f"EHR table {table.source}, column '{schema.event}': {events} event(s) for {n_folds} folds: "
                        f"some test folds have none and their C-index is undefined")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _column_texts(raw: Mapping[str, Any]) -> dict[str, ColumnText]:
    texts = {}
    for column, spec in raw.items():
        spec = dict(spec or {})
        # Keys as the validated table holds values: 1.0 and 1 are one level, as in _categorical.
        labels = {_level_key(k): str(v) for k, v in (spec.get("labels") or {}).items()}
        texts[str(column)] = ColumnText(name=spec.get("name"), unit=spec.get("unit"), labels=labels)
    return texts


def _level_key(value: Any) -> str:
    """A coded value as text, the way ``_categorical`` writes levels ("1" for 1, 1.0 and "1")."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def binary_code(value: Any) -> float | None:
    """1.0 / 0.0 for an accepted binary spelling, NaN for missing, None for anything else."""
    if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value).strip() == "":
        return np.nan
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    return None


def _listing(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in list(values)[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")


def _rows(mask: pd.Series, ids: pd.Series) -> str:
    """Offending rows as 'row N (id X)'; rows count from 1 after the header, like a spreadsheet."""
    where = np.flatnonzero(mask.to_numpy())
    return _listing([f"row {i + 2} (id {ids.iloc[i]})" for i in where])


def _ids(frame: pd.DataFrame, column: str, source: str) -> pd.Series:
    raw = frame[column]
    missing = raw.isna()
    if missing.any():
        rows = _listing([f"row {i + 2}" for i in np.flatnonzero(missing.to_numpy())])
        raise EHRError(f"EHR table {source}, column '{column}': missing id at {rows}")
    ids = raw.astype(str).str.strip()
    duplicated = ids[ids.duplicated(keep=False)]
    if len(duplicated):
        raise EHRError(f"EHR table {source}, column '{column}': duplicate id(s) "
                       f"{_listing(sorted(set(duplicated)))} at {_rows(ids.duplicated(keep=False), ids)}")
    return ids.reset_index(drop=True)


def _as_float(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Numeric values and a mask of entries that are present but not numbers."""
    raw = raw.astype(object).reset_index(drop=True)
    values = pd.to_numeric(raw, errors="coerce").astype(float)
    present = raw.map(lambda v: not (pd.isna(v) or str(v).strip() == ""))
    return values, present & values.isna()


def _times(raw: pd.Series, ids: pd.Series, column: str, source: str) -> pd.Series:
    values, bad = _as_float(raw)
    if bad.any():
        raise EHRError(f"EHR table {source}, column '{column}': non-numeric follow-up time at {_rows(bad, ids)}")
    if values.isna().any():
        raise EHRError(f"EHR table {source}, column '{column}': missing follow-up time at "
                       f"{_rows(values.isna(), ids)}; every patient needs a time")
    if not np.isfinite(values).all():
        raise EHRError(f"EHR table {source}, column '{column}': infinite time at {_rows(~np.isfinite(values), ids)}")
    if (values < 0).any():
        raise EHRError(f"EHR table {source}, column '{column}': negative time at {_rows(values < 0, ids)}")
    return values


def _events(raw: pd.Series, ids: pd.Series, column: str, source: str) -> pd.Series:
    text = raw.reset_index(drop=True).map(lambda v: None if pd.isna(v) else str(v).strip().lower())
    mapped = text.map(lambda v: _EVENT_VALUES.get(v) if v is not None else None)
    bad = mapped.isna()
    if bad.any():
        found = sorted({str(v) for v in raw.reset_index(drop=True)[bad]})
        raise EHRError(f"EHR table {source}, column '{column}': event must be 0 or 1, found {found} at "
                       f"{_rows(bad, ids)}")
    return mapped.astype(int)


def _numeric(raw: pd.Series, ids: pd.Series, column: str, source: str) -> pd.Series:
    values, bad = _as_float(raw)
    if bad.any():
        found = sorted({str(v) for v in raw.reset_index(drop=True)[bad]})
        raise EHRError(f"EHR table {source}, column '{column}': non-numeric value(s) {found} at {_rows(bad, ids)}")
    # Infinity is a broken export, not a missing value: imputing it would hide the fault.
    infinite = np.isinf(values)
    if infinite.any():
        raise EHRError(f"EHR table {source}, column '{column}': infinite value at {_rows(infinite, ids)}")
    return values


def _categorical(raw: pd.Series) -> pd.Series:
    def level(value: Any) -> str | None:
        if pd.isna(value) or str(value).strip() == "":
            return None
        # 1.0 read from a column with gaps is the same level as 1.
        return _level_key(value)

    return raw.reset_index(drop=True).map(level).astype(object)


def _binary(raw: pd.Series, ids: pd.Series, column: str, source: str) -> pd.Series:
    values = [binary_code(v) for v in raw.reset_index(drop=True)]
    # A list, not Series.map: pandas would turn the "unknown" marker None into NaN (= missing).
    bad = pd.Series([v is None for v in values])
    coded = pd.Series([np.nan if v is None else v for v in values], dtype=float)
    if bad.any():
        found = sorted({str(v) for v in raw.reset_index(drop=True)[bad]})
        raise EHRError(f"EHR table {source}, column '{column}': binary value(s) {found} are not 0/1, "
                       f"yes/no, true/false, positive/negative or M/F, at {_rows(bad, ids)}")
    return coded
