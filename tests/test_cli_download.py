"""`aria download` / `models` / `rm` against a fake Hugging Face Hub on 127.0.0.1.

The fake Hub implements just what huggingface_hub's model_info and snapshot_download call:
  GET  /api/models/{repo}/revision/{rev}   repo info (sha, files and sizes)
  GET  /api/models/{repo}/tree/{rev}       file listing
  HEAD /{repo}/resolve/{rev}/{file}         metadata (X-Repo-Commit, ETag, Content-Length)
  GET  /{repo}/resolve/{rev}/{file}         content (with Range)
and counts every request, so "not fetched again" and "no network call" are checked by counting.
The model repo is tiny but real: an Aria config.json, two safetensors shards and their index
written with the `safetensors` library, plus files aria must not download.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from aria_cli.main import app

REPO = "tiny-org/tiny-aria"

TINY_CONFIG = {
    "model_type": "aria",
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "aria_text", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 8,
        "moe_num_experts": 4, "moe_topk": 2,
    },
    "vision_config": {"model_type": "idefics3_vision", "hidden_size": 8, "num_hidden_layers": 1,
                      "num_attention_heads": 2},
}


def tiny_repo_files(tmp: Path) -> dict[str, bytes]:
    """A two-shard Aria-shaped repo plus files aria must skip."""
    rng = np.random.default_rng(0)
    shard1 = {"a.weight": rng.standard_normal((64, 64)).astype(np.float32)}
    shard2 = {"b.weight": rng.standard_normal((64, 128)).astype(np.float32),
              "c.bias": rng.standard_normal(64).astype(np.float32)}
    files: dict[str, bytes] = {}
    for name, tensors in [("model-00001-of-00002.safetensors", shard1), ("model-00002-of-00002.safetensors", shard2)]:
        save_file(tensors, str(tmp / name))
        files[name] = (tmp / name).read_bytes()
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in shard2}
    index = {"metadata": {"total_size": sum(len(v) for v in files.values())}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["config.json"] = json.dumps(TINY_CONFIG).encode()
    files["generation_config.json"] = b'{"bos_token_id": 1, "eos_token_id": 2}'
    files["tokenizer.model"] = os.urandom(3000)
    files["tokenizer_config.json"] = b'{"add_bos_token": false}'
    files["special_tokens_map.json"] = b"{}"
    files["preprocessor_config.json"] = b'{"max_image_size": 980}'
    files["chat_template.jinja"] = b"{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # Not for aria: pickles, remote code, docs, the fast tokenizer (tokenizer.model is there), subfolders.
    skipped = {
        "pytorch_model.bin": b"pickle" * 100, "pytorch_model.bin.index.json": b"{}", "model.pt": b"pt" * 50,
        "modeling_aria.py": b"print('remote code')", "README.md": b"# tiny", "tokenizer.json": b"{}" * 100,
        ".gitattributes": b"*.safetensors filter=lfs", "images/example.png": b"\x89PNG",
    }
    return files | skipped


WANTED = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "preprocessor_config.json", "chat_template.jinja",
}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
        self.die_during: str | None = None  # file whose GET is cut half-way, after which the server dies
        self.stall_during: str | None = None  # file whose GET sends half, then hangs until `release`
        self.release = threading.Event()
        self.dead = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # -- content
    def publish(self, repo_id: str, files: dict[str, bytes]) -> str:
        """A new commit of `repo_id` holding `files`; returns its sha."""
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        commit = sha.hexdigest()
        self.repos[repo_id] = {"sha": commit, "files": dict(files)}
        return commit

    def file_gets(self, name: str | None = None) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and "/resolve/" in p
                   and (name is None or p.endswith("/" + name)))

    # -- server
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None and not self.dead.is_set():
            self.dead.set()
            self._server.shutdown()
            self._server.server_close()

    def _die(self) -> None:
        # Refuse new connections at once (server_close), like a crashed server.
        self.dead.set()
        threading.Thread(target=lambda: (self._server.shutdown(), self._server.server_close())).start()

    def _json(self, h, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        if self.dead.is_set():
            h.close_connection = True
            return
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, {k.lower(): v for k, v in h.headers.items()}))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if rest[1] not in ("main", repo["sha"]):
                return self._json(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            files = repo["files"]
            if rest[0] == "revision":
                siblings = [{"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
                            for n, b in files.items()]
                return self._json(h, 200, {"id": repo_id, "sha": repo["sha"], "siblings": siblings})
            if rest[0] == "tree":
                tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in files.items()]
                return self._json(h, 200, tree)
        if "resolve" in parts:
            i = parts.index("resolve")
            repo_id, rev, name = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:])
            repo = self.repos.get(repo_id)
            if repo is None or rev not in ("main", repo["sha"]) or name not in repo["files"]:
                return self._json(h, 404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["sha"] if repo else ""})
            body = repo["files"][name]
            start = 0
            if not head and h.headers.get("Range", "").startswith("bytes="):
                start = int(h.headers["Range"][6:].split("-")[0])
            h.send_response(206 if start else 200)
            h.send_header("X-Repo-Commit", repo["sha"])
            h.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            h.send_header("Content-Length", str(len(body) - start))
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            h.end_headers()
            if head:
                return
            if name == self.stall_during:
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                self.release.wait(60)
                h.close_connection = True
                return
            if name == self.die_during:
                h.wfile.write(body[start:start + (len(body) - start) // 2])
                h.wfile.flush()
                h.close_connection = True
                self._die()
                return
            h.wfile.write(body[start:])
            return
        self._json(h, 404, {"error": f"fake hub does not serve {path}"})


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A scratch HF cache and aria dirs; nothing from the real home leaks in."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN", "ARIA_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture
def hub(env, monkeypatch):
    hub = FakeHub().start()
    hub.publish(REPO, tiny_repo_files(env))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # aria passes the endpoint explicitly, but huggingface_hub also makes a best-effort call of its
    # own (the agent-harness registry, when building headers) to the endpoint it read at import.
    # Make its constants what HF_ENDPOINT would have given at import, so tests never contact the real Hub.
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield hub
    hub.stop()


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def aria_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m aria_cli ...` in a real process (its own imports, environment and exit code)."""
    return subprocess.run([sys.executable, "-m", "aria_cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def snapshot_dir(env: Path, commit: str) -> Path:
    return env / "hf" / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


def test_download_fetches_only_needed_files_and_prints_the_path(hub, env):
    result = run("download", REPO)
    assert result.exit_code == 0, result.stderr
    commit = hub.repos[REPO]["sha"]
    snap = snapshot_dir(env, commit)
    assert result.stdout.strip() == str(snap)  # stdout: just the path, for $(aria download ...)
    assert {p.name for p in snap.iterdir()} == WANTED
    for name in WANTED:  # byte-identical to what the Hub serves
        assert (snap / name).read_bytes() == hub.repos[REPO]["files"][name]
    fetched = {p.rsplit("/", 1)[1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == WANTED
    assert "downloaded and verified" in result.stderr


def test_download_json_is_one_object(hub, env):
    result = run("download", REPO, "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    obj = json.loads(result.stdout)
    assert result.stdout.count("\n") == 1
    assert obj["complete"] is True and obj["repo_id"] == REPO and set(obj["files"]) == WANTED
    assert obj["size_bytes"] == sum(len(hub.repos[REPO]["files"][n]) for n in WANTED)
    assert result.stderr == ""  # --quiet: nothing for people


def test_second_download_fetches_nothing_again(hub, env):
    assert run("download", REPO).exit_code == 0
    before = hub.file_gets()
    result = run("download", REPO)
    assert result.exit_code == 0, result.stderr
    assert hub.file_gets() == before


def test_server_dying_midway_never_reports_success_and_next_run_resumes(hub, env, monkeypatch):
    # huggingface_hub retries a broken transfer with 1 s sleeps; the retries still happen, instantly.
    monkeypatch.setattr(time, "sleep", lambda s: None)
    big = "model-00002-of-00002.safetensors"
    hub.die_during = big
    result = run("download", REPO)
    assert result.exit_code == 1
    assert "verified" not in result.stderr and result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: download of tiny-org/tiny-aria did not finish"), result.stderr
    assert last.endswith(f"run `aria download {REPO}` again to resume; completed files are kept")
    snap = snapshot_dir(env, hub.repos[REPO]["sha"])
    assert not (snap / big).exists()  # never a half file under the real name

    # The server comes back (same content, new address): only what is missing is fetched.
    revived = FakeHub().start()
    revived.repos = hub.repos
    monkeypatch.setenv("HF_ENDPOINT", revived.url)
    try:
        done_before = {p.name for p in snap.iterdir()} if snap.is_dir() else set()
        result = run("download", REPO)
        assert result.exit_code == 0, result.stderr
        fetched = {p.rsplit("/", 1)[1] for m, p, _ in revived.requests if m == "GET" and "/resolve/" in p}
        assert big in fetched
        assert fetched == WANTED - done_before  # completed files were not fetched again
        assert (snap / big).read_bytes() == hub.repos[REPO]["files"][big]
    finally:
        revived.stop()


def test_missing_shard_is_never_success_and_a_fixed_repo_completes(hub, env):
    files = tiny_repo_files(env)
    broken = {k: v for k, v in files.items() if k != "model-00002-of-00002.safetensors"}
    hub.publish(REPO, broken)
    result = run("download", REPO)
    assert result.exit_code == 1
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {REPO} is broken on the Hub at commit "), result.stderr
    assert "its index names model-00002-of-00002.safetensors but the repo does not contain it" in last
    assert "verified" not in result.stderr
    # Offline, the partial snapshot is not mistaken for a model.
    offline = run("download", REPO, "--offline")
    assert offline.exit_code == 1 and "only partly downloaded" in offline.stderr

    gets = hub.file_gets()
    fixed = hub.publish(REPO, files)  # the repo is fixed in a new commit
    result = run("download", REPO)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(snapshot_dir(env, fixed))
    assert hub.file_gets() - gets == 1 and hub.file_gets("model-00002-of-00002.safetensors") == 1


@pytest.mark.parametrize(("stop", "code", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_stops_at_once_in_a_real_process_and_leaves_no_partial_files(hub, env, stop, code, said):
    big = "model-00002-of-00002.safetensors"
    hub.stall_during = big
    proc = subprocess.Popen([sys.executable, "-m", "aria_cli", "download", REPO], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    blobs = env / "hf" / "hub" / ("models--" + REPO.replace("/", "--")) / "blobs"
    etag = hashlib.sha256(hub.repos[REPO]["files"][big]).hexdigest()  # huggingface_hub names blobs by ETag

    def half_there() -> bool:
        # The .incomplete file appears before the GET is sent: wait for the hub to see the GET
        # too, or Ctrl-C may land before the first transfer started (then only one GET is made).
        return hub.file_gets(big) == 1 and bool(list(blobs.glob(f"{etag}*.incomplete")))

    deadline = time.monotonic() + 30
    while not half_there() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert half_there()
    proc.send_signal(stop)
    # Without the immediate exit this would hang until the stalled transfer is released (never, here).
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert err.splitlines()[-2:] == [f"completed files are kept; run `aria download {REPO}` again to resume", said]
    assert out == ""
    hub.stall_during = None
    hub.release.set()
    result = run("download", REPO)
    assert result.exit_code == 0, result.stderr
    assert hub.file_gets(big) == 2
    assert not list(blobs.glob("*.incomplete"))  # the interrupted run's partial files are swept


def test_orphaned_partials_are_swept_but_locked_ones_kept(hub, env):
    from filelock import FileLock

    storage = env / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True)
    orphan = storage / "blobs" / "aaaa.1234abcd.incomplete"
    owned = storage / "blobs" / "bbbb.5678abcd.incomplete"
    resumable = storage / "blobs" / "cccc.incomplete"  # older huggingface_hub resumes these: keep
    for path in (orphan, owned, resumable):
        path.write_bytes(b"partial")
    lock = env / "hf" / "hub" / ".locks" / storage.name / "bbbb.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # another process downloading `bbbb` holds its lock
        [sys.executable, "-c", (f"import filelock, time\nwith filelock.FileLock({str(lock)!r}):\n"
                               "    print('locked', flush=True)\n    time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run("download", REPO).exit_code == 0
        assert not orphan.exists() and owned.exists() and resumable.exists()
    finally:
        holder.kill()
        holder.wait()
    assert FileLock(str(lock), timeout=0).acquire()  # released with its process


def test_offline_flag_makes_no_request(hub, env):
    result = run("download", REPO, "--offline")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: model {REPO} is not downloaded; run `aria download {REPO}` (or drop --offline)\n"
    )
    assert hub.requests == []
    assert run("download", REPO).exit_code == 0
    hub.requests.clear()
    result = run("download", REPO, "--offline")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(snapshot_dir(env, hub.repos[REPO]["sha"]))
    assert hub.requests == []


def test_hf_hub_offline_env_makes_no_request_in_a_real_process(hub, env):
    environ = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = aria_process("download", REPO, env=environ)
    assert proc.returncode == 1
    assert proc.stderr == f"error: model {REPO} is not downloaded; run `aria download {REPO}` (or drop --offline)\n"
    assert proc.stdout == ""
    assert hub.requests == []


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_online_wins_over_the_hubs_offline_variables_in_a_real_process(hub, env, variable):
    """Either variable makes aria offline; --online undoes it, though huggingface_hub read the
    variable at import and would refuse every request on its own."""
    environ = {**os.environ, variable: "1"}
    offline = aria_process("download", REPO, env=environ)
    assert offline.returncode == 1 and "is not downloaded" in offline.stderr and hub.requests == []
    online = aria_process("download", REPO, "--online", env=environ)
    assert online.returncode == 0, online.stderr
    assert online.stdout.strip() == str(snapshot_dir(env, hub.repos[REPO]["sha"]))


def test_real_process_download_honours_hf_home_and_hf_token(hub, env):
    environ = {**os.environ, "HF_TOKEN": "hf_secret123", "HF_HOME": str(env / "elsewhere")}
    proc = aria_process("download", REPO, env=environ)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(env / "elsewhere" / "hub"))
    file_requests = [h for _, p, h in hub.requests if REPO in p]
    assert file_requests and all(h.get("authorization") == "Bearer hf_secret123" for h in file_requests)


def test_hf_home_that_is_a_file_is_named_not_blamed_on_the_network(hub, env, monkeypatch):
    afile = env / "afile"
    afile.write_text("not a directory\n")
    proc = aria_process("download", REPO, env={**os.environ, "HF_HOME": str(afile)})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"error: cannot use the Hugging Face cache: Not a directory ({afile / 'token'}); "
                           "set HF_HOME (or HF_HUB_CACHE) to a directory you can write to\n")
    # In this process huggingface_hub read HF_HOME at import, so the cache directory is what fails.
    monkeypatch.setenv("HF_HOME", str(afile))
    result = run("download", REPO)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (f"error: cannot use the Hugging Face cache: Not a directory "
                                              f"({afile / 'hub'}); set HF_HOME (or HF_HUB_CACHE) to a directory you "
                                              "can write to")


def test_unknown_repo_and_revision_are_one_line_errors(hub, env):
    result = run("download", "tiny-org/nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no model tiny-org/nope on ") and result.stderr.count("\n") == 1
    result = run("download", REPO, "--revision", "v9")
    assert result.exit_code == 1 and "has no revision 'v9'" in result.stderr


def test_repo_without_safetensors_is_refused_before_downloading(hub, env):
    hub.publish("tiny-org/pickles", {"config.json": b"{}", "pytorch_model.bin": b"x" * 10, "tokenizer.model": b"t"})
    result = run("download", "tiny-org/pickles")
    assert result.exit_code == 1 and "no .safetensors weights" in result.stderr
    assert hub.file_gets() == 0


def test_models_lists_download_with_size_and_rm_removes_it(hub, env):
    assert run("download", REPO).exit_code == 0
    listing = run("models", "--json")
    assert listing.exit_code == 0, listing.stderr
    # The demo model ships with the package and is always listed; the download is the other one.
    (entry,) = [m for m in json.loads(listing.stdout)["models"] if m["name"] != "demo"]
    expected_size = sum(len(hub.repos[REPO]["files"][n]) for n in WANTED)
    assert entry["name"] == REPO and entry["size_bytes"] == expected_size and entry["complete"] is True
    assert entry["variant"] == "bfloat16"
    table = run("models")  # not a terminal: tab-separated plain text, no colour codes
    assert "\x1b[" not in table.stdout
    rows = [line.split("\t")[:2] for line in table.stdout.splitlines()[1:]]
    assert [REPO, "bfloat16"] in rows

    repo_dir = env / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    declined = run("rm", REPO, input="n\n")
    assert declined.exit_code == 1 and repo_dir.is_dir()
    assert "remove tiny-org/tiny-aria" in declined.stderr and "[y/N]" in declined.stderr
    assert declined.stdout.strip() == "n"  # CliRunner echoes the typed answer; the prompt is on stderr
    accepted = run("rm", REPO, input="y\n")
    assert accepted.exit_code == 0 and not repo_dir.exists()
    assert [m["name"] for m in json.loads(run("models", "--json").stdout)["models"]] == ["demo"]


def test_rm_yes_removes_without_asking(hub, env):
    assert run("download", REPO).exit_code == 0
    result = run("rm", REPO, "--yes")
    assert result.exit_code == 0 and "remove " not in result.stderr.split("removed")[0]
    assert not (env / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))).exists()
