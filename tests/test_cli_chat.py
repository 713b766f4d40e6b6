"""`aria chat` driven like a person would: in a real pseudo-terminal (pexpect), with a tiny model.

One chat process runs the whole session below once (starting Python with torch costs seconds);
each test then checks one part of what the terminal showed and of the transcripts it saved.

What the chat answers is checked against the runtime's Assistant run in this process on the same
checkpoint and the same conversation, step by step in the same order (so the KV cache is reused
at the same points): the chat must pass the conversation, its images, the system prompt and
every /set value through unchanged. The runtime itself is checked against transformers in
test_assistant.py. Transcripts are read back with the json module.

The tiny model's output layer gets zero rows for the stop tokens, so (greedy) it never ends an
answer by itself: answers run to the token limit, long enough to be cut off with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from aria_cli.main import app
from runtime.assistant import Assistant, Conversation, GenerationOptions
from runtime.config import load_config
from runtime.image_sources import load_image
from runtime.sampling import SamplingParams
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint
from runtime.tokenizer import Tokenizer

PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
GREEDY = GenerationOptions(max_tokens=8)
SAMPLED = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4096 positions: room for an answer long enough to be interrupted even on a fast machine.
    config = tiny_config(max_position_embeddings=4096)
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("chat_model"), seed=5, config=config)
    stop_ids = Tokenizer.from_dir(folder, load_config(folder)).stop_ids
    weights = load_file(folder / "model.safetensors")
    for token in stop_ids:
        weights["language_model.lm_head.weight"][token] = 0.0  # logit 0: never the largest of 512
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    return Assistant.open(model_dir)


def make_home(folder: Path) -> Path:
    for colour in ("red", "blue", "green"):
        picture = Image.new("RGB", (320, 200), "white")
        picture.paste(Image.new("RGB", (160, 80), colour), (80, 60))
        picture.save(folder / f"{colour}.png")
    (folder / "notes.txt").write_text("shopping list\n")
    return folder


def chat_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARIA_")}
    env.update(XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"), HF_HOME=str(home / "hf"),
               HF_HUB_OFFLINE="1", TERM="xterm", PYTHONUNBUFFERED="1")
    return env


def answer(assistant: Assistant, chat: Conversation, options: GenerationOptions) -> str:
    text = assistant.reply(chat, options).read()
    chat.add("assistant", text)
    return text


@dataclass
class Expected:
    """The reference's answers, computed in the order the session asks its questions."""

    answers: list[str] = field(default_factory=list)
    stop: str = ""
    unstopped: str = ""


@pytest.fixture(scope="module")
def expected(reference, tmp_path_factory) -> Expected:
    pictures = make_home(tmp_path_factory.mktemp("pictures"))
    red, blue, green = (load_image(pictures / f"{c}.png") for c in ("red", "blue", "green"))
    out = Expected()
    reference.reset()
    first = Conversation()
    first.add("user", "What is in the picture?", [red])
    out.answers.append(answer(reference, first, GREEDY))
    first.add("user", "And what about blue.png?", [blue])
    out.answers.append(answer(reference, first, GREEDY))
    reference.reset()  # /clear
    second = Conversation()
    second.add("user", "What now?\nSay more.", [green])
    out.answers.append(answer(reference, second, GREEDY))
    second.set_system("Answer briefly.")
    second.add("user", "Tell me a story.")
    out.unstopped = reference.reply(second, GenerationOptions(max_tokens=12, sampling=SAMPLED)).read()
    # A stop string the sampled answer contains after its start, typed with /set stop.
    out.stop = next((m.group() for m in re.finditer(r"[a-z]{2}", out.unstopped) if m.start() > 0), "")
    assert out.stop, f"the sampled answer {out.unstopped!r} needs two letters to stop at; pick another seed"
    out.answers.append(answer(reference, second, GenerationOptions(max_tokens=12, sampling=SAMPLED,
                                                                   stop=(out.stop,))))
    reloaded = Conversation()  # first.json loaded after blue.png went away
    reloaded.add("user", "What is in the picture?", [red])
    reloaded.add("assistant", out.answers[0])
    reloaded.add("user", "And what about blue.png?")
    reloaded.add("assistant", out.answers[1])
    reloaded.add("user", "Go on.")
    out.answers.append(answer(reference, reloaded, GREEDY))
    return out


@dataclass
class Session:
    home: Path
    screens: dict[str, str]  # what the terminal showed after each step, by step name
    exit_status: int | None

    def transcript(self, name: str) -> dict:
        return json.loads((self.home / name).read_text(encoding="utf-8"))


class Terminal:
    def __init__(self, model_dir: Path, home: Path):
        self.child = pexpect.spawn(
            sys.executable, ["-m", "aria_cli", "chat", "-m", str(model_dir), "-n", "8"], cwd=str(home),
            env=chat_env(home), encoding="utf-8", timeout=60, dimensions=(50, 200),
        )
        self.child.delaybeforesend = None  # pexpect waits 50 ms before each send by default
        self.child.logfile_read = open(home / "screen.log", "w")  # noqa: SIM115 - kept for failures
        self.screens: dict[str, str] = {}
        self.child.expect_exact(PROMPT)
        self.screens["start"] = self.shown()

    def shown(self) -> str:
        return ANSI.sub("", self.child.before)

    def say(self, line: str, step: str | None = None) -> str:
        """Type a line, wait for the next prompt; what was shown in between is kept under `step`."""
        self.child.sendline(line)
        self.child.expect_exact(PROMPT)
        self.screens[step or line] = self.shown()
        return self.screens[step or line]

    def wait_for_answer_text(self) -> None:
        """Return once an answer has begun to show (more than cursor and colour codes)."""
        shown = ""
        while not ANSI.sub("", shown).strip():
            shown += self.child.read_nonblocking(4096, timeout=30)


@pytest.fixture(scope="module")
def session(model_dir, expected, tmp_path_factory) -> Session:
    home = make_home(tmp_path_factory.mktemp("chat_home"))
    red, blue, green = (str(home / f"{c}.png") for c in ("red", "blue", "green"))
    term = Terminal(model_dir, home)
    # Two turns about two pictures: one by /image, one named in the message.
    term.say(f"/image {red}", "image")
    term.say("What is in the picture?")
    term.say("/stats", "stats 1")
    term.say("And what about blue.png?")
    term.say("/stats", "stats 2")
    term.say("/save first.json")
    # Mistakes.
    term.say(f"/imgae {red}")
    term.say("/image missing.png")
    term.say("/image notes.txt")
    term.say("/set temperature -1")
    term.say("/set colour red")
    # A new conversation: a multi-line message, a system prompt, every sampling setting.
    term.say("/clear")
    term.say(f"/image {green}")
    term.child.sendline('"""What now?')
    term.child.expect_exact("... ")
    term.say('Say more."""', "multi-line")
    term.say("/system Answer briefly.")
    for line in ["/set temperature 0.7", "/set top-p 0.9", "/set top-k 40", "/set seed 7", "/set max-tokens 12",
                 f'/set stop "{expected.stop}"']:
        term.say(line, line.split()[1])
    term.say("/stats", "stats 3")
    term.say("Tell me a story.")
    term.say("/save second.json")
    # Loading the first conversation back, one of its pictures gone.
    os.rename(blue, home / "blue-moved.png")
    term.say("/load first.json")
    term.say("Go on.")
    term.say("/save third.json")
    # Ctrl-C: during an answer, on an empty line, on a line with text.
    term.say("/clear", "clear again")
    term.say("/set max-tokens 3000")
    term.child.sendline("Tell me a long story.")
    term.child.expect_exact("Tell me a long story.")
    term.wait_for_answer_text()
    term.child.sendintr()
    term.child.expect_exact(PROMPT)
    term.screens["cut"] = term.shown()
    term.say("/stats", "stats 4")
    term.child.sendintr()
    term.child.expect_exact(PROMPT)
    term.screens["ctrl-c on an empty line"] = term.shown()
    term.child.send("half a thought")
    time.sleep(0.2)  # let readline take the characters before the interrupt
    term.child.sendintr()
    term.child.expect_exact(PROMPT)
    term.screens["ctrl-c on a typed line"] = term.shown()
    term.say("/set max-tokens 8", "max-tokens 8")
    term.say("Go on.", "go on after the cut")
    term.say("/save cut.json")
    # Ctrl-D leaves.
    term.child.sendeof()
    term.child.expect(pexpect.EOF)
    term.child.close()
    return Session(home, term.screens, term.child.exitstatus)


def prompt_counts(stats: str) -> tuple[int, int]:
    match = re.search(r"prompt: (\d+) tokens? \((\d+) prefilled\)", stats)
    assert match, stats
    return int(match.group(1)), int(match.group(2))


def turns(saved: dict) -> list[tuple]:
    return [(t["role"], t["text"], t["images"], t["interrupted"]) for t in saved["turns"]]


def test_two_turns_with_pictures_and_the_cache_reused(session, expected, model_dir):
    red, blue = str(session.home / "red.png"), str(session.home / "blue.png")
    assert "Chatting with" in session.screens["start"]
    assert f"Added image {red} (320x200); it goes with your next message" in session.screens["image"]
    assert "Added image blue.png" in session.screens["And what about blue.png?"]
    prompt, prefilled = prompt_counts(session.screens["stats 1"])
    assert prefilled == prompt
    prompt, prefilled = prompt_counts(session.screens["stats 2"])
    assert 0 < prefilled < prompt  # the first turn came from the cache
    first = session.transcript("first.json")
    assert first["format"] == "aria-chat" and first["version"] == 1 and first["model"] == str(model_dir)
    assert turns(first) == [
        ("user", "What is in the picture?", [red], False), ("assistant", expected.answers[0], [], False),
        ("user", "And what about blue.png?", [blue], False), ("assistant", expected.answers[1], [], False),
    ]


def test_mistakes_are_one_line_and_the_chat_goes_on(session):
    screens = session.screens
    assert "error: unknown command /imgae; commands: /image, /system, /set, /clear" in screens[
        f"/imgae {session.home / 'red.png'}"]
    assert "error: image missing.png does not exist" in screens["/image missing.png"]
    assert "error: notes.txt is a text file, not an image" in screens["/image notes.txt"]
    assert "error: /set temperature must be >= 0 (got -1)" in screens["/set temperature -1"]
    assert "error: unknown setting 'colour'" in screens["/set colour red"]
    for step in ("/image missing.png", "/image notes.txt", "/set temperature -1"):
        assert len([line for line in screens[step].splitlines() if line.strip()]) == 2  # the echo and the error


def test_system_prompt_multi_line_message_and_every_setting(session, expected):
    stop = expected.stop
    for name, shown in [("temperature", "0.7"), ("top-p", "0.9"), ("top-k", "40"), ("seed", "7"),
                        ("max-tokens", "12"), ("stop", f'["{stop}"]')]:
        assert f"{name} = {shown}" in session.screens[name]
    assert (f'settings: max-tokens 12, temperature 0.7, top-p 0.9, top-k 40, seed 7, stop ["{stop}"]'
            in session.screens["stats 3"])
    assert "conversation cleared" in session.screens["/clear"]
    assert "system prompt set" in session.screens["/system Answer briefly."]
    second = session.transcript("second.json")
    assert second["system"] == "Answer briefly."
    assert second["settings"] == {"max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7,
                                  "stop": [stop]}
    green = str(session.home / "green.png")
    # The sampled answer is the reference's with the same seed and settings, cut where the stop string starts.
    assert turns(second) == [
        ("user", "What now?\nSay more.", [green], False), ("assistant", expected.answers[2], [], False),
        ("user", "Tell me a story.", [], False), ("assistant", expected.answers[3], [], False),
    ]
    assert expected.answers[3] == expected.unstopped[: expected.unstopped.index(stop)]


def test_load_reopens_pictures_says_which_are_gone_and_goes_on(session, expected):
    loaded = session.screens["/load first.json"]
    assert "warning: image left out, turn 3: image" in loaded and "blue.png does not exist" in loaded
    assert "loaded 4 turn(s) from first.json; 1 image(s) could not be opened" in loaded
    third = session.transcript("third.json")
    # The settings and system prompt came back from first.json too.
    assert third["system"] is None and third["settings"]["max_tokens"] == 8 and third["settings"]["seed"] is None
    assert turns(third) == [
        ("user", "What is in the picture?", [str(session.home / "red.png")], False),
        ("assistant", expected.answers[0], [], False),
        ("user", "And what about blue.png?", [], False), ("assistant", expected.answers[1], [], False),
        ("user", "Go on.", [], False), ("assistant", expected.answers[4], [], False),
    ]


def test_ctrl_c_cuts_the_answer_keeps_it_and_the_chat_goes_on(session, reference):
    assert "[answer cut off]" in session.screens["cut"]
    assert "to leave, type /exit or press Ctrl-D" in session.screens["ctrl-c on an empty line"]
    assert "to leave" not in session.screens["ctrl-c on a typed line"]
    answered = int(re.search(r"answer: (\d+) tokens?,", session.screens["stats 4"]).group(1))
    assert 0 < answered < 3000
    saved = session.transcript("cut.json")["turns"]
    assert [(t["role"], t["interrupted"]) for t in saved] == [
        ("user", False), ("assistant", True), ("user", False), ("assistant", False)]
    assert saved[0]["text"] == "Tell me a long story." and saved[2]["text"] == "Go on."
    # The cut-off answer is what the model says, up to where it was stopped.
    chat = Conversation()
    chat.add("user", "Tell me a long story.")
    reference.reset()
    full = reference.reply(chat, GenerationOptions(max_tokens=answered)).read()
    assert saved[1]["text"] and full.startswith(saved[1]["text"])
    # The follow-up sees the cut-off answer as it was kept.
    chat.add("assistant", saved[1]["text"], interrupted=True)
    chat.add("user", "Go on.")
    reference.reset()
    assert saved[3]["text"] == reference.reply(chat, GenerationOptions(max_tokens=8)).read()


def test_ctrl_d_exits_0_and_the_history_is_kept(session):
    assert session.exit_status == 0
    history = (session.home / "data" / "aria" / "chat_history").read_text(encoding="utf-8").splitlines()
    assert "/stats" in history and "/save first.json" in history and "half a thought" not in history


def test_piped_chat_writes_only_answers_to_stdout(model_dir, reference, tmp_path, monkeypatch):
    # In this process through Typer's runner: stdin and stdout are not terminals, stderr is apart.
    for var, value in chat_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    chat = Conversation()
    chat.add("user", "Hello there")
    reference.reset()
    expected = reference.reply(chat, GenerationOptions(max_tokens=6)).read()
    result = CliRunner().invoke(app, ["chat", "-m", str(model_dir), "-n", "6"],
                                input="Hello there\n/stats\n/exit\nnever asked\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + ("" if expected.endswith("\n") else "\n")
    assert "Chatting with" in result.stderr and "prompt: " in result.stderr and PROMPT not in result.stdout


def test_bad_text_and_values_are_one_line_each_and_the_chat_goes_on(model_dir, reference, tmp_path, monkeypatch):
    """Bytes that are not UTF-8 (in a message, a /system, a saved chat) and out-of-range /set values
    are refused when typed; the next message is answered as if they had never been typed."""
    for var, value in chat_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    saved = tmp_path / "odd.json"  # a hand-edited transcript: a JSON escape of a lone surrogate
    saved.write_text('{"format": "aria-chat", "version": 1, "turns": [{"role": "user", "text": "a\\udcffb"}]}')
    chat = Conversation()
    chat.add("user", "Hello there")
    reference.reset()
    expected = reference.reply(chat, GenerationOptions(max_tokens=6)).read()
    typed = (b"What \xff is this?\n/system \xfe\n/set seed 99999999999999999999999\n/set temperature inf\n"
             b"/load " + str(saved).encode() + b"\nHello there\n/exit\n")
    result = CliRunner().invoke(app, ["chat", "-m", str(model_dir), "-n", "6"], input=typed)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + ("" if expected.endswith("\n") else "\n")
    hint = "write it in UTF-8 (check the encoding of your terminal or file)"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the message is not UTF-8 text (byte 0xff); {hint}",
        f"error: the system prompt is not UTF-8 text (byte 0xfe); {hint}",
        "error: /set seed must be at most 18446744073709551615 (got 99999999999999999999999)",
        "error: /set temperature must be a finite number (got inf)",
        f"error: a user turn in {saved} is not UTF-8 text (byte 0xff); {hint}",
    ]


def test_a_model_that_fails_to_load_ends_the_chat_with_one_line(model_dir, tmp_path, monkeypatch):
    for var, value in chat_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    runner = CliRunner()
    for model, needle in [(str(tmp_path / "nowhere"), "no such directory"), (str(broken), "model.safetensors")]:
        result = runner.invoke(app, ["chat", "-m", model])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0]
    result = runner.invoke(app, ["chat", "-m", str(model_dir), "--json"])
    assert result.exit_code == 2 and "--json is for `aria ask`" in result.stderr



def test_a_closed_stdin_is_one_line_before_any_model_loads(tmp_path):
    command = [sys.executable, "-m", "aria_cli", "chat", "-m", str(tmp_path / "nowhere")]  # never opened
    result = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *command], env={**os.environ, **chat_env(tmp_path)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", ("error: aria chat reads your messages from standard input, which is closed; run it in a "
                "terminal or pipe the messages in\n"))


@pytest.fixture(scope="module")
def short_model_dir(model_dir, tmp_path_factory):
    """The chat model taking at most 80 positions: its context fills within a short answer."""
    folder = tmp_path_factory.mktemp("short_model") / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("max_context, max_tokens, says", [
    (48, 500, "[stopped: the context is full; /clear starts afresh, or start the chat with a larger --max-context]"),
    (80, 500, "[stopped: the context is full; /clear starts afresh]"),  # already the model's maximum
    (80, 7, "[stopped at 7 tokens; /set max-tokens N allows longer answers]"),
])
def test_an_answer_cut_short_says_whether_the_context_or_the_token_limit_did_it(
        short_model_dir, tmp_path, monkeypatch, max_context, max_tokens, says):
    for var, value in chat_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    chat = Conversation()
    chat.add("user", "Hello there")
    reference = Assistant.open(short_model_dir, max_context=max_context)
    expected = reference.reply(chat, GenerationOptions(max_tokens=max_tokens)).read()
    result = CliRunner().invoke(app, ["chat", "-m", str(short_model_dir), "-n", str(max_tokens),
                                      "--max-context", str(max_context)], input="Hello there\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + ("" if expected.endswith("\n") else "\n")
    assert says in result.stderr.splitlines()
