"""The tokenizer's identity (`data.tokenizer_identity`) read from its files, with `tokenizers` alone.

`ckptflow run` of a finished run must answer without importing transformers (which pulls
torch: seconds). A fast tokenizer's definition is its `tokenizer.json`; transformers may
adjust it on load, so a caller treats this identity as a guess that is right when it
matches what the ledger recorded, and falls back to loading the tokenizer otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Files of a fast HF tokenizer: the definition, and the config that names the special tokens.
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def identity(spec: dict[str, Any], eos_token: str | None) -> str:
    """sha256 of what makes token ids: the backend's definition (without runtime truncation/padding) and EOS."""
    spec = {k: v for k, v in spec.items() if k not in ("truncation", "padding")}
    blob = json.dumps({"spec": spec, "eos": eos_token}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def identity_from_files(model_dir: Path) -> str | None:
    """`identity` of the fast tokenizer in `model_dir`, or None when its files don't say (no tokenizer.json, no EOS)."""
    definition = model_dir / TOKENIZER_JSON
    eos = _eos_token(model_dir)
    if not definition.is_file() or eos is None:
        return None
    from tokenizers import Tokenizer  # Rust, imports in milliseconds (no torch)

    try:
        spec = json.loads(Tokenizer.from_file(str(definition)).to_str())
    except Exception:  # noqa: BLE001 - unreadable here: the caller loads it the slow way and reports properly
        return None
    return identity(spec, eos)


def _eos_token(model_dir: Path) -> str | None:
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        try:
            value = json.loads((model_dir / name).read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None
