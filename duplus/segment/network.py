"""The network and prompt embeddings of `duplus segment`: loaded once and kept across scans and calls,
the embeddings checked against the text encoder the network was trained with."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

from duplus.errors import ModelError

# Loaded networks, so that many scans, or many calls of `segment_images`, load a model once. One entry:
# a notebook that switches models does not keep the old one in memory.
_NETWORKS: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}


def load_network_and_prompts(request: Any) -> tuple[Any, dict[str, Any], Any]:
    """(model, its sidecar, prompt embeddings) of a :class:`~duplus.segment.request.Request`; a cached network
    is reused, prompts the cache lacks are encoded for this run."""
    with warnings.catch_warnings():
        # torch 2.4 and 2.5 warn (FutureWarning) at every torch.load that does not name weights_only, as text
        # encoders' .bin weights are loaded; nothing a user of `duplus segment` can act on. (Our own weights
        # are read with weights_only=True, see duplus.model.model_files.)
        warnings.filterwarnings("ignore", message=r".*weights_only.*", category=FutureWarning)
        model, sidecar = _cached_network(request.weights, request.sha256, request.adapter, request.device)
        cache = prompt_embeddings(request.prompt_cache, [request.context_text] + request.texts, request.config,
                                  request.device)
    check_encoder(cache, sidecar, request.prompt_cache, request.weights)
    return model, sidecar, cache


def prompt_embeddings(cache_path: str, texts: list[str], config: Mapping[str, Any], device: Any) -> Any:
    """Embeddings of ``texts``: from the cache, missing ones encoded for this run (the text model
    loads only then). The cache is never written: it is an input of every pipeline stage, and a
    changed file would make Snakemake rerun them all."""
    from duplus.prompts.cache import ensure_prompts
    from duplus.prompts.encoder import encoder_from_config

    return ensure_prompts(cache_path, texts, lambda: encoder_from_config(dict(config), device=device), persist=False)


def _load_network(weights: str, sha256: str | None, adapter: str | None, device: Any) -> tuple[Any, dict[str, Any]]:
    from duplus.model import load_model

    model, sidecar = load_model(weights, expected_sha256=sha256, device=device)
    if adapter:
        if not Path(adapter).exists():
            raise ModelError(f"{adapter}: adapter folder not found")
        from duplus.model.adapters import load_adapter  # peft loads only when an adapter is asked for

        folder = Path(adapter)
        # Accept the center's results folder (results/lora/<center>) as well as its adapter/ inside.
        if (folder / "adapter").is_dir():
            folder = folder / "adapter"
        load_adapter(model, folder, sidecar["sha256"])
        model = model.to(device).eval()
    return model, sidecar


def _network_key(weights: str, sha256: str | None, adapter: str | None, device: Any) -> tuple[Any, ...]:
    def stamp(path: str | None) -> Any:
        # Size and mtime: a file replaced under the same name (a new training run) is loaded afresh.
        return (str(Path(path).resolve()), Path(path).stat().st_size, Path(path).stat().st_mtime_ns) \
            if path and Path(path).is_file() else (path,)

    return stamp(weights), (sha256 or "").strip().lower(), stamp(adapter), str(device)


def _cached_network(weights: str, sha256: str | None, adapter: str | None, device: Any) -> tuple[Any, dict[str, Any]]:
    key = _network_key(weights, sha256, adapter, device)
    if key not in _NETWORKS:
        network = _load_network(weights, sha256, adapter, device)
        _NETWORKS.clear()
        _NETWORKS[key] = network
    return _NETWORKS[key]


def check_encoder(cache: Any, sidecar: Mapping[str, Any], cache_path: str, weights: str) -> None:
    """The prompt embeddings must come from the text encoder the model was trained with."""
    if int(cache.dim) != int(sidecar["text_dim"]):
        raise ModelError(f"{cache_path}: embeddings have dim {cache.dim}, but {weights} expects {sidecar['text_dim']}")
    trained = sidecar.get("text_encoder")
    identity = getattr(cache, "encoder_identity", None)
    from duplus.prompts.cache import same_encoder

    if isinstance(trained, str) and trained and identity and not same_encoder(identity, trained):
        raise ModelError(
            f"{cache_path}: embeddings come from encoder {identity}, but {weights} was trained with {trained}"
        )


def adapter_hash(adapter: str | None) -> str | None:
    """sha256 of an adapter folder's files, None without one."""
    from duplus.hashing import sha256_tree

    return sha256_tree(adapter) if adapter and Path(adapter).is_dir() else None
