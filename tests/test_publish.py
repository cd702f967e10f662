"""``tracetune publish`` and ``--model hf:/kaggle:`` without a hub: target parsing,
the dry run's file list, each failure as one line (the unreachable host for real, on a
closed local port), credential files refused, a fake hub for what needs an answer, and
published exports loaded back through monkeypatched downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tracetune import publish as publish_mod
from tracetune.cli import app
from tracetune.errors import ExportError
from tracetune.publish import Target, existing_export, parse_target

FAKE_HF_TOKEN = "hf_" + "x" * 34  # token-shaped, refused by any hub
CREDENTIAL_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN",
                   "KAGGLE_CONFIG_DIR", "KAGGLE_API_ENVIRONMENT", "HF_ENDPOINT")


@pytest.mark.parametrize("text,parsed", [
    ("hf:alice/gemma3-tracer", ("hf", ("alice", "gemma3-tracer"))),
    ("hf:Alice-Lab/tracer_v2.1", ("hf", ("Alice-Lab", "tracer_v2.1"))),  # '_' and '.' inside a name
    ("kaggle:alice/tracer/transformers/270m-grpo", ("kaggle", ("alice", "tracer", "transformers", "270m-grpo"))),
])
def test_targets_that_parse(text, parsed):
    target = parse_target(text)
    assert (target.hub, target.parts) == parsed and str(target) == text


@pytest.mark.parametrize("text,message", [
    ("alice/tracer", "expected hf:OWNER/NAME or kaggle:OWNER/MODEL/FRAMEWORK/VARIATION"),  # no hub prefix
    ("s3:alice/tracer", "expected hf:OWNER/NAME"),  # a hub we do not publish to
    ("HF:alice/tracer", "expected hf:OWNER/NAME"),  # the prefix is lower case
    ("hf:alice", "hf: takes OWNER/NAME"),  # the owner alone
    ("hf:alice/tracer/extra", "hf: takes OWNER/NAME"),  # a path inside the repository
    ("hf:/tracer", "OWNER '' is not a valid name"),  # empty owner
    ("hf:alice/-tracer", "NAME '-tracer' is not a valid name"),  # starts with '-'
    ("hf:alice/tra--cer", "NAME 'tra--cer' is not a valid name"),  # the hub refuses '--'
    ("hf:al ice/tracer", "OWNER 'al ice' is not a valid name"),  # a space
    ("kaggle:alice/tracer/transformers", "kaggle: takes OWNER/MODEL/FRAMEWORK/VARIATION"),  # no variation
    ("kaggle:alice/tracer/transformers/270m/3", "without a version: Kaggle numbers the versions"),
])
def test_targets_that_do_not_parse_name_the_expected_forms(text, message):
    with pytest.raises(ExportError, match="expected hf:OWNER/NAME or kaggle:OWNER/MODEL/FRAMEWORK/VARIATION") as error:
        parse_target(text)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("remote,kind,outcome", [
    (None, "merged", False),  # no such repository: created
    ([".gitattributes"], "merged", True),  # created empty on the website: filled
    (["config.json", "model.safetensors", "tokenizer.model", "tracetune.json", "README.md"], "merged", True),  # a new version
    (["README.md", "pytorch_model.bin"], "merged", "name taken"),  # another's model
    (["README.md"], "merged", "name taken"),  # even a card alone: it would be overwritten
    (["model.gguf", "gguf.json", "Modelfile"], "merged", "holds a tracetune gguf export and this is a merged export"),
])
def test_an_existing_name_is_taken_unless_it_holds_our_export_of_the_same_kind(remote, kind, outcome):
    target = Target("hf", ("alice", "tracer"))
    if isinstance(outcome, bool):
        assert existing_export(target, kind, remote) is outcome
    else:
        with pytest.raises(ExportError, match=outcome):
            existing_export(target, kind, remote)


# ------------------------------------------------------------ a fake export


def fake_export(root: Path, **extra_files: bytes) -> Path:
    """A merged export as save_checkpoint lays it out, with stand-in bytes for the weights."""
    export = root / "run" / "export" / "merged"
    export.mkdir(parents=True)
    files = {"model.safetensors": bytes(1000), "config.json": b'{"model_type": "gemma3_text"}', "tokenizer.model": bytes(300),
             "tracetune.json": json.dumps({"format": "tracetune.model/1", "base": "tiny", "stage": "sft", "step": 3,
                                           "selected": "last step"}).encode(), **extra_files}
    for name, data in files.items():
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_bytes(data)
    return export


def test_the_dry_run_lists_every_file_with_its_size_and_uploads_nothing(tmp_path, monkeypatch):
    export = fake_export(tmp_path)
    for name in ("publish_hf", "publish_kaggle"):
        monkeypatch.setattr(publish_mod, name, lambda *a, **k: pytest.fail("the dry run uploaded"))
    result = CliRunner().invoke(app, ["publish", str(export), "--to", "hf:alice/tracer", "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    target = parse_target("hf:alice/tracer")
    card = len(publish_mod.with_card(publish_mod.plan(export, target), target).card.encode())
    assert "1,000 B  model.safetensors" in lines and "300 B  tokenizer.model" in lines
    assert f"{card:,} B  README.md  (model card, written before the upload)" in lines
    total = 1000 + 300 + len(b'{"model_type": "gemma3_text"}') + (export / "tracetune.json").stat().st_size + card
    assert f"5 files, {total:,} B" in result.output and "dry run: nothing uploaded" in result.output
    assert not (export / "README.md").exists()  # the dry run writes nothing either


# --------------------------------------------------- failure paths, for real


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment with no credential anywhere a hub client looks (variables,
    ~/.cache/huggingface/token, ~/.kaggle)."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), HF_HOME=str(home / "hf"), KAGGLE_CONFIG_DIR=str(home / "kaggle"), COLUMNS="300", **extra)
    return env


def publish_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetune.cli", "publish", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("to,env,fragments", [
    ("alice/tracer", {}, ("expected hf:OWNER/NAME or kaggle:OWNER/MODEL/FRAMEWORK/VARIATION",)),
    ("kaggle:alice/tracer/gguf/v1", {}, ("a merged export goes under the Kaggle framework transformers",)),
    ("hf:alice/tracer", {}, ("no Hugging Face token: set HF_TOKEN or run `hf auth login`", "nothing was uploaded")),
    ("kaggle:alice/tracer/transformers/v1", {}, ("no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY",)),
    # Credentials, but a closed port / nothing on localhost: fails at once, before anything is created.
    ("hf:alice/tracer", {"HF_TOKEN": FAKE_HF_TOKEN, "HF_ENDPOINT": "http://127.0.0.1:9"},
     ("cannot reach http://127.0.0.1:9 (ConnectError", "nothing was uploaded")),
    ("kaggle:alice/tracer/transformers/v1", {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "0" * 32, "KAGGLE_API_ENVIRONMENT": "LOCALHOST"},
     ("cannot reach http://localhost (ConnectionError", "nothing was uploaded")),
], ids=["bad-target", "kaggle-framework", "no-hf-token", "no-kaggle-credentials", "hf-unreachable", "kaggle-unreachable"])
def test_each_failure_is_one_line_and_uploads_nothing(tmp_path, to, env, fragments):
    export = fake_export(tmp_path)
    before = sorted(p.name for p in export.iterdir())
    start = time.perf_counter()
    result = publish_cli(str(export), "--to", to, env=clean_env(tmp_path, **env))
    assert_one_line(result, *fragments)
    assert time.perf_counter() - start < 60  # nothing waits on a dead host
    assert sorted(p.name for p in export.iterdir()) == before  # not even the card was written
    for secret in (FAKE_HF_TOKEN, "0" * 32):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("name,data,why", [
    ("kaggle.json", b'{"username": "alice", "key": "0123456789abcdef0123456789abcdef"}', "its name is a credential file's"),
    (".env", b"HF_TOKEN=whatever\n", "its name is a credential file's"),
    ("notes/hf_token", b"x", "its name is a credential file's"),
    ("notes.txt", b"token: " + FAKE_HF_TOKEN.encode(), "it holds what looks like an API token"),
])
def test_an_export_with_a_credential_in_it_is_refused(tmp_path, name, data, why):
    export = fake_export(tmp_path, **{name: data})
    result = publish_cli(str(export), "--to", "hf:alice/tracer", "--dry-run", env=clean_env(tmp_path))
    assert_one_line(result, "looks like a credential", why, "remove it from the export")
    assert FAKE_HF_TOKEN not in result.stderr


def test_a_link_in_the_export_is_refused(tmp_path):
    secret = tmp_path / "elsewhere.json"
    secret.write_text("{}")
    export = fake_export(tmp_path)
    (export / "extra.json").symlink_to(secret)
    with pytest.raises(ExportError, match="is a symbolic link"):
        publish_mod.plan(export, parse_target("hf:alice/tracer"))


# ----------------------------------------------------------------- a fake hub


class FakeHub:
    """HfApi's methods that publish calls, answering as the hub would; ``calls`` records them."""

    def __init__(self, files: list[str] | None, fail_upload: bool = False):
        self.files, self.fail_upload, self.calls = files, fail_upload, []
        self.endpoint = "https://huggingface.co"

    def __call__(self, token=None):  # HfApi(token=...)
        assert token == FAKE_HF_TOKEN
        return self

    def repo_info(self, repo_id, *, repo_type, timeout):
        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append(("repo_info", repo_id, timeout))
        if self.files is None:
            request = httpx.Request("GET", f"{self.endpoint}/api/models/{repo_id}")
            raise RepositoryNotFoundError("404 Repository Not Found", response=httpx.Response(404, request=request))
        return type("Info", (), {"siblings": [type("Sibling", (), {"rfilename": f})() for f in self.files], "private": True})()

    def create_repo(self, repo_id, *, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, *, repo_id, repo_type, folder_path, allow_patterns, commit_message):
        self.calls.append(("upload_folder", repo_id, sorted(allow_patterns), commit_message))
        if self.fail_upload:
            raise httpx.ConnectError("connection reset")

    def delete_repo(self, repo_id, *, repo_type):
        self.calls.append(("delete_repo", repo_id))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    def install(files, fail_upload=False):
        fake = FakeHub(files, fail_upload)
        monkeypatch.setattr(huggingface_hub, "HfApi", fake)
        monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
        return fake

    return install


def cli(*args: str):
    return CliRunner().invoke(app, ["publish", *args], env={"COLUMNS": "300"})


def test_a_new_repository_is_private_and_gets_exactly_the_planned_files(tmp_path, hub):
    fake = hub(None)
    export = fake_export(tmp_path)
    result = cli(str(export), "--to", "hf:alice/tracer")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake.calls] == ["repo_info", "create_repo", "upload_folder"]
    assert fake.calls[0][2] == publish_mod.PROBE_TIMEOUT and fake.calls[1] == ("create_repo", "alice/tracer", True)
    files = ["README.md", "config.json", "model.safetensors", "tokenizer.model", "tracetune.json"]
    assert fake.calls[2][2] == files and fake.calls[2][3] == "tracetune merged export: sft step 3 (last step)"
    assert "hf:alice/tracer" in (export / "README.md").read_text()  # the card names where it lives
    assert "published" in result.output and "(new, private)" in result.output
    assert cli(str(export), "--to", "hf:alice/public", "--public").exit_code == 0
    assert ("create_repo", "alice/public", False) in fake.calls


def test_a_name_taken_by_another_model_is_refused_before_anything_is_created(tmp_path, hub):
    fake = hub(["README.md", "pytorch_model.bin"])
    result = cli(str(fake_export(tmp_path)), "--to", "hf:alice/tracer")
    assert isinstance(result.exception, ExportError) and "name taken" in str(result.exception)
    assert [c[0] for c in fake.calls] == ["repo_info"]


def test_our_own_export_of_the_same_kind_gets_a_new_version(tmp_path, hub):
    fake = hub([".gitattributes", "README.md", "config.json", "model.safetensors", "tokenizer.model", "tracetune.json"])
    result = cli(str(fake_export(tmp_path)), "--to", "hf:alice/tracer")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake.calls] == ["repo_info", "upload_folder"] and "(new version, private)" in result.output


def test_a_failed_upload_deletes_the_repository_it_created(tmp_path, hub):
    fake = hub(None, fail_upload=True)
    result = cli(str(fake_export(tmp_path)), "--to", "hf:alice/tracer")
    assert isinstance(result.exception, ExportError)  # main() prints it as one line (the subprocess tests)
    assert ("the upload failed (ConnectError: connection reset); nothing was committed and the repository this call "
            "created is deleted again") in " ".join(str(result.exception).split())
    assert fake.calls[-1] == ("delete_repo", "alice/tracer")


# ------------------------------------------------------------ loading it back


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A merged export written by tracetune (save_checkpoint on the tiny model)."""
    from tracetune.models.hf import save_checkpoint
    from tracetune.models.params import flat_params
    from tracetune.models.registry import load_model

    tiny = load_model("tiny")
    directory = tmp_path_factory.mktemp("published") / "snapshot"
    save_checkpoint(flat_params(tiny.model), tiny.config, tiny.tokenizer, directory, base="tiny", extra={"stage": "sft", "step": 3})
    return directory, tiny


@pytest.mark.parametrize("name,fetcher,handle", [
    ("hf:alice/tracer", "download_hf", "alice/tracer"),
    ("kaggle:alice/tracer/transformers/v1", "download_kaggle", "alice/tracer/transformers/v1"),
])
def test_a_published_export_loads_back_by_its_name(published, monkeypatch, name, fetcher, handle):
    import numpy as np

    from tracetune.models import hf
    from tracetune.models.params import config_to_json, flat_params
    from tracetune.models.registry import load_model

    directory, tiny = published
    asked = []
    monkeypatch.setattr(hf, fetcher, lambda where: asked.append(where) or directory)
    loaded = load_model(name)
    assert asked == [handle] and loaded.source == str(directory)
    assert config_to_json(loaded.config) == config_to_json(tiny.config)
    key = "layers.0.mlp.gate_proj.kernel"
    assert np.array_equal(flat_params(loaded.model)[key], flat_params(tiny.model)[key])


def test_a_published_name_that_cannot_load_says_what_was_tried(published, tmp_path, monkeypatch):
    from tracetune.models import hf
    from tracetune.models.errors import ModelError
    from tracetune.models.registry import load_model

    def offline(where):
        raise ModelError(f"cannot download {where} from the Hugging Face hub (ConnectError): check the network")

    monkeypatch.setattr(hf, "download_hf", offline)
    with pytest.raises(ModelError, match="hf:alice/tracer: tried to download it as a published tracetune export: cannot download"):
        load_model("hf:alice/tracer")
    (tmp_path / "gguf").mkdir()
    monkeypatch.setattr(hf, "download_hf", lambda where: tmp_path / "gguf")
    with pytest.raises(ModelError, match="not a merged tracetune export"):
        load_model("hf:alice/tracer-gguf")
    with pytest.raises(ModelError, match="--model 'hf:alice': hf: takes OWNER/NAME"):
        load_model("hf:alice")
