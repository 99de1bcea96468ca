"""Where a model directory comes from: a local directory, or a ModelScope model id, as in the official
CosyVoice (`snapshot_download(model_dir)` when no such path exists).

    resolve_model_dir("pretrained_models/CosyVoice2-0.5B")      # a path (existing or not): as given
    resolve_model_dir("iic/CosyVoice2-0.5B")                    # the ModelScope cache's copy (downloaded)
    resolve_model_dir("FunAudioLLM/Fun-CosyVoice3-0.5B-2512")   # the official CosyVoice3 id

Downloading needs the optional extra (pip install 'light-tts[modelscope]') and the hub. When the hub
cannot be reached, a copy the ModelScope cache already holds is used; without one, a ModelLoadError
says in one line how to download the model by hand. No torch here: the server's launcher resolves
--model_dir at parse time and does not import torch.
"""
from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("lighttts")

# owner/name, as ModelScope spells ids (a relative path of that shape that does not exist is tried as one,
# as the official code does)
_MODEL_ID = re.compile(r"[A-Za-z0-9_-][\w.-]*/[A-Za-z0-9_-][\w.-]*")
EXTRA = "pip install 'light-tts[modelscope]'"
_REASON_CHARS = 200


class ModelLoadError(RuntimeError):
    """The model directory does not hold what the model expects, or cannot be had.
    (Defined here, torch-free, for the server's launcher; light_tts.models.loading re-exports it.)"""


def resolve_model_dir(model_dir: str) -> str:
    """The local directory of a ModelScope id (owner/name) that is no local path: downloaded into the
    ModelScope cache, or found there when the hub is unreachable; an id that cannot be had is a one-line
    ModelLoadError. Anything else is returned as given: the caller's checks say what a path lacks."""
    if os.path.exists(model_dir) or not _MODEL_ID.fullmatch(model_dir):
        return model_dir
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{model_dir}: not a directory; to download the ModelScope model {model_dir}, "
                             f"{EXTRA} (or {_by_hand(model_dir)})") from None
    return _download(snapshot_download, model_dir)


def _by_hand(model_id: str) -> str:
    return f"where the hub is reachable: modelscope download --model {model_id} --local_dir DIR, and use DIR"


def _short(e: BaseException) -> str:
    """The error's class and its root cause's message: a hub error wraps the connection errors whose
    last one says what happened (e.g. "NetworkError: [Errno -2] Name or service not known")."""
    root, seen = e, {id(e)}
    while (inner := root.__cause__ or root.__context__) is not None and id(inner) not in seen:
        root = inner
        seen.add(id(inner))
    text = f"{type(e).__name__}: {(str(root).strip().splitlines() or [''])[0]}"
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS - 3] + "..."


def _download(snapshot_download, model_id: str) -> str:
    try:
        return snapshot_download(model_id)
    except Exception as e:   # no network, unknown id, no access: the hub's error classes differ by version
        reason = _short(e)
    try:
        path = snapshot_download(model_id, local_files_only=True)
    except Exception:        # not in the cache either: the download's reason is the one that matters
        raise ModelLoadError(f"{model_id}: not a directory, and downloading it from ModelScope failed ({reason}); "
                             f"download it {_by_hand(model_id)}") from None
    log.warning("%s: ModelScope unreachable (%s); using the copy in its cache, %s", model_id, reason, path)
    return path
