"""Canonical class registry: lower-case class names with region, parent and synonyms.

Free text ("Hepatic tumour", "kidney_L") maps to a canonical name; masks follow the hierarchy.
Built-in classes are fixed here; a run's config may declare more (``datasets.<name>.classes``,
read by ``duplus.data.registry``), which :func:`declare_classes` adds beside them for every lookup
of the process: a declared class is named, prompted, trained and scored like a built-in one.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from duplus.errors import DataError

REGIONS = ("abdomen", "pelvis", "thorax", "heart", "head and neck", "brain", "whole body")


@dataclass(frozen=True)
class ClassInfo:
    """One segmentable class: canonical name, body region, parent class (or None) and synonyms.

    ``prompt`` is set only for a declared class whose config gives its target prompt's wording
    (see ``duplus.prompts.templates.class_wording``); built-in classes are prompted by name.
    """

    name: str
    region: str
    parent: str | None = None
    synonyms: tuple[str, ...] = ()
    prompt: str | None = None


def _c(name: str, region: str, parent: str | None = None, *synonyms: str) -> ClassInfo:
    return ClassInfo(name, region, parent, tuple(synonyms))


# Order matters only for display. Parents must be listed before their children.
_CLASSES: tuple[ClassInfo, ...] = (
    # Abdomen
    _c("liver", "abdomen", None, "hepatic parenchyma", "liver parenchyma"),
    _c("liver tumor", "abdomen", "liver", "hepatic tumor", "liver lesion", "hepatic lesion", "liver cancer",
       "liver neoplasm", "hepatic neoplasm", "liver mass", "hepatic mass", "liver metastasis", "lesion of the liver"),
    _c("hepatic vessel", "abdomen", None, "hepatic vessels", "liver vessel", "liver vessels", "hepatic vasculature"),
    _c("spleen", "abdomen", None, "splenic parenchyma"),
    _c("kidney", "abdomen", None, "kidneys", "renal parenchyma", "both kidneys"),
    _c("right kidney", "abdomen", "kidney", "kidney right", "r kidney", "kidney r", "right renal", "rk"),
    _c("left kidney", "abdomen", "kidney", "kidney left", "l kidney", "kidney l", "left renal", "lk"),
    _c("kidney tumor", "abdomen", "kidney", "renal tumor", "kidney lesion", "renal lesion", "renal mass",
       "kidney cancer", "renal cell carcinoma", "kidney mass"),
    _c("kidney cyst", "abdomen", "kidney", "renal cyst"),
    _c("pancreas", "abdomen", None, "pancreatic parenchyma"),
    _c("pancreas tumor", "abdomen", "pancreas", "pancreatic tumor", "pancreatic lesion", "pancreatic cancer",
       "pancreatic mass", "pancreatic neoplasm", "pancreas cancer"),
    _c("gallbladder", "abdomen", None, "gall bladder"),
    _c("stomach", "abdomen", None, "gastric"),
    _c("esophagus", "thorax", None, "oesophagus", "gullet"),
    _c("duodenum", "abdomen", None),
    _c("colon", "abdomen", None, "large bowel", "large intestine"),
    _c("colon tumor", "abdomen", "colon", "colon cancer", "colorectal tumor", "colon cancer primaries",
       "colon lesion", "colorectal cancer"),
    _c("aorta", "abdomen", None, "abdominal aorta"),
    _c("inferior vena cava", "abdomen", None, "ivc", "postcava", "vena cava inferior", "vena cava"),
    _c("portal vein and splenic vein", "abdomen", None, "portal and splenic vein", "portal vein",
       "portal splenic vein", "portal vein splenic vein"),
    _c("adrenal gland", "abdomen", None, "adrenal glands", "suprarenal gland"),
    _c("right adrenal gland", "abdomen", "adrenal gland", "adrenal gland right", "right adrenal", "rag"),
    _c("left adrenal gland", "abdomen", "adrenal gland", "adrenal gland left", "left adrenal", "lag"),
    # Pelvis
    _c("bladder", "pelvis", None, "urinary bladder"),
    _c("prostate or uterus", "pelvis", None, "prostate/uterus", "prostate uterus", "prostate and uterus"),
    _c("prostate", "pelvis", None, "prostate gland"),
    _c("prostate peripheral zone", "pelvis", "prostate", "peripheral zone", "pz"),
    _c("prostate transition zone", "pelvis", "prostate", "transition zone", "tz", "central gland"),
    # Thorax
    _c("lung", "thorax", None, "lungs", "pulmonary parenchyma"),
    _c("right lung", "thorax", "lung", "lung right", "r lung"),
    _c("left lung", "thorax", "lung", "lung left", "l lung"),
    _c("lung tumor", "thorax", "lung", "lung nodule", "pulmonary nodule", "lung cancer", "lung lesion",
       "pulmonary tumor", "lung neoplasm", "lung mass", "pulmonary lesion", "non small cell lung cancer"),
    _c("trachea", "thorax", None, "windpipe"),
    _c("spinal cord", "thorax", None, "cord", "spinal canal"),
    _c("heart", "thorax", None, "cardiac", "whole heart"),
    # Heart (cardiac MRI)
    _c("left ventricle", "heart", "heart", "lv", "left ventricular cavity", "left ventricle blood pool",
       "lv blood pool", "left ventricular blood pool"),
    _c("myocardium", "heart", "heart", "myo", "left ventricular myocardium", "lv myocardium", "lvm"),
    _c("right ventricle", "heart", "heart", "rv", "right ventricular cavity", "right ventricle blood pool"),
    _c("left atrium", "heart", "heart", "la", "left atrial cavity"),
    # Head and neck (CT organs at risk, PET/CT lesions)
    _c("brainstem", "head and neck", None, "brain stem"),
    _c("eye", "head and neck", None, "eyes", "eyeball", "globe"),
    _c("left eye", "head and neck", "eye", "eye left", "eye l"),
    _c("right eye", "head and neck", "eye", "eye right", "eye r"),
    _c("left lens", "head and neck", "left eye", "lens left", "lens l"),
    _c("right lens", "head and neck", "right eye", "lens right", "lens r"),
    _c("optic nerve", "head and neck", None, "optic nerves"),
    _c("left optic nerve", "head and neck", "optic nerve", "optic nerve left", "optic nerve l"),
    _c("right optic nerve", "head and neck", "optic nerve", "optic nerve right", "optic nerve r"),
    _c("optic chiasm", "head and neck", None, "optic chiasma", "chiasm"),
    _c("temporal lobe", "head and neck", None, "temporal lobes"),
    _c("left temporal lobe", "head and neck", "temporal lobe", "temporal lobe left", "temporal lobe l"),
    _c("right temporal lobe", "head and neck", "temporal lobe", "temporal lobe right", "temporal lobe r"),
    _c("pituitary", "head and neck", None, "pituitary gland", "hypophysis"),
    _c("parotid gland", "head and neck", None, "parotid", "parotids", "parotid glands"),
    _c("left parotid gland", "head and neck", "parotid gland", "left parotid", "parotid left", "parotid l"),
    _c("right parotid gland", "head and neck", "parotid gland", "right parotid", "parotid right", "parotid r"),
    _c("inner ear", "head and neck", None, "inner ears", "cochlea"),
    _c("left inner ear", "head and neck", "inner ear", "inner ear left", "inner ear l"),
    _c("right inner ear", "head and neck", "inner ear", "inner ear right", "inner ear r"),
    _c("middle ear", "head and neck", None, "middle ears"),
    _c("left middle ear", "head and neck", "middle ear", "middle ear left", "middle ear l"),
    _c("right middle ear", "head and neck", "middle ear", "middle ear right", "middle ear r"),
    _c("temporomandibular joint", "head and neck", None, "tmj", "temporomandibular joints"),
    _c("left temporomandibular joint", "head and neck", "temporomandibular joint", "left tmj", "tmj left", "tmj l"),
    _c("right temporomandibular joint", "head and neck", "temporomandibular joint", "right tmj", "tmj right",
       "tmj r"),
    _c("mandible", "head and neck", None, "jaw", "lower jaw", "mandibular bone"),
    _c("left mandible", "head and neck", "mandible", "mandible left", "mandible l"),
    _c("right mandible", "head and neck", "mandible", "mandible right", "mandible r"),
    _c("primary tumor", "head and neck", None, "gtvp", "gtv p", "primary gross tumor volume",
       "head and neck primary tumor", "head and neck tumor", "head and neck cancer", "oropharyngeal tumor",
       "primary lesion"),
    _c("lymph node", "head and neck", None, "gtvn", "gtv n", "nodal gross tumor volume", "metastatic lymph node",
       "lymph node metastasis", "malignant lymph node", "pathological lymph node", "nodal metastasis",
       "lymph nodes"),
    # Brain
    _c("brain tumor", "brain", None, "glioma", "brain lesion", "whole tumor", "brain neoplasm", "glioblastoma",
       "brain mass", "intracranial tumor"),
    _c("edema", "brain", "brain tumor", "peritumoral edema", "brain edema", "oedema"),
    _c("tumor core", "brain", "brain tumor", "brain tumor core"),
    _c("non-enhancing tumor", "brain", "tumor core", "non enhancing tumor", "necrotic tumor core",
       "necrosis", "non-enhancing tumor core", "necrotic core"),
    _c("enhancing tumor", "brain", "tumor core", "enhancing tumor core", "contrast enhancing tumor"),
    _c("grey matter", "brain", None, "gray matter", "gm", "cortical grey matter"),
    _c("white matter", "brain", None, "wm", "cerebral white matter"),
    # Not "ventricles": a cardiac dataset's label of that name would silently become brain CSF.
    _c("csf", "brain", None, "cerebrospinal fluid", "cerebro spinal fluid"),
    _c("hippocampus", "brain", None, "hippocampi"),
    _c("anterior hippocampus", "brain", "hippocampus", "hippocampus anterior", "hippocampal head"),
    _c("posterior hippocampus", "brain", "hippocampus", "hippocampus posterior", "hippocampal body and tail"),
    # Whole body (PET)
    _c("lesion", "whole body", None, "fdg avid lesion", "tumor lesion", "hypermetabolic lesion", "pet lesion",
       "malignant lesion"),
)

# British spellings and frequent variants, applied word by word before any lookup.
_WORD_VARIANTS = {
    "tumour": "tumor", "tumours": "tumor", "tumors": "tumor", "oesophagus": "esophagus",
    "oesophageal": "esophageal", "oedema": "edema", "haemorrhage": "hemorrhage", "haematoma": "hematoma",
    "gray": "grey", "centre": "center", "ischaemia": "ischemia", "lesions": "lesion", "nodules": "nodule",
    "neoplasms": "neoplasm", "metastases": "metastasis", "masses": "mass", "cysts": "cyst",
}
_ARTICLES = ("a ", "an ", "the ")


def _normalize(text: str) -> str:
    """Lower-case, unify separators and British spellings, drop articles and trailing punctuation."""
    text = text.strip().lower()
    text = re.sub(r"[_\-/,;:()\[\]]+", " ", text)
    text = re.sub(r"[.!?'\"]+", "", text)
    words = [_WORD_VARIANTS.get(word, word) for word in text.split()]
    text = " ".join(words)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article):]
    return text


# Classes a run's config declares (``declare_classes``), after the built-in ones.
_declared: tuple[ClassInfo, ...] = ()


def _tables() -> tuple[dict[str, ClassInfo], dict[str, str], dict[str, tuple[str, ...]]]:
    return _build_tables(_CLASSES + _declared)


@lru_cache(maxsize=8)
def _build_tables(classes: tuple[ClassInfo, ...]
                  ) -> tuple[dict[str, ClassInfo], dict[str, str], dict[str, tuple[str, ...]]]:
    by_name: dict[str, ClassInfo] = {}
    lookup: dict[str, str] = {}
    for info in classes:
        if info.parent is not None and info.parent not in by_name:
            raise AssertionError(f"class '{info.name}' lists parent '{info.parent}' before it is defined")
        by_name[info.name] = info
    for info in classes:
        for text in (info.name, *info.synonyms):
            key = _normalize(text)
            owner = lookup.setdefault(key, info.name)
            if owner != info.name:
                raise AssertionError(f"synonym '{text}' is claimed by both '{owner}' and '{info.name}'")
    children: dict[str, list[str]] = {name: [] for name in by_name}
    for info in classes:
        if info.parent is not None:
            children[info.parent].append(info.name)
    return by_name, lookup, {k: tuple(v) for k, v in children.items()}


def normalized(text: str) -> str:
    """The form names are compared in: lower case, unified separators and spellings, no articles."""
    return _normalize(str(text))


def builtin_name(text: str) -> str | None:
    """The built-in class ``text`` names (name or synonym), ignoring any declared class."""
    return _build_tables(_CLASSES)[1].get(_normalize(str(text)))


def close_builtin_classes(text: str, limit: int = 3) -> list[str]:
    """Built-in classes whose name or a synonym is close to ``text`` (a declared name worth a second look)."""
    lookup = _build_tables(_CLASSES)[1]
    near = difflib.get_close_matches(_normalize(str(text)), list(lookup), n=3 * limit, cutoff=0.8)
    return list(dict.fromkeys(lookup[key] for key in near))[:limit]


def declaration_problems(declared: Sequence[ClassInfo]) -> list[tuple[str, str]]:
    """Why ``declared`` cannot join the built-in classes, as (declared class, problem) pairs; empty when it can.

    A declared name or synonym that a built-in class already has is refused, not merged: the
    label should use the built-in class, or the declaration another name.
    """
    problems = []
    builtin = _build_tables(_CLASSES)[1]
    owners: dict[str, str] = {}
    names = {info.name for info in declared}
    for info in declared:
        for text in (info.name, *info.synonyms):
            key = _normalize(text)
            if not key:
                problems.append((info.name, "an empty name or synonym"))
            elif key in builtin:
                what = "name" if text == info.name else f"synonym '{text}'"
                problems.append((info.name, f"its {what} is already the built-in class '{builtin[key]}': use "
                                            f"'{builtin[key]}' in labels and drop the declaration, or declare another name"))
            elif owners.setdefault(key, info.name) != info.name:
                problems.append((info.name, f"'{text}' is also a name or synonym of declared class '{owners[key]}'"))
        if info.parent is not None and info.parent not in names and builtin_name(info.parent) is None:
            problems.append((info.name, f"parent '{info.parent}' is neither a built-in class{did_you_mean(info.parent)} "
                                        f"nor a declared one"))
    by_name = {info.name: info for info in declared}
    for info in declared:
        chain, parent = [info.name], info.parent
        while parent in by_name:
            if parent in chain:
                problems.append((info.name, f"its parents form a loop ({' > '.join([*chain, parent])})"))
                break
            chain.append(parent)
            parent = by_name[parent].parent
    return problems


def declare_classes(declared: Sequence[ClassInfo]) -> None:
    """Make ``declared`` (parents named by canonical declared or built-in names) known beside the built-in classes.

    Replaces any earlier declaration; ``DataError`` listing every problem if they cannot be added.
    """
    global _declared
    problems = declaration_problems(declared)
    if problems:
        raise DataError("; ".join(f"declared class '{name}': {problem}" for name, problem in problems))
    resolved = [replace(info, parent=builtin_name(info.parent) or info.parent) if info.parent else info
                for info in declared]
    # Parents first, as the tables require: a declared parent may be listed after its child.
    ordered: list[ClassInfo] = []
    pending = list(resolved)
    while pending:
        placed = {info.name for info in ordered}
        ready = [info for info in pending if info.parent is None or info.parent in placed
                 or builtin_name(info.parent) == info.parent]
        ordered += ready
        pending = [info for info in pending if info not in ready]
    _declared = tuple(ordered)


def declared_classes() -> list[ClassInfo]:
    """The classes the current config declares (none outside a run)."""
    return list(_declared)


def declared_lineage(names: Iterable[str]) -> list[ClassInfo]:
    """The declared classes among ``names`` and their declared ancestors, parents first: what a model
    trained on ``names`` must record to be prompted by them without the config (see :func:`class_record`)."""
    by_name = {info.name: info for info in _declared}
    wanted: set[str] = set()
    for name in names:
        current = canonical_name(str(name))
        while current in by_name and current not in wanted:
            wanted.add(current)
            current = by_name[current].parent
    return [info for info in _declared if info.name in wanted]


def class_record(info: ClassInfo) -> dict[str, Any]:
    """A declared class as a model's sidecar keeps it (plain JSON): name, region, parent, synonyms, prompt."""
    return {"name": info.name, "region": info.region, "parent": info.parent, "synonyms": list(info.synonyms),
            "prompt": info.prompt}


def class_from_record(record: Any, where: str) -> ClassInfo:
    """The ``ClassInfo`` of a :func:`class_record`; ``DataError`` naming ``where`` and the field when malformed."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a mapping of name, region, parent, synonyms, prompt, got {record!r}")
    name, region = record.get("name"), record.get("region")
    parent, synonyms, prompt = record.get("parent"), record.get("synonyms") or [], record.get("prompt")
    problems = [f"'{key}' must be a non-empty text, got {value!r}" for key, value in (("name", name), ("region", region))
                if not isinstance(value, str) or not value.strip()]
    problems += [f"'{key}' must be a text or null, got {value!r}" for key, value in (("parent", parent), ("prompt", prompt))
                 if value is not None and not isinstance(value, str)]
    if not isinstance(synonyms, list) or not all(isinstance(text, str) for text in synonyms):
        problems.append(f"'synonyms' must be a list of texts, got {synonyms!r}")
    if problems:
        raise DataError(f"{where}: {'; '.join(problems)}")
    return ClassInfo(name=_normalize(name), region=region, parent=parent, synonyms=tuple(synonyms), prompt=prompt)


def all_classes() -> list[ClassInfo]:
    """Every canonical class (built-in, then declared), parents before children."""
    return list(_CLASSES + _declared)


def class_names() -> list[str]:
    """Every canonical class name (built-in, then declared)."""
    return [info.name for info in _CLASSES + _declared]


def canonical_name(text: str) -> str | None:
    """The canonical class for ``text`` (a name or synonym; case, spacing, British spelling tolerant), else None."""
    if not isinstance(text, str):
        return None
    return _tables()[1].get(_normalize(text))


def close_classes(text: str, limit: int = 5) -> list[str]:
    """Canonical classes a misspelt or ambiguous name probably meant ('livr' -> liver; 'tumour' -> the tumours)."""
    key = _normalize(str(text))
    by_name, lookup, _ = _tables()
    names = [lookup[near] for near in difflib.get_close_matches(key, list(lookup), n=3 * limit, cutoff=0.75)]
    if not names and key:
        # A word that is part of several class names but none by itself: offer those classes.
        words = set(key.split())
        names = [name for name in by_name if words <= set(_normalize(name).split())]
    return list(dict.fromkeys(names))[:limit]


def did_you_mean(text: str) -> str:
    """`` (did you mean: a, b?)`` for :func:`close_classes`, or an empty string."""
    names = close_classes(text)
    return f" (did you mean: {', '.join(names)}?)" if names else ""


def require_class(text: str, where: str) -> str:
    """Like :func:`canonical_name` but raises ``DataError`` naming ``where`` (a file or config key)."""
    name = canonical_name(text)
    if name is None:
        raise DataError(
            f"{where}: '{text}' is not a known class name or synonym{did_you_mean(text)}; run `duplus list-classes` "
            f"to see the {len(_CLASSES) + len(_declared)} classes"
        )
    return name


def get_class(name: str) -> ClassInfo:
    """The ``ClassInfo`` of a canonical name or synonym; ``DataError`` if unknown."""
    canonical = require_class(name, "class")
    return _tables()[0][canonical]


def parents(name: str) -> list[str]:
    """Ancestors of a class, nearest first (``parents('left lens') == ['left eye', 'eye']``)."""
    by_name = _tables()[0]
    chain: list[str] = []
    parent = get_class(name).parent
    while parent is not None:
        chain.append(parent)
        parent = by_name[parent].parent
    return chain


def children(name: str) -> list[str]:
    """Direct children of a class."""
    return list(_tables()[2][get_class(name).name])


def descendants(name: str) -> list[str]:
    """Every class below ``name`` in the hierarchy, depth first."""
    found: list[str] = []
    stack = list(reversed(children(name)))
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(reversed(_tables()[2][current]))
    return found


def region_of(name: str) -> str:
    """Body region of a class (abdomen, thorax, head and neck, brain, heart, pelvis, whole body)."""
    return get_class(name).region


def canonical_label_map(label_map: dict[int, str], where: str = "labels") -> dict[int, str]:
    """Map every label name to its canonical class; one ``DataError`` naming ``where`` and every unknown name."""
    result: dict[int, str] = {}
    problems = []
    for key, text in label_map.items():
        label_id = int(key)
        if label_id == 0 and str(text).strip().lower() in ("background", "bg"):
            continue  # as MSD's dataset.json lists it: nothing to map
        if label_id <= 0:
            problems.append(f"{where}.{key}: label id must be a positive integer (0 is background)")
            continue
        try:
            result[label_id] = require_class(str(text), f"{where}.{key}")
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataError("; ".join(problems))
    return dict(sorted(result.items()))


def label_ids_for(name: str, label_map: dict[int, str]) -> list[int]:
    """Label ids whose class is ``name`` or one of its descendants."""
    wanted = {get_class(name).name, *descendants(name)}
    return sorted(int(k) for k, v in label_map.items() if canonical_name(v) in wanted)


def masks_from_label(label: np.ndarray, label_map: dict[int, str], classes: list[str]) -> np.ndarray:
    """Boolean masks ``(K, *label.shape)``: class k covers its own ids and those of its descendants.

    A class that neither ``label_map`` nor any descendant annotates gets an all-False mask; callers
    that supervise with partial labels should only ask for classes the dataset annotates.
    """
    masks = np.zeros((len(classes), *label.shape), dtype=bool)
    for index, name in enumerate(classes):
        ids = label_ids_for(name, label_map)
        if ids:
            masks[index] = np.isin(label, ids)
    return masks


def format_class_table() -> str:
    """A plain-text table of every class with region, parent and synonyms (for `duplus list-classes`)."""
    rows = [("class", "region", "parent", "synonyms")]
    for info in _CLASSES + _declared:
        # A declared class is marked: it is known only where its config (or weights trained with it) is given.
        name = f"{info.name} *" if info in _declared else info.name
        rows.append((name, info.region, info.parent or "-", ", ".join(info.synonyms) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
        if number == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    if _declared:
        lines.append("* declared by the config (datasets.<name>.classes), not built in")
    return "\n".join(lines)
