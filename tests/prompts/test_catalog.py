"""Prompt catalog of a run (T1/T2 per dataset and across modalities) and free-text class resolution."""

from __future__ import annotations

import logging

import pytest
from prompt_helpers import FakeSpec, install_module

from duplus.errors import PromptError
from duplus.prompts.catalog import dataset_classes, prompts_for_config, resolve_free_text, split_free_text
from duplus.prompts.templates import target_prompts

CONFIG = {"prompts": {"paraphrases": True}}


def test_catalog_holds_every_t1_and_t2_of_the_run(specs):
    texts = prompts_for_config(CONFIG, datasets=specs)
    assert texts == sorted(set(texts))
    for t1 in (
        "A computed tomography scan of the abdomen",
        "A T2-weighted Magnetic Resonance Imaging scan of the abdomen",
        "A positron emission tomography scan of the head and neck",
    ):
        assert t1 in texts
    for text in target_prompts("CT", "liver tumor") + target_prompts("MRI", "spleen", "T2"):
        assert text in texts
    assert not any("background" in text for text in texts)
    # Scan kinds: CT, MRI, MRI T2, PET; regions: 2; classes: liver, liver tumor, spleen, GTV.
    assert len(texts) == 4 * 2 + 4 * 4 * 5


def test_catalog_covers_every_class_in_every_modality(specs):
    texts = set(prompts_for_config(CONFIG, datasets=specs))
    assert "A positron emission tomography scan of a liver tumor." in texts
    assert "A computed tomography scan of a gross tumor volume." in texts
    assert "A Magnetic Resonance Imaging scan of a spleen." in texts
    assert "A computed tomography scan of the head and neck" in texts


def test_without_paraphrases_only_the_canonical_t2_is_cached(specs):
    texts = prompts_for_config({"prompts": {"paraphrases": False}}, datasets=specs)
    assert len(texts) == 4 * 2 + 4 * 4
    assert not any(text.startswith(("There is", "Identification")) for text in texts)
    assert "A computed tomography scan of a liver tumor." in texts


def test_catalog_is_deterministic_and_ignores_dataset_order(specs):
    assert prompts_for_config(CONFIG, datasets=specs) == prompts_for_config(CONFIG, datasets=specs[::-1])


def test_catalog_reads_the_enabled_datasets_from_the_registry(monkeypatch, specs):
    seen = []

    def enabled_datasets(config):
        seen.append(config)
        return specs[:1]

    install_module(monkeypatch, "registry", enabled_datasets=enabled_datasets)
    texts = prompts_for_config(CONFIG)
    assert seen == [CONFIG]
    assert "A computed tomography scan of a liver tumor." in texts and not any("spleen" in t for t in texts)


def test_bad_modality_names_the_dataset():
    spec = FakeSpec("us_liver", "ultrasound", "abdomen", {1: "liver"})
    with pytest.raises(PromptError, match="us_liver.*ultrasound"):
        prompts_for_config(CONFIG, datasets=[spec])


def test_dataset_classes_skip_background_and_repeats():
    spec = FakeSpec("x", "CT", "abdomen", {"2": "kidney", 0: "background", "1": "liver", 3: "kidney", 4: "Background"})
    assert dataset_classes(spec) == ["liver", "kidney"]


def test_free_text_is_split_on_commas_and_semicolons():
    assert split_free_text("liver, hepatic tumour;spleen\n liver ") == ["liver", "hepatic tumour", "spleen"]
    assert split_free_text(["left  kidney", "spleen, liver"]) == ["left kidney", "spleen", "liver"]
    with pytest.raises(PromptError, match="no class"):
        split_free_text(" , ;")


def test_free_text_resolves_synonyms_and_keeps_unknown_words(monkeypatch, caplog):
    synonyms = {"liver": "liver", "hepatic tumour": "liver tumor"}
    install_module(monkeypatch, "taxonomy", canonical_name=lambda text: synonyms.get(text.strip().lower()),
                   did_you_mean=lambda text: " (did you mean: gallbladder?)")
    with caplog.at_level(logging.WARNING, logger="duplus.prompts.catalog"):
        resolved = resolve_free_text("liver, Hepatic Tumour, gallbladder polyp", "CT")
    assert [tuple(r) for r in resolved] == [
        ("liver", "liver", "A computed tomography scan of a liver."),
        ("Hepatic Tumour", "liver tumor", "A computed tomography scan of a liver tumor."),
        ("gallbladder polyp", None, "A computed tomography scan of a gallbladder polyp."),
    ]
    assert "'gallbladder polyp' is not a known class or synonym (did you mean: gallbladder?)" in caplog.text
    assert resolve_free_text(["spleen"], "MRI", "T2")[0].text == "A T2-weighted Magnetic Resonance Imaging scan of a spleen."


def test_free_text_with_the_real_taxonomy():
    from duplus.data.taxonomy import canonical_name

    assert canonical_name("hepatic tumour") == "liver tumor"
    resolved = resolve_free_text("liver, hepatic tumour", "CT")
    assert [r.canonical for r in resolved] == ["liver", "liver tumor"]
    assert resolved[1].text == "A computed tomography scan of a liver tumor."
