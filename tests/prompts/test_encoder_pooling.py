"""prompts.pooling auto: the model's own declared pooling (sentence-transformers files, CLIP's
projection), logged and part of the encoder's identity, so that a prompt cache follows it."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from duplus.errors import PromptError
from duplus.prompts.cache import build_prompt_cache
from duplus.prompts.encoder import DeclaredPooling, TextEncoder, declared_pooling, resolve_source

TEXTS = ["a computed tomography scan of the liver", "kidney", "a scan of the spleen and the liver"]
WORDS = ["a", "computed", "tomography", "scan", "of", "the", "liver", "kidney", "spleen", "and"]


def _sentence_bert(folder, modes: dict[str, bool], normalize: bool, extra_modules: tuple[str, ...] = ()):
    """A tiny random BERT saved by transformers, plus the sentence-transformers files that declare its pooling."""
    import transformers

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    modules += [{"idx": len(modules) + i, "name": str(len(modules) + i), "path": f"{len(modules) + i}_{t}",
                 "type": f"sentence_transformers.models.{t}"} for i, t in enumerate(extra_modules)]
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **modes}))
    return folder


CLS = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
       "pooling_mode_mean_sqrt_len_tokens": False}
MEAN = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}


def _hidden(folder):
    """Last hidden states and attention mask of TEXTS, straight from transformers."""
    import transformers

    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    tokens = transformers.BertTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).last_hidden_state, tokens["attention_mask"].unsqueeze(-1).float()


def test_a_cls_pooled_model_is_pooled_on_its_cls_token(tmp_path, caplog):
    folder = _sentence_bert(tmp_path / "cls_model", CLS, normalize=False)
    with caplog.at_level(logging.INFO, logger="duplus.prompts.encoder"):
        encoder = TextEncoder(str(folder), normalize=False)
    assert encoder.pooling == "cls" and not encoder.normalize
    assert "pooling cls" in caplog.text and "1_Pooling/config.json" in caplog.text
    hidden, _ = _hidden(folder)
    assert torch.allclose(encoder.encode(TEXTS), hidden[:, 0], atol=1e-5)


def test_a_mean_pooled_model_with_normalize_is_averaged_and_normalised(tmp_path, caplog):
    folder = _sentence_bert(tmp_path / "mean_model", MEAN, normalize=True)
    with caplog.at_level(logging.INFO, logger="duplus.prompts.encoder"):
        encoder = TextEncoder(str(folder), normalize=False)  # the model's own Normalize module still applies
    assert encoder.pooling == "mean" and encoder.normalize
    assert "with a Normalize module" in caplog.text
    hidden, mask = _hidden(folder)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(encoder.encode(TEXTS), torch.nn.functional.normalize(mean, dim=-1), atol=1e-5)


def test_max_and_concatenated_poolings_follow_sentence_transformers(tmp_path):
    folder = _sentence_bert(tmp_path / "cls_max", {**CLS, "pooling_mode_max_tokens": True}, normalize=False)
    encoder = TextEncoder(str(folder), normalize=False)
    assert encoder.pooling == "cls+max" and encoder.dim == 32  # concatenated, cls first
    hidden, mask = _hidden(folder)
    largest = hidden.masked_fill(mask == 0, -1e9).amax(1)
    assert torch.allclose(encoder.encode(TEXTS), torch.cat([hidden[:, 0], largest], dim=-1), atol=1e-5)


def test_the_pooling_used_is_part_of_the_identity_and_the_cache_follows_it(tmp_path, caplog):
    folder = _sentence_bert(tmp_path / "cls_model", CLS, normalize=True)
    auto, cls, mean = (TextEncoder(str(folder), pooling=p) for p in ("auto", "cls", "mean"))
    assert auto.identity == cls.identity  # the same embeddings: one cache serves both
    assert auto.identity != mean.identity
    assert "replaces the cls pooling the model declares" in caplog.text
    path = tmp_path / "prompts" / "bert.safetensors"
    first = build_prompt_cache(TEXTS, mean, path)
    with caplog.at_level(logging.INFO, logger="duplus.prompts.cache"):
        second = build_prompt_cache(TEXTS, auto, path)
    assert "re-encoding all" in caplog.text
    assert second.encoder_identity == auto.identity
    assert not torch.allclose(first.get(TEXTS[0]), second.get(TEXTS[0]))


def test_the_shipped_minilm_declares_mean_pooling_and_normalisation(minilm):
    declared = declared_pooling(resolve_source("minilm")[0])
    assert (declared.modes, declared.normalize) == (("mean",), True)
    assert declared.source.endswith("1_Pooling/config.json")
    assert minilm.pooling == "mean" and minilm.normalize


def test_a_plain_transformers_model_is_mean_pooled_and_says_why(tmp_path, caplog):
    folder = _sentence_bert(tmp_path / "plain", CLS, normalize=False)
    (folder / "modules.json").unlink()
    assert declared_pooling(str(folder)) is None
    with caplog.at_level(logging.INFO, logger="duplus.prompts.encoder"):
        assert TextEncoder(str(folder)).pooling == "mean"
    assert "no pooling declared" in caplog.text


def test_modules_it_cannot_run_are_refused_by_name_unless_a_pooling_is_chosen(tmp_path):
    folder = _sentence_bert(tmp_path / "dense", MEAN, normalize=True, extra_modules=("Dense",))
    with pytest.raises(PromptError, match=r"modules.json declares modules .*sentence_transformers.models.Dense"):
        TextEncoder(str(folder))
    weighted = _sentence_bert(tmp_path / "weighted", {**MEAN, "pooling_mode_weightedmean_tokens": True}, normalize=False)
    with pytest.raises(PromptError, match="pooling_mode_weightedmean_tokens"):
        TextEncoder(str(weighted))
    assert declared_pooling(str(tmp_path / "nowhere")) is None


def test_a_pooling_config_without_flags_takes_sentence_transformers_defaults(tmp_path):
    folder = _sentence_bert(tmp_path / "defaults", {}, normalize=False)
    assert declared_pooling(str(folder)) == DeclaredPooling(("mean",), False, str(folder / "1_Pooling/config.json"))


def test_a_clip_text_tower_uses_its_projection_and_says_so(tmp_path, tiny_clip, caplog):
    folder = tiny_clip(tmp_path / "clip_proj", projection=True)
    with caplog.at_level(logging.INFO, logger="duplus.prompts.encoder"):
        encoder = TextEncoder(str(folder))
    assert encoder.pooling == "pooler" and encoder.projected
    assert "through its text projection" in caplog.text
