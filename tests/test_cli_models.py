"""Model names -> directories, completeness checks, listing and removal, without any network.

Hub caches are laid out by hand following the documented HF cache format
(models--org--name/{refs/main, snapshots/<commit>/...}); HF_ENDPOINT points at a closed port so any
attempt to reach the network would fail loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_cli_download import TINY_CONFIG, WANTED, tiny_repo_files
from typer.testing import CliRunner
from user_env import isolate_user_env

from aria_cli import models
from aria_cli.download import select_files
from aria_cli.main import app
from aria_cli.models import parse_model, quantized_model_dir, resolve_model_dir
from aria_cli.snapshot_check import snapshot_problems
from runtime.errors import ModelNotFoundError, UsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def env(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_checkpoint(folder: Path, scratch: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    for name, data in tiny_repo_files(scratch).items():
        if name in WANTED:
            (folder / name).write_bytes(data)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_cached_repo(env: Path, repo_id: str, shared_blobs: bool = False) -> Path:
    """A complete snapshot in the HF cache layout: blobs, a snapshot of symlinks, refs/main.

    `shared_blobs`: as huggingface_hub 2 stores Xet downloads, each repo blob a link into the
    cache-wide store (laid out by the library itself)."""
    from huggingface_hub.utils._shared_blobs import publish_blob_to_shared_store

    repo = env / "hf" / "hub" / ("models--" + repo_id.replace("/", "--"))
    staged = write_checkpoint(env / "staged" / repo.name, env / "scratch" / repo.name)
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(staged.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        file.rename(blob)
        if shared_blobs:
            assert publish_blob_to_shared_store(blob_path=str(blob), xet_hash=blob.name, cache_dir=env / "hf" / "hub",
                                                expected_size=len(data))
            assert blob.is_symlink()
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_parse_model_names(env):
    assert parse_model("aria") == models.ModelRef("aria", "hub", repo_id="rhymes-ai/Aria")
    assert parse_model("rhymes-ai/Aria-Chat").repo_id == "rhymes-ai/Aria-Chat"
    assert parse_model("aria-int4").path == env / "data" / "aria" / "models" / "aria-int4"
    assert parse_model("aria-int8").kind == "managed"
    assert parse_model("demo").path == models.DEMO_MODEL_DIR
    (env / "ckpt").mkdir()
    assert parse_model("ckpt") == models.ModelRef("ckpt", "local", path=env / "ckpt")
    assert parse_model("./ckpt").path == env / "ckpt"
    with pytest.raises(ModelNotFoundError, match=r"^no such directory: \./missing$"):
        parse_model("./missing")
    with pytest.raises(ModelNotFoundError, match=r"^unknown model 'llama3'; give a Hub repo id"):
        parse_model("llama3")
    with pytest.raises(UsageError):
        parse_model("  ")


def test_demo_resolves_to_the_bundled_directory(env, monkeypatch):
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", env / "pkg" / "demo_model")
    with pytest.raises(ModelNotFoundError, match="demo model is not installed"):
        resolve_model_dir("demo", offline=True)
    (env / "pkg" / "demo_model").mkdir(parents=True)
    assert resolve_model_dir("demo", offline=True) == env / "pkg" / "demo_model"


def test_quantized_alias_resolves_under_the_data_dir(env):
    with pytest.raises(ModelNotFoundError, match=r"^aria-int4 is not on this machine .*`aria quantize aria --scheme int4`$"):
        resolve_model_dir("aria-int4", offline=False)
    target = quantized_model_dir("int4")
    assert target == env / "data" / "aria" / "models" / "aria-int4"
    write_checkpoint(target, env / "scratch")
    assert resolve_model_dir("aria-int4", offline=True) == target


def test_hub_model_offline_uses_the_cache_or_says_how_to_get_it(env):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir("aria", offline=True)
    assert str(info.value) == "model aria is not downloaded; run `aria download aria` (or drop --offline)"
    snapshot = write_cached_repo(env, "rhymes-ai/Aria")
    assert resolve_model_dir("aria", offline=True) == snapshot
    # Online too: a complete snapshot is used without asking the Hub (HF_ENDPOINT is a dead port).
    assert resolve_model_dir("rhymes-ai/Aria", offline=False) == snapshot
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"only partly downloaded \(model-00002-of-00002.safetensors is missing"):
        resolve_model_dir("aria", offline=True)


def test_snapshot_problems_catch_every_kind_of_incomplete(env):
    folder = write_checkpoint(env / "ckpt", env / "scratch")
    assert snapshot_problems(folder) == []
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert snapshot_problems(folder, sizes) == []

    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])  # truncated: the safetensors header no longer covers the file
    assert snapshot_problems(folder) == ["model-00001-of-00002.safetensors is truncated or corrupt"]
    assert f"model-00001-of-00002.safetensors has {len(data) - 10} of {len(data)} bytes" in snapshot_problems(folder, sizes)
    shard.write_bytes(data)

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert snapshot_problems(folder) == [
        "model-00001-of-00002.safetensors lacks 1 tensor(s) the index names, e.g. ghost.weight"
    ]
    (folder / "tokenizer.model").unlink()
    (folder / "config.json").write_text("{not json")
    assert snapshot_problems(folder)[:2] == ["config.json is not valid JSON", "tokenizer.model is missing"]


def test_select_files_keeps_what_aria_reads():
    listing = dict.fromkeys(WANTED, 1) | {
        "pytorch_model.bin": 1, "pytorch_model.bin.index.json": 1, "model.pt": 1, "modeling_aria.py": 1,
        "README.md": 1, "tokenizer.json": 1, "images/example.png": 1, "sub/config.json": 1,
    }
    assert set(select_files(listing)) == WANTED
    without_spm = {k: v for k, v in listing.items() if k != "tokenizer.model"}
    assert set(select_files(without_spm)) == (WANTED - {"tokenizer.model"}) | {"tokenizer.json"}


def test_models_lists_cache_and_local_quantized_and_skips_other_models(env, monkeypatch):
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", env / "no-demo")
    write_cached_repo(env, "rhymes-ai/Aria")
    other = write_cached_repo(env, "someone/bert")  # not an Aria config: not listed
    (other / "config.json").unlink()
    (other / "config.json").write_text('{"model_type": "bert"}')
    quant_config = dict(TINY_CONFIG, quantization={"scheme": "int4", "group_size": 128})
    write_checkpoint(quantized_model_dir("int4"), env / "s3", config=quant_config)

    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.stderr
    listed = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert set(listed) == {"rhymes-ai/Aria", "aria-int4"}
    assert listed["aria-int4"]["variant"] == "int4" and listed["rhymes-ai/Aria"]["variant"] == "bfloat16"
    local = quantized_model_dir("int4")
    assert listed["aria-int4"]["size_bytes"] == sum(p.stat().st_size for p in local.iterdir())
    assert listed["aria-int4"]["path"] == str(local) and listed["aria-int4"]["complete"] is True


def test_rm_managed_model_and_refusals(env, monkeypatch):
    target = write_checkpoint(quantized_model_dir("int8"), env / "scratch")
    runner = CliRunner()
    for answer, said in [("", "error: no answer on standard input; pass --yes to remove without asking"),
                         ("n\n", "kept aria-int8")]:  # stdin ended before an answer; a "no"
        result = runner.invoke(app, ["rm", "aria-int8"], input=answer)
        assert result.exit_code == 1 and result.stderr.splitlines()[-1].endswith(said), result.stderr
        assert target.is_dir()
    result = runner.invoke(app, ["rm", "aria-int8", "--yes", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(target) and not target.exists()
    result = runner.invoke(app, ["rm", "aria-int8", "-y"])
    assert result.exit_code == 1
    assert result.stderr == "error: model aria-int8 is not on this machine; nothing to remove (see `aria models`)\n"
    result = runner.invoke(app, ["rm", "demo", "-y"])
    assert result.exit_code == 2 and result.stderr == (
        "error: the demo model is part of the aria package and cannot be removed\n"
    )
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", env / "no-demo")
    assert runner.invoke(app, ["models"]).stderr == "no models yet; get one with `aria download aria`\n"


def test_download_refuses_local_names(env):
    result = CliRunner().invoke(app, ["download", "aria-int4"])
    assert result.exit_code == 2
    assert result.stderr == "error: aria-int4 is made locally by `aria quantize`; there is nothing to download\n"


def test_rm_frees_weights_kept_in_the_hubs_shared_blob_store(env):
    """huggingface_hub 2 keeps Xet downloads in one store for the whole cache; a repo's blobs are
    links into it. Deleting the repo folder alone would leave the weights on disk: aria rm deletes
    through the library and reports what that frees."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils._shared_blobs import shared_store_blob_paths

    cache = env / "hf" / "hub"
    snapshot = write_cached_repo(env, "rhymes-ai/Aria", shared_blobs=True)
    weights = sum(f.stat().st_size for f in snapshot.iterdir())  # through the links
    assert len(shared_store_blob_paths(cache)) == len(list(snapshot.iterdir()))
    listed = CliRunner().invoke(app, ["models", "--json"])
    assert [m["size_bytes"] for m in json.loads(listed.stdout)["models"] if m["name"] == "rhymes-ai/Aria"] == [weights]
    result = CliRunner().invoke(app, ["rm", "aria", "--yes", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["size_bytes"] == weights
    assert not snapshot.exists() and shared_store_blob_paths(cache) == set()
    assert scan_cache_dir(cache).size_on_disk == 0


@pytest.mark.parametrize("variables", [
    {"HF_HUB_CACHE": "~/hubcache"},
    {"HUGGINGFACE_HUB_CACHE": "$MYROOT/legacy"},
    {"HF_HOME": "$MYROOT/hf"},
    {"HF_HUB_CACHE": "/a/b", "HUGGINGFACE_HUB_CACHE": "/c/d", "HF_HOME": "/e"},
    {"XDG_CACHE_HOME": "/x/cache"},
], ids=["hf_hub_cache", "legacy", "hf_home", "precedence", "xdg"])
def test_the_cache_is_where_huggingface_hub_itself_looks(monkeypatch, tmp_path, variables):
    import subprocess
    import sys

    from aria_cli.hub import hub_cache_dir

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MYROOT", "/root-of-mine")
    for var, value in variables.items():
        monkeypatch.setenv(var, value)
    library = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert hub_cache_dir() == Path(library)
