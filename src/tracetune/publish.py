"""``tracetune publish``: an export directory to the Hugging Face hub or to Kaggle.

    tracetune publish RUN/export/merged --to hf:OWNER/NAME [--public] [--dry-run]
    tracetune publish RUN/export/gguf --to kaggle:OWNER/MODEL/gguf/VARIATION

What goes up is the export directory as it is, with its model card (README.md, card.py)
rewritten from the run's files first, so evaluations that finished after the export
are in it. Before anything is created:

1. the target parses (``parse_target``) and fits the export's kind;
2. no file is a link or looks like a credential (``credential_problem``);
3. credentials exist, from each hub's own places only: HF_TOKEN or the token that
   ``hf auth login`` saved (huggingface_hub's lookup); KAGGLE_USERNAME + KAGGLE_KEY,
   KAGGLE_API_TOKEN or ~/.kaggle/kaggle.json (kagglehub's). They are never printed,
   and nothing of them is written into the export;
4. the host answers, and the name is free or already holds a tracetune export of the
   same kind (``existing_export``): the upload is then its new version. Anything else
   is "name taken".

Then the repository or Kaggle model is created if needed (private unless ``--public``;
an existing one keeps its visibility) and the files go up as one commit (hub) or one
new version (Kaggle). A failed upload deletes what this call created, so nothing
partial stays; every failure is one ExportError line.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from tracetune.card import KINDS, export_kind, is_card, model_card
from tracetune.errors import ExportError
from tracetune.files import atomic_path

HF, KAGGLE = "hf", "kaggle"
TARGET_FORMS = "hf:OWNER/NAME or kaggle:OWNER/MODEL/FRAMEWORK/VARIATION"
TARGET_PARTS = {HF: ("OWNER", "NAME"), KAGGLE: ("OWNER", "MODEL", "FRAMEWORK", "VARIATION")}
# A hub name: letters, digits, '-', '_' and '.', starting and ending with a letter or a
# digit, no '--' or '..', at most 96 characters (the Hugging Face hub's rule, which
# Kaggle's slugs also satisfy).
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# Kaggle files a model variation under a framework; each kind of export has its own.
KAGGLE_FRAMEWORKS = {"merged": ("transformers",), "gguf": ("gguf",), "adapter": ("jax", "flax", "other")}
# Seconds for the first request to the hub, which says whether the host answers at all.
PROBE_TIMEOUT = 15.0
# Never part of an export, never uploaded (both hubs' clients skip them too).
SKIPPED_DIRS = (".git", ".cache", ".huggingface")

# Files that hold credentials where tools keep them (the hubs', git's, ssh's, dotenv's,
# package indexes'); an export never needs one, so one found is a mistake to stop on.
CREDENTIAL_NAMES = frozenset({
    "kaggle.json", "access_token", "access_token.txt", "token", "token.txt", "stored_tokens", ".netrc", "_netrc",
    ".git-credentials", ".pypirc", ".npmrc", "credentials", "credentials.json", "id_rsa", "id_dsa", "id_ecdsa",
    "id_ed25519",
})
CREDENTIAL_PATTERNS = (".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*_token", "*_token.txt",
                       "*.token", "*secret*", "*credential*")
# Token shapes inside small files: Hugging Face tokens, Kaggle API tokens, a kaggle.json key.
TOKEN_SHAPES = re.compile(rb"\bhf_[A-Za-z0-9]{30,}|\bKGAT_[A-Za-z0-9]{16,}|\"key\"\s*:\s*\"[0-9a-f]{32}\"")
SCAN_BYTES = 1 << 20  # files up to this size are read for token shapes; weights are not


@dataclass(frozen=True)
class Target:
    """Where an export goes: ``hf:OWNER/NAME`` or ``kaggle:OWNER/MODEL/FRAMEWORK/VARIATION``.

    >>> parse_target("hf:alice/gemma3-tracer").name
    'alice/gemma3-tracer'
    """

    hub: str  # "hf" | "kaggle"
    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        """The repository id (hub) or the model handle (Kaggle), without the prefix."""
        return "/".join(self.parts)

    def __str__(self) -> str:
        return f"{self.hub}:{self.name}"


def parse_target(text: str, option: str = "--to") -> Target:
    """``text`` (the value of ``option``) as a Target; an ExportError naming the
    expected forms otherwise. ``--model`` reads published names with it too."""
    hub, colon, rest = text.partition(":")
    if not colon or hub not in TARGET_PARTS:
        raise ExportError(f"{option} {text!r}: expected {TARGET_FORMS}")
    parts, names = tuple(rest.split("/")), TARGET_PARTS[hub]
    if len(parts) != len(names):
        versioned = " (without a version: Kaggle numbers the versions)" if hub == KAGGLE and len(parts) == len(names) + 1 else ""
        raise ExportError(f"{option} {text!r}: {hub}: takes {'/'.join(names)}{versioned}; expected {TARGET_FORMS}")
    for label, part in zip(names, parts):
        if not _NAME.match(part) or "--" in part or ".." in part:
            raise ExportError(f"{option} {text!r}: {label} {part!r} is not a valid name (letters, digits, '-', '_' and '.', "
                              f"starting and ending with a letter or digit); expected {TARGET_FORMS}")
    return Target(hub, parts)


# ------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Upload:
    """What ``publish`` sends: every file of the export with its size in bytes."""

    export_dir: Path
    kind: str  # "merged" | "adapter" | "gguf"
    files: tuple[tuple[str, int], ...]  # (path relative to the export, bytes), README.md at the card's size
    card: str | None  # the model card written before uploading; None: README.md is kept as it is
    notes: str  # what it is, for the commit message / Kaggle's version notes

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)


def human_size(n: int) -> str:
    """``human_size(3 * 2**20)`` -> ``'3.0 MiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _files(export_dir: Path) -> list[Path]:
    """Every file under ``export_dir`` (hubs' own folders left out); a link is an
    error, since what it points to may be anything (a key file outside the export)."""
    out = []
    for path in sorted(export_dir.rglob("*")):
        relative = path.relative_to(export_dir)
        if any(part in SKIPPED_DIRS for part in relative.parts):
            continue
        if path.is_symlink():
            raise ExportError(f"{path} is a symbolic link: publish uploads real files only; copy it in or remove it")
        if path.is_file():
            out.append(path)
    return out


def credential_problem(path: Path) -> str | None:
    """Why ``path`` looks like a credential (its name, or a token shape in a small
    file), or None."""
    name = path.name.lower()
    if name in CREDENTIAL_NAMES or any(fnmatch(name, pattern) for pattern in CREDENTIAL_PATTERNS):
        return "its name is a credential file's"
    if path.stat().st_size <= SCAN_BYTES and TOKEN_SHAPES.search(path.read_bytes()):
        return "it holds what looks like an API token"
    return None


def _notes(export_dir: Path, kind: str) -> str:
    """``"tracetune merged export: grpo step 40 (best validation accuracy)"`` from the export's own file."""
    try:
        own = json.loads((export_dir / KINDS[kind]).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # only the message is plainer: the card, which reads the file too, stops on it
        own = {}
    stage = f": {own['stage']} step {own.get('step')}" if own.get("stage") else ""
    how = f" ({own['selected']})" if own.get("selected") else ""
    return f"tracetune {kind} export{stage}{how}"


def plan(export_dir: Path, target: Target) -> Upload:
    """The files of ``export_dir`` that would go to ``target``, after the local checks
    (an export, the right Kaggle framework, no link, no credential). The card is not
    written yet: ``with_card`` does it."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ExportError(f"{export_dir}: no such export directory (give RUN/export/merged, RUN/export/adapter or RUN/export/gguf)")
    kind = export_kind(export_dir)
    if target.hub == KAGGLE and target.parts[2].lower() not in KAGGLE_FRAMEWORKS[kind]:
        raise ExportError(f"--to {target}: a {kind} export goes under the Kaggle framework "
                          f"{' or '.join(KAGGLE_FRAMEWORKS[kind])}, not {target.parts[2]!r}")
    files = _files(export_dir)
    for path in files:
        why = credential_problem(path)
        if why:
            raise ExportError(f"{path} looks like a credential ({why}): remove it from the export; nothing was uploaded")
    sizes = {path.relative_to(export_dir).as_posix(): path.stat().st_size for path in files}
    return Upload(export_dir, kind, tuple(sorted(sizes.items())), None, _notes(export_dir, kind))


def with_card(upload: Upload, target: Target) -> Upload:
    """The upload with its model card, rewritten for ``target``; a README.md that
    tracetune did not write is kept as it is."""
    readme = upload.export_dir / "README.md"
    if readme.exists() and not is_card(readme):
        return upload
    card = model_card(upload.export_dir, published_as=str(target))
    if TOKEN_SHAPES.search(card.encode()):  # e.g. a key pasted into the run's config
        raise ExportError(f"the model card of {upload.export_dir} would carry what looks like an API token "
                          "(from the run's config.yaml?); nothing was uploaded")
    sizes = dict(upload.files) | {"README.md": len(card.encode())}
    return dataclasses.replace(upload, files=tuple(sorted(sizes.items())), card=card)


def _write_card(upload: Upload) -> None:
    if upload.card is not None:
        with atomic_path(upload.export_dir / "README.md") as tmp:
            tmp.write_text(upload.card, encoding="utf-8")


# ------------------------------------------------------------------ publishing


@dataclass(frozen=True)
class Published:
    target: Target
    url: str
    upload: Upload
    created: bool  # a new repository (hub) or model (Kaggle)
    private: bool | None  # its visibility, when known


def _one_line(error: BaseException, limit: int = 240) -> str:
    """An exception as a short single line (library messages span lines)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreachable(endpoint: str, error: BaseException, what: str) -> ExportError:
    return ExportError(f"cannot reach {endpoint} ({type(error).__name__}: {_one_line(error)}): check the network "
                       f"{what}; nothing was uploaded")


def existing_export(target: Target, kind: str, remote: Sequence[str] | None) -> bool:
    """Whether ``target`` already exists, given its files (None: it does not). It may
    exist empty, or holding a tracetune export of the same kind (the upload is its next
    version); anything else is another's model and an ExportError ("name taken")."""
    if remote is None:
        return False
    kinds = [k for k, marker in KINDS.items() if marker in remote]
    if not kinds:
        others = [f for f in remote if f != ".gitattributes"]  # what a freshly created empty hub repository holds
        if others:
            raise ExportError(f"{target}: name taken: it exists and holds no tracetune export ({len(others)} files, e.g. "
                              f"{others[0]}); choose another name")
        return True
    if kind not in kinds:
        raise ExportError(f"{target}: it holds a tracetune {kinds[0]} export and this is a {kind} export; "
                          "publish it under another name")
    return True


def _status(error: BaseException) -> int | None:
    """The HTTP status of an httpx / requests error that carries a response."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _hf_refused(target: Target, error: BaseException) -> ExportError:
    status = _status(error)
    if status in (401, 403):
        return ExportError(f"{target}: the Hugging Face token was refused (HTTP {status}): it needs write access to "
                           f"{target.parts[0]}; nothing was uploaded")
    return ExportError(f"{target}: the Hugging Face hub answered HTTP {status} ({_one_line(error)}); nothing was uploaded")


def publish_hf(upload: Upload, target: Target, *, public: bool) -> Published:
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = get_token()  # HF_TOKEN, else the token `hf auth login` saved
    if not token:
        raise ExportError("no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded")
    api = HfApi(token=token)
    network = "(or HF_ENDPOINT)"
    try:
        info = api.repo_info(target.name, repo_type="model", timeout=PROBE_TIMEOUT)
        remote = [s.rfilename for s in info.siblings or []]
    except RepositoryNotFoundError:  # also what a private repository of another looks like
        info, remote = None, None
    except HfHubHTTPError as error:
        raise _hf_refused(target, error) from None
    except (httpx.HTTPError, OSError) as error:
        raise _unreachable(api.endpoint, error, network) from None
    exists = existing_export(target, upload.kind, remote)
    upload = with_card(upload, target)
    created = False
    if not exists:
        try:
            api.create_repo(target.name, repo_type="model", private=not public, exist_ok=False)
        except HfHubHTTPError as error:
            if _status(error) == 409:
                raise ExportError(f"{target}: name taken: the repository exists but this token cannot read it; "
                                  "choose another name") from None
            raise _hf_refused(target, error) from None
        except (httpx.HTTPError, OSError) as error:
            raise _unreachable(api.endpoint, error, network) from None
        created = True
    try:
        _write_card(upload)
        # One commit of exactly the planned files (allow_patterns: each file's own path).
        api.upload_folder(repo_id=target.name, repo_type="model", folder_path=upload.export_dir,
                          allow_patterns=[glob.escape(path) for path, _ in upload.files],
                          commit_message=upload.notes)
    except Exception as error:  # noqa: BLE001 - whatever failed, undo what this call created and say it in one line
        raise ExportError(f"{target}: the upload failed ({type(error).__name__}: {_one_line(error)}); nothing was "
                          f"committed{_hf_undo(api, target) if created else ''}") from None
    private = (not public) if created else getattr(info, "private", None)
    return Published(target, f"{api.endpoint}/{target.name}", upload, created, private)


def _hf_undo(api, target: Target) -> str:
    try:
        api.delete_repo(target.name, repo_type="model")
        return " and the repository this call created is deleted again"
    except Exception as error:  # noqa: BLE001 - the upload's error is the one to report; this adds a note
        return f"; the empty repository this call created is left ({type(error).__name__}): delete it on the hub"


def _kaggle_credentials() -> None:
    from kagglehub.config import get_kaggle_credentials

    try:
        credentials = get_kaggle_credentials()  # KAGGLE_API_TOKEN, KAGGLE_USERNAME + KAGGLE_KEY, kaggle.json
    except ValueError as error:  # a kaggle.json without its fields: kagglehub names the file
        raise ExportError(f"{_one_line(error)}; nothing was uploaded") from None
    if credentials is None:
        raise ExportError("no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or put "
                          "kaggle.json in ~/.kaggle; nothing was uploaded")


def _kaggle_remote(target: Target) -> tuple[list[str] | None, bool]:
    """(the files of the variation's latest version, None when it does not exist;
    whether the model exists)."""
    import requests
    from kagglehub.clients import build_kaggle_client
    from kagglehub.handle import parse_model_handle
    from kagglesdk.kaggle_env import get_endpoint, get_env
    from kagglesdk.models.types.model_api_service import (
        ApiGetModelInstanceRequest,
        ApiGetModelRequest,
        ApiListModelInstanceVersionFilesRequest,
    )

    handle = parse_model_handle(target.name)

    def found(call):
        try:
            return call()
        except requests.HTTPError as error:
            if _status(error) == 404:
                return None
            if _status(error) in (401, 403):
                raise ExportError(f"{target}: Kaggle refused (HTTP {_status(error)}): the credentials are wrong, or "
                                  f"the name is taken by a model they cannot see; nothing was uploaded") from None
            raise ExportError(f"{target}: Kaggle answered {_one_line(error)}; nothing was uploaded") from None

    try:
        with build_kaggle_client() as client:
            api = client.models.model_api_client
            model = ApiGetModelRequest()
            model.owner_slug, model.model_slug = handle.owner, handle.model
            if found(lambda: api.get_model(model)) is None:
                return None, False
            instance = ApiGetModelInstanceRequest()
            instance.owner_slug, instance.model_slug = handle.owner, handle.model
            instance.framework, instance.instance_slug = handle.framework_enum(), handle.variation
            got = found(lambda: api.get_model_instance(instance))
            if got is None:
                return None, True
            listing = ApiListModelInstanceVersionFilesRequest()
            listing.owner_slug, listing.model_slug = handle.owner, handle.model
            listing.framework, listing.instance_slug = handle.framework_enum(), handle.variation
            listing.version_number, listing.page_size = got.version_number, 100
            files = found(lambda: api.list_model_instance_version_files(listing))
            return [f.name for f in (files.files if files else None) or []], True
    except requests.RequestException as error:  # refused, no route, DNS: before anything was created
        raise _unreachable(get_endpoint(get_env()), error, "(or KAGGLE_API_ENVIRONMENT)") from None


def publish_kaggle(upload: Upload, target: Target, *, public: bool) -> Published:
    _kaggle_credentials()
    remote, model_exists = _kaggle_remote(target)
    existing_export(target, upload.kind, remote)
    upload = with_card(upload, target)

    import kagglehub
    from kagglehub.clients import build_kaggle_client
    from kagglehub.exceptions import handle_mutate_call
    from kagglehub.handle import parse_model_handle
    from kagglehub.models_helpers import delete_model
    from kagglesdk.models.types.model_api_service import ApiCreateModelRequest

    handle = parse_model_handle(target.name)
    created = False
    try:
        if not model_exists:
            # kagglehub creates a missing model private, always; created here, it gets --public.
            with build_kaggle_client() as client:
                request = ApiCreateModelRequest()
                request.owner_slug, request.slug, request.title = handle.owner, handle.model, handle.model
                request.is_private = not public
                handle_mutate_call(lambda: client.models.model_api_client.create_model(request))
            created = True
        _write_card(upload)
        # No license_name: Kaggle's list has no Gemma terms; the card (README.md) states them.
        kagglehub.model_upload(target.name, str(upload.export_dir), version_notes=upload.notes)
    except Exception as error:  # noqa: BLE001 - kagglehub raises many types; one line, and undo what this call created
        undone = ""
        if created:
            try:
                delete_model(handle.owner, handle.model)
                undone = " and the model this call created is deleted again"
            except Exception as cleanup:  # noqa: BLE001 - the upload's error is the one to report
                undone = f"; the empty model this call created is left ({type(cleanup).__name__}): delete it on Kaggle"
        raise ExportError(f"{target}: the upload failed ({type(error).__name__}: {_one_line(error)}); no version was "
                          f"created{undone}") from None
    return Published(target, handle.to_url(), upload, created, (not public) if created else None)


def publish(export_dir: Path, to: str, *, public: bool = False, dry_run: bool = False) -> Upload | Published:
    """Check, then upload ``export_dir`` to ``to``; with ``dry_run`` only the plan
    (no credentials needed, nothing written or sent)."""
    target = parse_target(to)
    upload = plan(Path(export_dir), target)
    if dry_run:
        return with_card(upload, target)
    send = publish_hf if target.hub == HF else publish_kaggle
    return send(upload, target, public=public)
