"""T1 context and T2 target prompt strings: the paper's exact wording, sequences, hierarchy, errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prompt_helpers import install_module

from duplus.errors import PromptError
from duplus.prompts.templates import context_prompt, modality_phrase, target_prompt, target_prompts


def test_context_prompts_match_the_papers_strings():
    assert context_prompt("CT", "abdomen") == "A computed tomography scan of the abdomen"
    assert context_prompt("MRI", "abdomen", "T2") == "A T2-weighted Magnetic Resonance Imaging scan of the abdomen"
    assert context_prompt("PET", "head and neck") == "A positron emission tomography scan of the head and neck"


@pytest.mark.parametrize(
    ("modality", "sequence", "phrase"),
    [
        ("MRI", None, "Magnetic Resonance Imaging scan"),
        ("MR", "T2", "T2-weighted Magnetic Resonance Imaging scan"),
        ("mri", "t2w", "T2-weighted Magnetic Resonance Imaging scan"),
        ("MRI", "T1 in-phase", "T1-weighted in-phase Magnetic Resonance Imaging scan"),
        ("MRI", "T1_out-of-phase", "T1-weighted out-of-phase Magnetic Resonance Imaging scan"),
        ("MRI", "cine", "cine Magnetic Resonance Imaging scan"),
        ("ct", "T2", "computed tomography scan"),  # CT has no weighting; a sequence is not invented
        ("PET", None, "positron emission tomography scan"),
    ],
)
def test_modality_phrases(modality, sequence, phrase):
    assert modality_phrase(modality, sequence) == phrase


def test_target_paraphrases_are_the_papers_five_in_order():
    assert target_prompts("CT", "liver tumor") == [
        "A computed tomography scan of a liver tumor.",
        "There is liver tumor in this computed tomography scan.",
        "Liver tumor observed in computed tomography scan imaging.",
        "Computed tomography scan revealing a liver tumor.",
        "Identification of a liver tumor through computed tomography scan.",
    ]
    assert target_prompt("CT", "liver tumor") == "A computed tomography scan of a liver tumor."


def test_capitalization_keeps_the_sequence_name_intact():
    texts = target_prompts("MRI", "spleen", "T2")
    assert texts[3] == "T2-weighted Magnetic Resonance Imaging scan revealing a spleen."
    assert texts[0] == "A T2-weighted Magnetic Resonance Imaging scan of a spleen."


@settings(max_examples=40, deadline=None)
@given(
    name=st.text(alphabet=st.characters(categories=("Ll", "Nd"), max_codepoint=0x7F) | st.just(" "),
                 min_size=1, max_size=20).filter(str.strip),
    modality=st.sampled_from(["CT", "MRI", "PET"]),
)
def test_paraphrases_are_five_distinct_deterministic_texts(name, modality):
    texts = target_prompts(modality, name)
    assert len(texts) == len(set(texts)) == 5
    assert texts == target_prompts(modality, name)
    clean = " ".join(name.split())
    assert all(clean in text or clean[0].upper() + clean[1:] in text for text in texts)
    assert all(text.endswith(".") and text[0] == text[0].upper() for text in texts)


def test_hierarchical_prompt_names_the_anatomy():
    texts = target_prompts("CT", "liver tumor", hierarchical=True, parents=["liver", "abdomen"])
    assert texts[0] == "A computed tomography scan of a liver tumor in the liver of the abdomen."
    assert texts[1] == "There is liver tumor in the liver of the abdomen in this computed tomography scan."
    assert target_prompts("CT", "liver", hierarchical=True, parents=["abdomen"])[0] == (
        "A computed tomography scan of a liver in the abdomen."
    )
    # No known parents: the plain prompt, not a dangling "in the".
    assert target_prompts("CT", "liver", hierarchical=True, parents=[]) == target_prompts("CT", "liver")


def test_hierarchical_prompt_reads_parents_and_region_from_the_taxonomy(monkeypatch):
    chains = {"liver tumor": ["liver"], "liver": []}  # nearest first, regions kept apart

    def parents(name):
        if name not in chains:
            raise KeyError(name)
        return chains[name]

    install_module(monkeypatch, "taxonomy", parents=parents, region_of=lambda name: "abdomen")
    assert target_prompts("CT", "liver tumor", hierarchical=True)[0] == (
        "A computed tomography scan of a liver tumor in the liver of the abdomen."
    )
    assert target_prompts("CT", "liver", hierarchical=True)[0] == "A computed tomography scan of a liver in the abdomen."
    assert target_prompts("CT", "unknown thing", hierarchical=True)[0] == "A computed tomography scan of a unknown thing."


def test_hierarchical_prompt_with_the_real_taxonomy():
    from duplus.data.taxonomy import parents, region_of

    assert parents("liver tumor") == ["liver"] and region_of("liver tumor") == "abdomen"
    assert target_prompts("CT", "liver tumor", hierarchical=True)[0] == (
        "A computed tomography scan of a liver tumor in the liver of the abdomen."
    )


@pytest.mark.parametrize("modality", ["ultrasound", "", "X-ray"])
def test_unknown_modality_is_named_in_the_error(modality):
    with pytest.raises(PromptError, match=repr(modality)):
        context_prompt(modality, "abdomen")
    with pytest.raises(PromptError, match="CT, MRI, PET"):
        target_prompts(modality, "liver")


def test_empty_class_or_region_is_refused():
    with pytest.raises(PromptError, match="class name"):
        target_prompts("CT", "  ")
    with pytest.raises(PromptError, match="region"):
        context_prompt("CT", "")
