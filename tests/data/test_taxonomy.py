"""Class taxonomy: synonyms, British spellings, hierarchy and hierarchical masks."""

from __future__ import annotations

import numpy as np
import pytest

from duplus.data import taxonomy
from duplus.data.builtin_datasets import BUILTIN
from duplus.errors import DataError


@pytest.mark.parametrize("text, expected", [
    ("liver", "liver"), ("  Liver ", "liver"), ("Hepatic Tumour", "liver tumor"), ("liver_lesion", "liver tumor"),
    ("a liver tumour.", "liver tumor"), ("Liver Tumours", "liver tumor"), ("Kidney_L", "left kidney"),
    ("right-kidney", "right kidney"), ("GTVp", "primary tumor"), ("gtvn", "lymph node"),
    ("Gray Matter", "grey matter"), ("oesophagus", "esophagus"), ("Peritumoral Oedema", "edema"),
    ("prostate/uterus", "prostate or uterus"), ("LV", "left ventricle"), ("IVC", "inferior vena cava"),
])
def test_synonyms_map_to_canonical_names(text: str, expected: str) -> None:
    assert taxonomy.canonical_name(text) == expected


def test_unknown_text_is_none_and_require_names_where() -> None:
    assert taxonomy.canonical_name("banana") is None
    assert taxonomy.canonical_name("") is None
    with pytest.raises(DataError, match=r"datasets\.x\.labels\.3.*'banana'"):
        taxonomy.require_class("banana", "datasets.x.labels.3")


def test_an_ambiguous_label_name_is_refused_rather_than_guessed() -> None:
    # "ventricles" names heart chambers as often as brain CSF spaces: the user must say which.
    assert taxonomy.canonical_name("ventricles") is None
    with pytest.raises(DataError, match="left ventricle"):
        taxonomy.require_class("ventricles", "datasets.x.labels.1")


def test_hierarchy_parents_and_descendants() -> None:
    assert taxonomy.parents("liver tumor") == ["liver"]
    assert taxonomy.parents("left lens") == ["left eye", "eye"]
    assert taxonomy.parents("liver") == []
    assert set(taxonomy.descendants("kidney")) == {"right kidney", "left kidney", "kidney tumor", "kidney cyst"}
    assert set(taxonomy.descendants("brain tumor")) == {"edema", "tumor core", "non-enhancing tumor", "enhancing tumor"}


def test_every_class_is_lower_case_with_known_region_and_every_catalog_label_is_canonical() -> None:
    for info in taxonomy.all_classes():
        assert info.name == info.name.lower()
        assert info.region in taxonomy.REGIONS
        assert taxonomy.canonical_name(info.name) == info.name
    for spec in BUILTIN.values():
        for name in spec.labels.values():
            assert taxonomy.canonical_name(name) == name, (spec.name, name)


def test_masks_include_descendants() -> None:
    label = np.array([[0, 1, 1, 5], [2, 3, 4, 5]], dtype=np.uint8)
    label_map = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen", 5: "liver tumor"}
    masks = taxonomy.masks_from_label(label, label_map, ["liver", "liver tumor", "kidney", "spleen", "pancreas"])
    assert masks.shape == (5, 2, 4) and masks.dtype == bool
    assert masks[0].tolist() == [[False, True, True, True], [False, False, False, True]]  # liver ⊇ tumour
    assert masks[1].tolist() == [[False, False, False, True], [False, False, False, True]]
    assert masks[2].tolist() == [[False, False, False, False], [True, True, False, False]]  # both kidneys
    assert masks[3].sum() == 1
    assert not masks[4].any()  # not annotated


def test_masks_accept_synonyms_in_the_label_map() -> None:
    label = np.array([0, 1, 2])
    masks = taxonomy.masks_from_label(label, {1: "Liver", 2: "hepatic tumour"}, ["liver"])
    assert masks[0].tolist() == [False, True, True]


def test_class_table_lists_every_class() -> None:
    table = taxonomy.format_class_table()
    for info in taxonomy.all_classes():
        assert info.name in table
    assert "hepatic tumor" in table


def test_a_misspelt_class_gets_suggestions():
    close_classes = taxonomy.close_classes
    assert close_classes("livr") == ["liver"]
    assert close_classes("left kidnye") == ["left kidney"]
    assert {"liver tumor", "kidney tumor"} <= set(close_classes("tumour"))  # a word of several classes
    assert close_classes("banana") == []
    with pytest.raises(DataError, match=r"labels.1: 'livr' is not a known class name or synonym \(did you mean: liver\?\)"):
        taxonomy.require_class("livr", "labels.1")
