"""Untrusted files: weights, checkpoints, adapters, YAML and archives never run code or escape.

Expectation "no-code-on-load": loading a model, training checkpoint, LoRA adapter or text encoder
from a file crafted to run code when unpickled runs nothing (a marker file the payload would
create never appears) and is refused with a ``DuplusError`` naming the file.

Expectation "safe-deserialisers-only": no library code calls ``yaml.load`` without a safe loader,
``torch.load`` without ``weights_only=True``, ``pickle``/``marshal``/``dill``/``joblib`` loaders, or
``np.load(..., allow_pickle=True)`` (an AST scan of duplus/, workflow_scripts/, Snakefile, rules/).

Expectation "archive-confinement": ``safe_extract`` refuses path traversal, absolute names,
symlinks and hard links escaping the target, device/fifo members and contents beyond the size
limit, before writing anything outside the target (tests/data has the exhaustive cases; this is
the summary table).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from reliability_helpers import ROOT

from duplus.errors import DuplusError, UnsafeArchiveError


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def evil_bytes(marker: Path, torch_format: bool) -> bytes:
    """A "checkpoint" whose unpickling runs code: torch's zip format or a bare pickle."""
    if torch_format:
        buffer = io.BytesIO()
        torch.save({"weight": Payload(marker)}, buffer)
        return buffer.getvalue()
    return pickle.dumps({"weight": Payload(marker)})


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "CODE_RAN"
    yield path
    assert not path.exists(), "a loader executed code embedded in an untrusted file"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from duplus.model import DuPLUS, ModelConfig, save_model

    folder = tmp_path_factory.mktemp("model")
    cfg = ModelConfig(channels=(4, 8), blocks_per_stage=1, text_dim=8, embed_dim=8, head_channels=4)
    torch.manual_seed(0)
    save_model(DuPLUS(cfg), folder / "model.safetensors", meta={"steps": 1})
    return folder / "model.safetensors"


def _with_sidecar(saved: Path, weights: Path, payload: bytes) -> None:
    """``payload`` as weights with a sidecar that vouches for it (hash matches): only the loader's
    refusal to unpickle stands between the file and code execution."""
    weights.write_bytes(payload)
    sidecar = json.loads(saved.with_suffix(".json").read_text(encoding="utf-8"))
    sidecar.update(weights=weights.name, sha256=hashlib.sha256(payload).hexdigest(), bytes=len(payload))
    weights.with_suffix(".json").write_text(json.dumps(sidecar))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".safetensors"])
@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "bare-pickle"])
def test_load_model_refuses_code_running_pickles(suffix: str, torch_format: bool, saved_model: Path,
                                                 marker: Path, tmp_path: Path) -> None:
    from duplus.errors import CheckpointError
    from duplus.model.model_files import load_model

    weights = tmp_path / f"model{suffix}"
    _with_sidecar(saved_model, weights, evil_bytes(marker, torch_format))
    with pytest.raises(CheckpointError, match=str(weights.name)):
        load_model(weights)


def test_load_model_accepts_the_genuine_file(saved_model: Path) -> None:
    from duplus.model.model_files import load_model

    model, sidecar = load_model(saved_model)
    assert sidecar["steps"] == 1 and sum(p.numel() for p in model.parameters()) > 0


def _tampered_checkpoint(folder: Path, payload: bytes) -> None:
    """A checkpoint whose tensors file is ``payload`` and whose record's hash vouches for it."""
    from duplus.train.checkpoint import checkpoint_paths, save_checkpoint

    save_checkpoint(folder, 1, {"w": torch.ones(3)})
    save_checkpoint(folder, 2, {"w": torch.full((3,), 2.0)})
    tensors, record = checkpoint_paths(folder, 2)
    tensors.write_bytes(payload)
    data = json.loads(record.read_text(encoding="utf-8"))
    data["files"][tensors.name] = hashlib.sha256(payload).hexdigest()  # a duplus.journal record
    record.write_text(json.dumps(data))


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "bare-pickle"])
def test_checkpoint_loading_never_unpickles(torch_format: bool, marker: Path, tmp_path: Path) -> None:
    """No code runs, whatever the loader then says about the file."""
    from duplus.train.checkpoint import load_checkpoint, load_latest_checkpoint

    _tampered_checkpoint(tmp_path, evil_bytes(marker, torch_format))
    for load in (lambda: load_checkpoint(tmp_path, 2), lambda: load_latest_checkpoint(tmp_path)):
        try:
            load()
        except Exception:  # noqa: BLE001 - the refusal's type is the next test's subject
            pass


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "bare-pickle"])
def test_checkpoint_with_foreign_tensors_file_is_refused_cleanly(torch_format: bool, marker: Path,
                                                                 tmp_path: Path) -> None:
    """A checkpoint whose tensors are not safetensors is a CheckpointError, and resuming skips it
    for the previous complete checkpoint, as load_latest_checkpoint documents."""
    from duplus.errors import CheckpointError
    from duplus.train.checkpoint import load_checkpoint, load_latest_checkpoint

    _tampered_checkpoint(tmp_path, evil_bytes(marker, torch_format))
    with pytest.raises(CheckpointError, match="step_00000002"):
        load_checkpoint(tmp_path, 2)
    latest = load_latest_checkpoint(tmp_path)
    assert latest is not None and latest[0] == 1


@pytest.mark.parametrize("layout", ["pickle-as-safetensors", "pickle-bin-only"])
def test_adapter_loading_refuses_pickles(layout: str, saved_model: Path, marker: Path, tmp_path: Path) -> None:
    from duplus.model.adapters import load_adapter
    from duplus.model.model_files import load_model

    folder = tmp_path / "adapter"
    folder.mkdir()
    payload = evil_bytes(marker, torch_format=True)
    name = "adapter_model.safetensors" if layout == "pickle-as-safetensors" else "adapter_model.bin"
    (folder / name).write_bytes(payload)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["x"]}))
    model, sidecar = load_model(saved_model)
    with pytest.raises(DuplusError, match="adapter"):
        load_adapter(model, folder, sidecar["sha256"])


def _encoder_folder_with_pickled_weights(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
        "max_position_embeddings": 32}))
    (folder / "pytorch_model.bin").write_bytes(evil_bytes(marker, torch_format=True))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "scan"]) + "\n")
    return folder


def test_text_encoder_folder_with_pickled_weights_runs_no_code(marker: Path, tmp_path: Path) -> None:
    """``prompts.source`` may name a local folder; a pickled weights file in it must not run code."""
    from duplus.prompts.encoder import TextEncoder

    folder = _encoder_folder_with_pickled_weights(tmp_path / "encoder", marker)
    with pytest.raises(Exception):  # noqa: B017 - any refusal; its type is the next test's subject
        TextEncoder(str(folder))


def test_text_encoder_folder_with_pickled_weights_is_a_prompt_error(marker: Path, tmp_path: Path) -> None:
    """The refusal is a ``PromptError`` naming the folder, like every other unusable encoder folder."""
    from duplus.errors import PromptError
    from duplus.prompts.encoder import TextEncoder

    folder = _encoder_folder_with_pickled_weights(tmp_path / "encoder", marker)
    with pytest.raises(PromptError, match="encoder"):
        TextEncoder(str(folder))


# --- static audit ---------------------------------------------------------------------------------

UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"), ("cPickle", "loads"),
    ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"),
    ("shelve", "open"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "unsafe_load_all"),
    ("yaml", "full_load_all"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def audit_source(source: str, filename: str = "<string>") -> list[str]:
    """Unsafe deserialisation calls in ``source``: ``file:line: what``."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "cPickle", "dill", "marshal", "joblib"}:
            problems.append(f"{filename}:{node.lineno}: imports from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.split("."))
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}: {name}("
        if parts[-2:] in UNSAFE_CALLS:
            problems.append(f"{where} deserialises arbitrary objects")
        if parts[-2:] == ("yaml", "load") or parts[-2:] == ("yaml", "load_all"):
            loader = keywords.get("Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or not _dotted(loader).endswith(SAFE_YAML_LOADERS):
                problems.append(f"{where} without a safe Loader (use yaml.safe_load)")
        if parts[-2:] == ("torch", "load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where} without weights_only=True")
        if parts[-2:] in {("np", "load"), ("numpy", "load")}:
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{where} with allow_pickle enabled")
    return problems


def _audited_sources() -> list[tuple[str, str]]:
    files = sorted((ROOT / "duplus").rglob("*.py")) + sorted((ROOT / "workflow_scripts").glob("*.py"))
    sources = [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in files]
    # Snakefiles are Python with rule blocks: audit their plain-Python lines (imports, functions).
    for path in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        text = path.read_text(encoding="utf-8")
        for needle in ("yaml.load(", "torch.load(", "pickle.load", "allow_pickle=True"):
            assert needle not in text or "SafeLoader" in text, f"{path.name}: {needle}"
    return sources


def test_library_uses_only_safe_deserialisers() -> None:
    problems = [p for name, source in _audited_sources() for p in audit_source(source, name)]
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet", [
    "import yaml\nyaml.load(open('c.yaml'))",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.full_load(text)",
    "import torch\ntorch.load('m.pt')",
    "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=False)",
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle\npickle.loads(data)",
    "from pickle import loads\nloads(data)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('f')",
])
def test_audit_flags_unsafe_calls(snippet: str) -> None:
    """Meta-test: the audit is not vacuous; each of these would be reported."""
    assert audit_source(snippet)


@pytest.mark.parametrize("snippet", [
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=False)",
])
def test_audit_accepts_safe_calls(snippet: str) -> None:
    assert not audit_source(snippet)


# --- archives --------------------------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def _zip(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            bundle.writestr(info, data)
    return path


ARCHIVES: dict[str, tuple[Callable[[Path], Path], int]] = {
    "tar-parent-traversal": (lambda d: _tar(d / "a.tar.gz", [(_info("../escape.txt"), b"x")]), 1 << 30),
    "tar-nested-traversal": (lambda d: _tar(d / "a.tar.gz", [(_info("data/../../escape.txt"), b"x")]), 1 << 30),
    "tar-absolute-path": (lambda d: _tar(d / "a.tar.gz", [(_info(str(d / "escape.txt")), b"x")]), 1 << 30),
    "tar-symlink-escape": (lambda d: _tar(d / "a.tar.gz", [(_info("link", tarfile.SYMTYPE, "../../etc"), None),
                                                           (_info("link/escape.txt"), b"x")]), 1 << 30),
    "tar-absolute-symlink": (lambda d: _tar(d / "a.tar.gz", [(_info("link", tarfile.SYMTYPE, "/etc/passwd"), None)]),
                             1 << 30),
    "tar-hardlink-escape": (lambda d: _tar(d / "a.tar.gz", [(_info("hl", tarfile.LNKTYPE, "../../escape.txt"), None)]),
                            1 << 30),
    "tar-char-device": (lambda d: _tar(d / "a.tar.gz", [(_info("null", tarfile.CHRTYPE), None)]), 1 << 30),
    "tar-fifo": (lambda d: _tar(d / "a.tar.gz", [(_info("pipe", tarfile.FIFOTYPE), None)]), 1 << 30),
    "tar-beyond-size-limit": (lambda d: _tar(d / "a.tar.gz", [(_info("big.bin"), b"\0" * 200_000)]), 100_000),
    "zip-parent-traversal": (lambda d: _zip(d / "a.zip", [("../escape.txt", b"x", None)]), 1 << 30),
    "zip-absolute-path": (lambda d: _zip(d / "a.zip", [(str(d / "escape.txt"), b"x", None)]), 1 << 30),
    "zip-symlink": (lambda d: _zip(d / "a.zip", [("link", b"../../etc", 0o120777)]), 1 << 30),
    "zip-bomb": (lambda d: _zip(d / "a.zip", [("bomb.bin", b"\0" * 2_000_000, None)]), 100_000),
}


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_unsafe_archive_is_refused_and_nothing_escapes(case: str, tmp_path: Path) -> None:
    from duplus.data.archive import safe_extract

    build, limit = ARCHIVES[case]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    archive = build(work)
    target = work / "out"
    before = sorted(p for p in tmp_path.rglob("*") if p != archive)
    with pytest.raises(UnsafeArchiveError, match=archive.name):
        safe_extract(archive, target, max_bytes=limit)
    after = sorted(p for p in tmp_path.rglob("*") if p != archive and not str(p).startswith(str(target)))
    assert after == before, f"something was written outside {target}: {set(after) - set(before)}"
    assert not (tmp_path / "escape.txt").exists() and not (work / "escape.txt").exists()


def test_benign_archive_extracts(tmp_path: Path) -> None:
    """The refusals above are not a blanket refusal: a plain archive with an inner link extracts."""
    from duplus.data.archive import safe_extract

    archive = _tar(tmp_path / "ok.tar.gz", [(_info("data", tarfile.DIRTYPE), None), (_info("data/a.txt"), b"hello"),
                                            (_info("data/alias", tarfile.SYMTYPE, "a.txt"), None)])
    written = safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "data" / "a.txt").read_bytes() == b"hello" and "data/a.txt" in written
    shutil.rmtree(tmp_path / "out")
