"""``export --push-to-hub REPO``: upload an export directory to a Hugging Face Hub model repository.

Through ``huggingface_hub`` (the ``hub`` extra): ``HfApi().create_repo(REPO, repo_type="model",
exist_ok=True, private=...)`` then ``upload_folder(folder_path=EXPORT, repo_id=REPO, ...)``, one
commit with every file of the export (the model card ``README.md`` becomes the repository's card).
The token is huggingface_hub's own (``hf auth login`` or ``HF_TOKEN``); nothing here reads or
stores it.  Only what ``export.json`` lists (and itself) is uploaded, so a file dropped into the
export directory afterwards is not published by accident.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .._optional import require

__all__ = ["check_repo_id", "hub_client", "push_export"]

# huggingface_hub's rule for repo ids: namespace/name, letters, digits, '-', '_', '.', at most 96
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    from ..errors import ExportError

    if not isinstance(repo_id, str) or not _REPO_RE.match(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith(".git"):
        raise ExportError(f"--push-to-hub: {str(repo_id)[:100]!r} is not a Hub repository id; expected "
                          "'user/name' (letters, digits, '-', '_', '.')")
    return repo_id


def hub_client():
    """``huggingface_hub.HfApi()``, or the missing-extra error naming the ``hub`` extra."""
    return require("huggingface_hub", "hub", "--push-to-hub").HfApi()


def push_export(export_dir, repo_id: str, *, private: bool = False, api=None, log=None,
                commit_message: Optional[str] = None) -> str:
    """Upload the export in ``export_dir`` to ``repo_id``; returns the repository's URL."""
    export_dir = Path(export_dir)
    check_repo_id(repo_id)
    manifest = json.loads((export_dir / "export.json").read_text())
    files = sorted({str(p) for p in (manifest.get("files") or {}).values()} | {"export.json"})
    api = api if api is not None else hub_client()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(export_dir), repo_type="model", allow_patterns=files,
                      commit_message=commit_message or f"rb_labelrefine export {manifest.get('name')}")
    url = f"https://huggingface.co/{repo_id}"
    if log:
        log(f"uploaded {len(files)} files to {url}")
    return url
