"""`finetune push`: publish a run on the Hugging Face hub, with a model card worth reading.

What goes up is built first, in RUN/upload/: weights as safetensors only, config, tokenizer,
generation_config.json with the run's sampling settings, recipe.yaml, metrics.json, samples.jsonl,
plots and README.md (the card). Files are picked by name, so checkpoints, optimizer states and
pickles (training_args.bin) never go up, and a last scan refuses any pickle or token that slipped
in. `--dry-run` stops there and contacts nothing; a push creates the repo if needed and uploads the
folder through huggingface_hub.HfApi.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.model import BASE_SUBDIR
from finetune.upload import (  # noqa: F401  (Base, Run: the types callers and tests use)
    RECORD_FILES,
    TOKENIZER_FILES,
    Base,
    Run,
    build_upload,
    listing,
    read_run,
)

# Remote files a finetune upload may hold: a new push replaces them all (so an adapter pushed
# earlier does not linger beside a merged model), and leaves any other file of the repo alone.
MANAGED_PATTERNS = [
    "README.md",
    "*.safetensors",
    "*.safetensors.index.json",
    "*config.json",
    *TOKENIZER_FILES,
    *RECORD_FILES,
    f"{BASE_SUBDIR}/*",
    "plots/*",
]
LOGIN_HINT = (
    "log in with `hf auth login` or set HF_TOKEN to a token with write access "
    "(huggingface.co/settings/tokens), or pass --dry-run to only build the folder"
)


# --------------------------------------------------------------------------- the story


def push(
    run: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    merged: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    api=None,
    log=print,
) -> Path:
    """Build RUN/upload/ and (unless `dry_run`) upload it to `repo_id`; returns the folder.

    `api` stands in for `huggingface_hub.HfApi` (tests pass a fake one); the token is `token`,
    else HF_TOKEN or the saved login.
    """
    check_repo_id(repo_id, "--repo-id")
    loaded = read_run(run)
    if merged and not loaded.lora:
        raise FinetuneError(
            f"--merged is for LoRA runs, and {run} is a full fine-tune: push it without --merged"
        )
    if not dry_run:
        token = token or hub_token()
        if api is None:
            _require_reachable()
    folder = build_upload(loaded, repo_id, merged=merged, offline=dry_run)
    what = "merged model" if merged else "adapter" if loaded.lora else "model"
    if dry_run:
        log(
            f"built the upload of {loaded.path} for {repo_id} ({what}); nothing was sent "
            "(--dry-run):"
        )
        for line in listing(folder):
            log(f"  {line}")
        log(str(folder.resolve()))
        return folder
    _refuse_token_in(folder, token)
    message = commit_message or f"Upload {what} trained with finetune"
    url = upload(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=message,
        api=api,
    )
    log(f"pushed {loaded.path} ({what}) to {url}")
    return folder


def push_at_end(recipe) -> None:
    """Push a just-finished run when its recipe says `hub.push: end` (main process only)."""
    if recipe.hub.push != "end":
        return
    run, repo_id = recipe.output_dir, recipe.hub.repo_id
    try:
        push(run, repo_id, private=recipe.hub.private)
    except FinetuneError as exc:
        raise FinetuneError(
            f"the run is saved in {run}, but pushing it to {repo_id} failed: {exc}. Once fixed, "
            f"push it with: finetune push {run} --repo-id {repo_id}"
        ) from None


def preflight(recipe) -> None:
    """Before training: fail now, not hours later, if `hub.push: end` cannot push."""
    if recipe.hub.push != "end":
        return
    check_repo_id(recipe.hub.repo_id or "", "hub.repo_id")
    hub_token()


# --------------------------------------------------------------------------- checks


def check_repo_id(repo_id: str, key: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    problem = None
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        problem = "it must be OWNER/NAME"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            problem = (
                "use letters, digits, '-', '_' and '.', no '--' or '..', not starting or "
                "ending with '-' or '.', at most 96 characters"
            )
    if problem:
        raise FinetuneError(
            f"{key} {repo_id!r} is not a valid repo id: {problem} (for example me/gpt2-podcast)"
        )


def hub_token() -> str:
    """HF_TOKEN, else the token saved by `hf auth login`; a one-line error when there is none."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as exc:  # an OIDC exchange (CI) that fails raises; say so on one line
        raise FinetuneError(f"cannot get a Hugging Face token ({exc}); {LOGIN_HINT}") from None
    if not token:
        raise FinetuneError(f"no Hugging Face token found: {LOGIN_HINT}")
    return token


def _require_reachable() -> None:
    from finetune.net import hub_reachable

    if not hub_reachable():
        raise FinetuneError(
            "cannot reach the Hugging Face hub (offline, or HF_HUB_OFFLINE "
            "set?); check the connection, or pass --dry-run to only build the "
            "folder"
        )


# --------------------------------------------------------------------------- the hub


def upload(
    folder: Path,
    repo_id: str,
    *,
    token: str,
    private: bool,
    revision: str | None,
    commit_message: str,
    api=None,
) -> str:
    """Create the repo (and branch) if needed and upload the folder as one commit; the URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            delete_patterns=MANAGED_PATTERNS,
            token=token,
        )
    except HfHubHTTPError as exc:
        raise FinetuneError(_http_problem(exc, repo_id)) from None
    except ValueError as exc:  # the hub's check of the card's metadata
        first = " ".join(str(exc).split())
        raise FinetuneError(f"the hub refused the upload to {repo_id}: {first}") from None
    except OSError as exc:  # connection errors
        raise FinetuneError(
            f"pushing to {repo_id} failed: {exc}; check the connection and push again"
        ) from None
    url = f"https://huggingface.co/{repo_id}"
    return f"{url}/tree/{revision}" if revision else url


def _http_problem(exc, repo_id: str) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status == 401:
        return f"the hub rejected the token (401 Unauthorized); {LOGIN_HINT}"
    if status == 403:
        owner = repo_id.split("/")[0]
        return (
            f"the token may not write to {repo_id} (403 Forbidden): use a token with write "
            f"access to {owner}, or another --repo-id"
        )
    return f"pushing to {repo_id} failed: {first}"


def _refuse_token_in(folder: Path, token: str | None) -> None:
    """Belt and braces: no file that goes up may contain the token (weights are not text)."""
    if not token:
        return
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors" and needle in path.read_bytes():
            raise FinetuneError(f"refusing to upload: {path} contains the hub token; remove it")
