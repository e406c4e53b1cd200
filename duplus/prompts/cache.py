"""Prompt cache: one embedding per prompt text in a safetensors file plus a JSON manifest beside it.

Built once per run by the cache_prompts stage; training and inference only look texts up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from duplus.atomic import locked_beside, write_bytes, write_json
from duplus.errors import PromptError
from duplus.hashing import sha256_text
from duplus.settings import Settings

log = logging.getLogger(__name__)

FORMAT = "duplus-prompt-cache/1"
_RERUN = "rerun the cache_prompts stage (snakemake --forcerun cache_prompts)"


class Encoder(Protocol):
    """What the cache needs from a text encoder (``duplus.prompts.encoder.TextEncoder`` fits)."""

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor: ...


def same_encoder(a: str | None, b: str | None) -> bool:
    """Whether two encoder identities (``"<name>@<hash>"``) name the same weights.

    Only the hash counts: the same model files in another folder (another name) give the same
    embeddings, and their caches must stay interchangeable.
    """
    if not a or not b:
        return a == b
    return a.rpartition("@")[2] == b.rpartition("@")[2] if "@" in a and "@" in b else a == b

def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest beside a cache: ``results/prompts/minilm.safetensors`` -> ``minilm.json``."""
    return Path(path).with_suffix(".json")


class PromptCache:
    """Embeddings of prompt texts made by one text encoder; read-only once built."""

    def __init__(self, vectors: dict[str, torch.Tensor], encoder_identity: str, dim: int,
                 path: str | os.PathLike | None = None) -> None:
        self._vectors = {text: vector.detach().to(torch.float32).reshape(-1) for text, vector in vectors.items()}
        self.encoder_identity = encoder_identity
        self.dim = int(dim)
        self.path = Path(path) if path is not None else None
        for text, vector in self._vectors.items():
            if vector.numel() != self.dim:
                raise PromptError(f"prompt {text!r} has {vector.numel()} values, not the cache's {self.dim} ({self._where()})")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptCache":
        """Read and validate a cache and its manifest; ``PromptError`` naming the file otherwise."""
        path = Path(path)
        if not path.is_file():
            raise PromptError(f"prompt cache {path} does not exist; run the cache_prompts stage (snakemake {path})")
        cache, digest = _read_tensors(path)
        _check_manifest(path, cache, digest)
        return cache

    @property
    def texts(self) -> list[str]:
        """Every cached text, sorted."""
        return sorted(self._vectors)

    def __contains__(self, text: object) -> bool:
        return text in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def __repr__(self) -> str:
        return f"PromptCache({self._where()}, {len(self)} texts, dim={self.dim}, encoder={self.encoder_identity})"

    def get(self, text: str) -> torch.Tensor:
        """The embedding of ``text`` (Tensor[D]); a miss raises ``PromptError`` naming the text."""
        try:
            return self._vectors[text].clone()
        except KeyError:
            raise PromptError(
                f"prompt {text!r} is not in the prompt cache {self._where()} (encoder {self.encoder_identity}); "
                f"{_RERUN} after changing datasets or templates, or add free-text prompts with ensure_prompts"
            ) from None

    def get_many(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``texts`` stacked in order (Tensor[N, D])."""
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.get(text) for text in texts])

    def vectors(self) -> dict[str, torch.Tensor]:
        """A copy of the {text: embedding} mapping."""
        return {text: vector.clone() for text, vector in self._vectors.items()}

    def _where(self) -> str:
        return str(self.path) if self.path else "<in memory>"


def _read_tensors(path: Path) -> tuple[PromptCache, str]:
    """The cache the tensors file describes by itself (its metadata lists every text) and its sha256.

    The file is read once and hashed and parsed from those bytes: opening it twice would let a
    concurrent rewrite slip between the hash and the tensors, so that a manifest could vouch for
    tensors it never saw.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as parse

    try:
        payload = path.read_bytes()
    except OSError as error:
        raise PromptError(f"prompt cache {path} cannot be read ({error}); {_RERUN}") from None
    digest = hashlib.sha256(payload).hexdigest()
    try:
        meta = _safetensors_metadata(payload)
        tensors = parse(payload)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise PromptError(f"prompt cache {path} is corrupt or truncated ({error}); {_RERUN}") from None
    if meta.get("format") != FORMAT:
        raise PromptError(f"{path} is not a prompt cache (format {meta.get('format')!r}, expected {FORMAT!r}); {_RERUN}")
    try:
        keys = json.loads(meta["texts"])
        dim = int(meta["dim"])
        identity = meta["encoder_identity"]
    except (KeyError, ValueError) as error:
        raise PromptError(f"prompt cache {path} has damaged metadata ({error}); {_RERUN}") from None
    bad = [text for text, key in keys.items() if key != sha256_text(text)]
    missing = [text for text, key in keys.items() if key not in tensors]
    extra = set(tensors) - set(keys.values())
    if bad or missing or extra:
        raise PromptError(
            f"prompt cache {path} is inconsistent: {len(bad)} wrong keys, {len(missing)} texts without a tensor "
            f"(e.g. {missing[:1]}), {len(extra)} unlisted tensors; {_RERUN}"
        )
    return PromptCache({text: tensors[key] for text, key in keys.items()}, identity, dim, path), digest


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    if len(payload) < 8:
        raise ValueError(f"{len(payload)} bytes, shorter than a safetensors header")
    size = int.from_bytes(payload[:8], "little")
    if size > len(payload) - 8:
        raise ValueError(f"header of {size} bytes in a file of {len(payload)}")
    header = json.loads(payload[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not a JSON object")
    return meta


def _check_manifest(path: Path, cache: PromptCache, digest: str) -> None:
    problem = _manifest_problem(path, cache, digest)
    if problem is not None:
        raise PromptError(f"{problem}; {_RERUN}")


def _manifest_problem(path: Path, cache: PromptCache, digest: str) -> str | None:
    """Why the manifest beside ``path`` does not vouch for its tensors (hashed to ``digest``), or None."""
    manifest_file = manifest_path(path)
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"prompt cache manifest {manifest_file} is missing (it belongs beside {path})"
    except (OSError, ValueError) as error:
        return f"prompt cache manifest {manifest_file} is unreadable ({error})"
    if not isinstance(manifest, dict):
        return f"prompt cache manifest {manifest_file} is not a JSON object"
    differences = _manifest_differences(manifest, cache, digest)
    if differences:
        return (f"prompt cache manifest {manifest_file} and tensors {path} disagree ({'; '.join(differences)}): "
                "an interrupted or concurrent write?")
    return None


def _manifest_differences(manifest: dict[str, Any], cache: PromptCache, digest: str) -> list[str]:
    """What the manifest says that the tensors file (hashed to ``digest``) does not, one phrase each."""
    differences = []
    recorded = str(manifest.get("tensors_sha256"))
    if recorded != digest:
        differences.append(f"tensors sha256 {digest[:12]}, manifest {recorded[:12]}")
    if manifest.get("encoder_identity") != cache.encoder_identity:
        differences.append(f"encoder {cache.encoder_identity} in the tensors, {manifest.get('encoder_identity')} in the manifest")
    if manifest.get("dim") != cache.dim:
        differences.append(f"dim {cache.dim} in the tensors, {manifest.get('dim')} in the manifest")
    listed, held = set(manifest.get("texts") or {}), set(cache.texts)
    if listed != held:
        differences.append(f"{len(held - listed)} texts only in the tensors, {len(listed - held)} only in the manifest")
    return differences


def _read_existing(path: Path) -> tuple[PromptCache | None, str | None]:
    """For rebuilding: (cache or None, why its manifest disagrees or None). A damaged old cache is only a warning here."""
    if not path.is_file():
        return None, None
    try:
        cache, digest = _read_tensors(path)
    except PromptError as error:
        log.warning("ignoring the existing prompt cache: %s", error)
        return None, None
    return cache, _manifest_problem(path, cache, digest)


def _write(path: Path, vectors: dict[str, torch.Tensor], identity: str, dim: int) -> PromptCache:
    """Write tensors, then the manifest, each atomically; the manifest records the tensors' sha256.

    A reader that meets a new tensors file beside an old manifest (a writer stopped between the two
    renames) gets a clear ``PromptError`` from the sha256 check, never a wrong embedding.
    """
    from duplus.tensorfile import tensor_bytes

    keys = {text: sha256_text(text) for text in sorted(vectors)}
    tensors = {keys[text]: vectors[text].detach().to(torch.float32).reshape(-1) for text in keys}
    meta = {"format": FORMAT, "encoder_identity": identity, "dim": str(dim), "texts": json.dumps(keys, sort_keys=True)}
    payload = tensor_bytes(tensors, meta)
    digest = hashlib.sha256(payload).hexdigest()
    write_bytes(path, payload)
    write_json(manifest_path(path), {
        "format": FORMAT,
        "encoder_identity": identity,
        "dim": int(dim),
        "count": len(keys),
        "texts": keys,
        "tensors_file": path.name,
        "tensors_sha256": digest,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return PromptCache(vectors, identity, dim, path)


def _unique_texts(texts: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(texts))
    for text in unique:
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"cannot cache prompt {text!r}: prompts must be non-empty strings")
    return sorted(unique)


def build_prompt_cache(texts: Iterable[str], encoder: Encoder, path: str | os.PathLike,
                       batch_size: int = 64, prune: bool = True) -> PromptCache:
    """Make ``path`` hold exactly ``texts`` embedded by ``encoder``, encoding only what is new.

    Entries of an existing cache made by the same encoder identity are reused; a different
    identity (other weights, tokenizer or pooling) invalidates every entry. All missing texts are
    encoded in one batched ``encoder.encode`` call. With ``prune`` (default) texts no longer asked
    for are dropped, so the cache mirrors the current templates and datasets. Nothing is written
    when nothing changed.
    """
    path = Path(path)
    wanted = _unique_texts(texts)
    identity, dim = encoder.identity, int(encoder.dim)
    with locked_beside(path):
        existing, disagreement = _read_existing(path)
        if disagreement is not None:
            # The tensors file is complete and describes itself (texts, encoder, dim); the manifest
            # written after it is what a stopped writer leaves stale, and it is rewritten below.
            log.warning("%s; the tensors are complete and will be kept", disagreement)
        reused: dict[str, torch.Tensor] = {}
        if existing is not None and not same_encoder(existing.encoder_identity, identity):
            log.info("prompt cache %s was made by %s; re-encoding all for %s", path, existing.encoder_identity, identity)
        elif existing is not None:
            reused = existing.vectors()
        missing = [text for text in wanted if text not in reused]
        if not prune:
            wanted = sorted(set(wanted) | set(reused))
        if existing is not None and disagreement is None and not missing and set(reused) == set(wanted):
            log.info("prompt cache %s is up to date (%d texts, %s)", path, len(wanted), identity)
            return existing
        vectors = {text: reused[text] for text in wanted if text in reused}
        if missing:
            encoded = encoder.encode(missing, batch_size=batch_size)
            vectors.update({text: encoded[i] for i, text in enumerate(missing)})
        cache = _write(path, vectors, identity, dim)
    log.info("prompt cache %s: %d texts (%d encoded, %d reused) with %s, dim %d",
             path, len(cache), len(missing), len(cache) - len(missing), identity, dim)
    return cache


def ensure_prompts(cache_path: str | os.PathLike, texts: Iterable[str],
                   encoder: Encoder | Callable[[], Encoder], batch_size: int = 64,
                   persist: bool = True) -> PromptCache:
    """The cache at ``cache_path`` with ``texts`` added (for free-text prompts at inference).

    ``encoder`` may be a factory so that the model loads only when a text is actually missing.
    Missing texts are encoded and, with ``persist``, added atomically; the cache's encoder identity
    must match, because a model is trained against one embedding space. Without ``persist`` (or if
    the cache's folder is read-only) the new embeddings are kept in memory for this run only.

    A cache whose manifest disagrees with its tensors is never used as it is: with a warning that
    names the file and what differs, all its texts are encoded again (and, with ``persist``, the
    file is rebuilt).
    """
    path = Path(cache_path)
    wanted = _unique_texts(texts)
    with locked_beside(path) if persist else contextlib.nullcontext():
        existing, disagreement = _read_existing(path)
        if disagreement is not None:
            # Which of the two files is stale cannot be told here: only the texts are taken from it.
            present: dict[str, torch.Tensor] = {}
            missing = sorted(set(existing.texts) | set(wanted))
        else:
            present = existing.vectors() if existing is not None else {}
            missing = [text for text in wanted if text not in present]
            if not missing and existing is not None:
                return existing
        resolved = encoder if hasattr(encoder, "encode") else encoder()
        if existing is not None and not same_encoder(existing.encoder_identity, resolved.identity):
            raise PromptError(_other_encoder(path, existing.encoder_identity, resolved.identity, missing, disagreement))
        if disagreement is not None:
            log.warning("%s; encoding its %d texts again with %s%s", disagreement, len(missing), resolved.identity,
                        "" if persist else " for this run only (the file is left as it is)")
        if missing:
            encoded = resolved.encode(missing, batch_size=batch_size)
            present.update({text: encoded[i] for i, text in enumerate(missing)})
        if not persist:
            log.info("encoded %d prompts missing from %s for this run", len(missing), path)
            return PromptCache(present, resolved.identity, int(resolved.dim), path)
        try:
            cache = _write(path, present, resolved.identity, int(resolved.dim))
        except OSError as error:
            log.warning("cannot add %d prompts to %s (%s); using them for this run only", len(missing), path, error)
            cache = PromptCache(present, resolved.identity, int(resolved.dim), path)
    log.info("%s %d prompts to %s", "rebuilt with" if disagreement else "added", len(missing), path)
    return cache


def _other_encoder(path: Path, made_by: str, here: str, missing: list[str], disagreement: str | None) -> str:
    """Why a cache made by encoder ``made_by`` cannot be completed (or rebuilt) with the encoder ``here``."""
    same_name = str(made_by or "").rpartition("@")[0] == here.rpartition("@")[0]
    why = ("the same encoder with other weights or settings (pooling, normalize, max_length, or a "
           "duplus version that reads them differently)" if same_name else "another encoder")
    start = (f"prompt cache {path} was made by {made_by} but the text encoder here is {here}: {why}, whose "
             "embeddings the model was not trained on; ")
    if disagreement is not None:
        return (f"{start}the cache cannot be used as it is ({disagreement}) nor encoded again with this encoder: "
                f"use the prompts settings and weights the model was trained with, or {_RERUN}")
    return (f"{start}the prompts {', '.join(repr(t) for t in missing[:3])}{' ...' if len(missing) > 3 else ''} are "
            "not in the cache. Use the prompts settings and weights the model was trained with, or only prompts the "
            "cache holds")


def run_cache_prompts(config: dict[str, Any], out_cache: str | os.PathLike, threads: int | None = None) -> PromptCache:
    """Stage cache_prompts: encode every T1/T2 text of the run into ``out_cache`` (+ manifest)."""
    from duplus.prompts.catalog import prompts_for_config
    from duplus.prompts.encoder import encoder_from_config
    from duplus.runtime import resolve_device, set_threads

    set_threads(threads)
    started = time.perf_counter()
    settings = Settings.of(config)
    texts = prompts_for_config(config)  # before loading the model: a config mistake fails fast
    encoder = encoder_from_config(config, device=resolve_device(settings.device))
    cache = build_prompt_cache(texts, encoder, out_cache, batch_size=settings.prompts.batch_size)
    log.info("cache_prompts: %d texts, encoder %s (dim %d), %.1f s", len(cache), encoder.identity, encoder.dim,
             time.perf_counter() - started)
    return cache
