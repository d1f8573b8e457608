"""The policy's weights as files: what each version publishes (``weights_bytes``,
``write_weights``: tied tensors once, the same weights always the same bytes) and a safetensors
writer that holds nothing larger than one tensor (``write_safetensors``)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import torch
from safetensors.torch import save_file

_DTYPES = {
    torch.float64: "F64",
    torch.int64: "I64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> str:
    """Write ``tensors`` as a safetensors file one tensor at a time, straight from their memory
    (nothing but the header is built: no copy of the whole as bytes, whichever safetensors
    version is installed); returns the sha256 of what was written. Tensors are laid out by
    element size, then name (each aligned to its element size)."""
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot write {name} of dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in (struct.pack("<Q", len(head)), head):
            f.write(piece)
            digest.update(piece)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            # the tensor's own bytes, not a copy
            view = memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]
            f.write(view)
            digest.update(view)
    return digest.hexdigest()


def _published_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's tensors as a version publishes them: those sharing storage once (see
    ``weights_bytes``)."""
    sd = model.state_dict()
    owners = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    groups: dict[tuple[int, int], list[str]] = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        groups.setdefault(key, []).append(name)
    keep = set()
    for names in groups.values():
        owned = sorted(n for n in names if n in owners)
        keep.add(owned[0] if owned else sorted(names)[0])
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if k in keep}


def weights_bytes(model: Any) -> bytes:
    """The policy as safetensors bytes, what each version publishes. Tensors that share storage
    (tied input and output embeddings) are written once, under the name ``named_parameters``
    gives them (the first module that registered it: ``model.embed_tokens.weight``, as
    ``save_pretrained`` does), so a copy of the architecture loads a version with
    ``safetensors.torch.load_model(model, path)`` or with ``load_state_dict(strict=False)``
    missing only the tied output name. The same weights always give the same bytes.
    ``write_weights`` writes the same bytes to a file without holding them in memory."""
    from safetensors.torch import save

    return save(_published_tensors(model))


def write_weights(model: Any, path: str | os.PathLike[str]) -> None:
    """Write ``weights_bytes(model)`` to ``path`` (the serialiser of ``weights_bytes``: the same
    bytes, so the same hash) with safetensors' ``save_file``, which writes from the tensors'
    memory (older safetensors releases copied every tensor to bytes first)."""
    save_file(_published_tensors(model), str(path))
