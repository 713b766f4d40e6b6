"""The pieces of `aria chat` that need no model: the line parser, image paths found in a message,
`/set` values, the JSON transcript written by /save and read by /load, and triple-quote blocks.

Expected values are written by hand (the JSON document, the parsed settings); images are real
files made with Pillow, and the transcript is read back with the json module.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from user_env import isolate_user_env

from aria_cli.chat_commands import COMMANDS, Command, help_lines, image_paths_in, parse_command
from aria_cli.chat_settings import NAMES, changed, settings_json, shown
from aria_cli.chat_transcript import load_transcript, save_transcript, transcript_json
from aria_cli.options import RunOptions
from aria_cli.settings import SETTINGS
from runtime.assistant import Conversation
from runtime.errors import ImageError, UsageError


def default_options(**changes) -> RunOptions:
    values = {f.name: SETTINGS[f.name].default for f in dataclasses.fields(RunOptions)}
    return RunOptions(**{**values, **changes})


# --- the line parser ------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("/image cat.png", Command("image", "cat.png")),
    ('/image "my cat.png"', Command("image", "my cat.png")),
    ("/image my\\ cat.png", Command("image", "my cat.png")),
    ("/img https://example.com/a.jpg", Command("image", "https://example.com/a.jpg")),
    ("/system You are terse.", Command("system", "You are terse.")),
    ("/system", Command("system", "")),
    ("/set temperature 0.2", Command("set", "temperature 0.2")),
    ("/SET top-p 0.9", Command("set", "top-p 0.9")),
    ("  /clear  ", Command("clear", "")),
    ("/save chat.json", Command("save", "chat.json")),
    ("/load chat.json", Command("load", "chat.json")),
    ("/stats", Command("stats", "")),
    ("/?", Command("help", "")),
    ("/quit", Command("exit", "")),
    ("/bye", Command("exit", "")),
    ("/set\ttop-k 5", Command("set", "top-k 5")),
    ("/system Be terse.\nAnswer in French.", Command("system", "Be terse.\nAnswer in French.")),  # a \"\"\" block
])
def test_commands_are_parsed(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize("line", [
    "hello", "  what is 2/3?", "", "/tmp/cat.png what is this?", "/home/me/photo.jpg",
])
def test_messages_are_not_commands(line):
    assert parse_command(line) is None


def test_an_existing_path_at_the_start_is_a_message(tmp_path):
    # "/tmp" has no second slash but names an existing path: a message about it, not a command.
    assert parse_command(f"{tmp_path.anchor}tmp is it full?") is None
    with pytest.raises(UsageError):
        parse_command("/no-such-command-or-path")


def test_unknown_command_names_every_known_one():
    with pytest.raises(UsageError) as caught:
        parse_command("/imgae cat.png")
    message = str(caught.value)
    assert "\n" not in message and "/imgae" in message
    for name in ("/image", "/system", "/set", "/clear", "/save", "/load", "/stats", "/help", "/exit"):
        assert name in message


@pytest.mark.parametrize(("line", "needle"), [
    ("/image", "/image PATH"), ("/save", "/save FILE"), ("/load  ", "/load FILE"), ("/clear all", "no argument"),
    # a \"\"\" block: the question after a path would otherwise become part of the path
    ("/image cat.png\nwhat is in it?", "/image takes one line; send what follows it as a message of its own"),
    ("/set seed 1\n2", "/set takes one line"),
])
def test_missing_or_extra_arguments_are_one_line_errors(line, needle):
    with pytest.raises(UsageError) as caught:
        parse_command(line)
    assert needle in str(caught.value)


def test_help_lists_every_command():
    text = "\n".join(help_lines())
    assert all(f"/{name}" in text for name in COMMANDS) and '"""' in text


# --- image paths in a message ----------------------------------------------------------------


def test_image_paths_in_a_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("cat.png", "my dog.JPG", "b.webp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    found = image_paths_in(
        f"what's in cat.png? compare with 'my dog.JPG' and {tmp_path}/b.webp, not missing.png, "
        "notes.txt or folder.png (and cat.png again)"
    )
    assert found == [Path("cat.png"), Path("my dog.JPG"), tmp_path / "b.webp"]
    assert image_paths_in("my\\ dog.JPG please") == [Path("my dog.JPG")]
    assert image_paths_in("no pictures here") == []


# --- /set ------------------------------------------------------------------------------------


def test_set_changes_each_sampling_setting():
    opts = default_options()
    opts = changed(opts, "temperature", "0.2")
    opts = changed(opts, "top-p", "0.9")
    opts = changed(opts, "--top-k", "40")
    opts = changed(opts, "seed", "7")
    opts = changed(opts, "max_tokens", "400")
    opts = changed(opts, "stop", "###")
    assert (opts.temperature, opts.top_p, opts.top_k, opts.seed, opts.max_tokens, opts.stop) == (
        0.2, 0.9, 40, 7, 400, ("###",))
    assert dict(shown(opts)) == {
        "max-tokens": "400", "temperature": "0.2", "top-p": "0.9", "top-k": "40", "seed": "7", "stop": '["###"]',
    }
    # Other fields are untouched.
    assert opts.model == SETTINGS["model"].default and opts.device == SETTINGS["device"].default


def test_set_aliases_lists_quotes_and_turning_off():
    opts = default_options()
    assert changed(opts, "t", "1.5").temperature == 1.5
    assert changed(opts, "n", "12").max_tokens == 12
    assert changed(opts, "stop", '["a", "b c"]').stop == ("a", "b c")
    assert changed(opts, "stop", '"\\n\\n"').stop == ("\n\n",)
    assert changed(opts, "stop", "'x y'").stop == ("x y",)
    seeded = changed(opts, "seed", "3")
    assert changed(seeded, "seed", "random").seed is None
    assert changed(changed(opts, "stop", "###"), "stop", "none").stop == ()


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("temperature", "-1", "/set temperature must be >= 0"),
    ("temperature", "hot", "/set temperature must be a number"),
    ("top-p", "1.5", "/set top-p must be in (0, 1]"),
    ("top-k", "2.5", "/set top-k must be an integer"),
    ("max-tokens", "0", "/set max-tokens must be >= 1"),
    ("seed", "-4", "/set seed must be >= 0"),
    ("temperature", "", "needs a value"),
    ("colour", "red", "unknown setting 'colour'"),
])
def test_bad_set_values_are_one_line_errors(name, value, needle):
    with pytest.raises(UsageError) as caught:
        changed(default_options(), name, value)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


# --- the transcript --------------------------------------------------------------------------


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for colour in ("red", "blue"):
        path = tmp_path / f"{colour}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(path)
    return paths


def sample_conversation(pictures) -> Conversation:
    chat = Conversation()
    chat.set_system("Be brief.")
    red, blue = (Image.open(p) for p in pictures)
    chat.add("user", "What colour?", [red], [str(pictures[0])])
    chat.add("assistant", "Red.")
    chat.add("user", "And these? «ünïcode»", [blue, red], [str(pictures[1]), "https://example.com/r.png"])
    chat.add("assistant", "Blue and r", interrupted=True)
    return chat


def test_saved_transcript_is_the_documented_json(tmp_path, pictures):
    opts = default_options(temperature=0.2, top_p=0.9, top_k=40, seed=7, max_tokens=400, stop=("###",))
    path = tmp_path / "chat.json"
    save_transcript(path, sample_conversation(pictures), opts, "aria-int4")
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "format": "aria-chat",
        "version": 1,
        "model": "aria-int4",
        "system": "Be brief.",
        "settings": {"max_tokens": 400, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["###"]},
        "turns": [
            {"role": "user", "text": "What colour?", "images": [str(pictures[0])], "interrupted": False},
            {"role": "assistant", "text": "Red.", "images": [], "interrupted": False},
            {"role": "user", "text": "And these? «ünïcode»",
             "images": [str(pictures[1]), "https://example.com/r.png"], "interrupted": False},
            {"role": "assistant", "text": "Blue and r", "images": [], "interrupted": True},
        ],
    }
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_picture_whose_file_name_is_not_utf8_is_saved_and_reopened(tmp_path, pictures):
    # Linux file names are bytes; Python shows a non-UTF-8 one with surrogates, which JSON escapes.
    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    odd.write_bytes(pictures[0].read_bytes())
    chat = Conversation()
    chat.add("user", "What colour?", [Image.open(odd)], [str(odd)])
    path = tmp_path / "chat.json"
    save_transcript(path, chat, default_options(), "demo")
    from runtime.image_sources import load_image

    loaded = load_transcript(path, default_options(), load_image)
    assert loaded.missing_images == [] and loaded.conversation.turns[0].image_sources == [str(odd)]


def test_transcript_round_trip_reopens_images_and_reports_missing_ones(tmp_path, pictures):
    opts = default_options(temperature=0.2, seed=7, stop=("###", "END"))
    path = tmp_path / "chat.json"
    save_transcript(path, sample_conversation(pictures), opts, "demo")
    pictures[1].unlink()
    opened = []

    def open_image(source):
        opened.append(source)
        if source.startswith("https://"):
            raise ImageError(f"cannot fetch {source}: offline mode allows no downloads")
        from runtime.image_sources import load_image

        return load_image(source)

    loaded = load_transcript(path, default_options(model="other"), open_image)
    assert opened == [str(pictures[0]), str(pictures[1]), "https://example.com/r.png"]
    assert len(loaded.missing_images) == 2
    assert "turn 3" in loaded.missing_images[0] and "blue.png does not exist" in loaded.missing_images[0]
    assert "turn 3" in loaded.missing_images[1] and "example.com" in loaded.missing_images[1]
    assert loaded.model == "demo"
    settings = loaded.settings
    assert (settings.temperature, settings.seed, settings.stop, settings.model) == (0.2, 7, ("###", "END"), "other")
    chat = loaded.conversation
    assert chat.system == "Be brief."
    assert [(t.role, t.text, t.image_sources, t.interrupted) for t in chat.turns] == [
        ("system", "Be brief.", [], False),
        ("user", "What colour?", [str(pictures[0])], False),
        ("assistant", "Red.", [], False),
        ("user", "And these? «ünïcode»", [], False),
        ("assistant", "Blue and r", [], True),
    ]
    red = chat.turns[1].images[0]
    assert red.size == (40, 30) and red.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    # What was loaded saves back to the same document, minus the images that could not be opened.
    again = transcript_json(chat, settings, "demo")
    assert again["turns"][0]["images"] == [str(pictures[0])] and again["settings"] == settings_json(settings)


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"format": "something-else"}', "is not an aria chat transcript"),
    ('{"format": "aria-chat", "version": 9, "turns": []}', "version 9"),
    ('{"format": "aria-chat", "version": 1, "turns": {}}', "'turns' must be a list"),
    ('{"format": "aria-chat", "version": 1, "turns": [{"role": "robot", "text": "hi"}]}', "'role' must be one of"),
    ('{"format": "aria-chat", "version": 1, "turns": [{"role": "user", "text": 3}]}', "'text' must be a string"),
    ('{"format": "aria-chat", "version": 1, "turns": [], "settings": {"temperature": -2}}',
     "'temperature' must be >= 0"),
    ('{"format": "aria-chat", "version": 1, "turns": [], "settings": {"colour": 1}}', "unknown setting 'colour'"),
])
def test_bad_transcripts_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError) as caught:
        load_transcript(path, default_options(), lambda source: None)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_missing_transcript_and_unwritable_target(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_transcript(tmp_path / "nope.json", default_options(), lambda source: None)
    with pytest.raises(UsageError, match="cannot write"):
        save_transcript(tmp_path / "no-such-dir" / "chat.json", Conversation(), default_options(), "demo")


def test_save_where_no_file_can_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("hi")
    (tmp_path / "ro").mkdir()
    real_write, real_unlink = Path.write_text, Path.unlink

    def refused(real):  # under `ro`, what a read-only file system does: writing and removing fail
        def call(self, *args, **kwargs):
            if self.parent == tmp_path / "ro":
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real(self, *args, **kwargs)
        return call

    monkeypatch.setattr(Path, "write_text", refused(real_write))
    monkeypatch.setattr(Path, "unlink", refused(real_unlink))
    monkeypatch.chdir(tmp_path)
    for target, line in [
        (tmp_path / "afile" / "chat.json", f"cannot write {tmp_path}/afile/chat.json: Not a directory; choose another file"),
        (tmp_path / "ro" / "chat.json", f"cannot write {tmp_path}/ro/chat.json: Read-only file system; choose another file"),
        (Path("."), f"{tmp_path} is a directory; give a file name, e.g. /save {tmp_path}/chat.json"),
        (Path("/"), "/ is a directory; give a file name, e.g. /save /chat.json"),
    ]:
        with pytest.raises(UsageError) as caught:
            save_transcript(target, Conversation(), default_options(), "demo")
        assert str(caught.value) == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"] and not any((tmp_path / "ro").iterdir())


def test_every_set_name_is_a_setting_and_is_saved():
    assert set(settings_json(default_options())) == set(NAMES) <= set(SETTINGS)


# --- reading input (the terminal side is driven in test_cli_chat.py) ------------------------


def test_triple_quotes_make_one_message_of_several_lines(monkeypatch, capsys):
    from aria_cli.chat_input import LineReader

    typed = '"""First line\n\n  indented\nlast"""\n"""all on one line"""\nplain\n"""never\nclosed\n'
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    reader = LineReader(history_file=None)
    assert not reader.interactive
    assert reader.read_message() == "First line\n\n  indented\nlast"
    assert reader.read_message() == "all on one line"
    assert reader.read_message() == "plain"
    # Piped input that ends inside a block: the script meant it as its last message, so it is sent.
    assert reader.read_message() == "never\nclosed"
    assert capsys.readouterr().err == 'warning: the input ended inside a """ block; taking it as it is\n'
    with pytest.raises(EOFError):
        reader.read_message()


class _Terminal(io.StringIO):
    """Typed at a terminal (stdout is not one: `aria chat | tee log`), Ctrl-D at the end."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin", [io.StringIO('"""\n'), _Terminal('"""\nhalf a\nthought\n')],
                         ids=["empty block", "Ctrl-D at a terminal"])
def test_an_unclosed_block_that_is_empty_or_left_at_a_terminal_is_not_sent(monkeypatch, capsys, stdin):
    from aria_cli.chat_input import LineReader

    monkeypatch.setattr("sys.stdin", stdin)
    reader = LineReader(history_file=None)
    assert not reader.interactive
    with pytest.raises(EOFError):
        reader.read_message()
    assert capsys.readouterr().err == 'warning: the unfinished """ block was not sent\n'


# --- the chat process: a failed /save keeps the chat going, a stop signal ends it -----------


def test_chat_survives_a_failed_save_and_ends_on_sigterm(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)
    (tmp_path / "afile").write_text("hi")
    proc = subprocess.Popen([sys.executable, "-m", "aria_cli", "chat", "-m", "demo"], env=dict(os.environ),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(f"/save {tmp_path}/afile/chat.json\n/save {tmp_path}/chat.json\n")
    proc.stdin.flush()
    said = []
    while (line := proc.stderr.readline()) and not line.startswith("saved"):
        said.append(line)
    assert said[-1] == f"error: cannot write {tmp_path}/afile/chat.json: Not a directory; choose another file\n"
    assert line == f"saved 0 turn(s) to {tmp_path}/chat.json\n"
    proc.send_signal(signal.SIGTERM)  # waiting for the next line, stdin still open
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (143, "", "terminated (SIGTERM)\n")


def test_load_refuses_what_is_no_transcript_without_reading_it_all(tmp_path):
    """/dev/zero would fill memory; nesting or numbers past Python's limits would crash the parser."""
    cases = [(Path("/dev/zero"), "is not a regular file")]
    big = tmp_path / "big.json"
    with big.open("wb") as file:  # sparse: size without the bytes
        file.truncate(65 * 2**20)
    cases.append((big, "too big for a chat transcript"))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases.append((deep, "is not an aria chat transcript (RecursionError"))
    digits = tmp_path / "digits.json"
    digits.write_text('{"settings": {"top_k": ' + "9" * 5000 + "}}")
    cases.append((digits, "is not an aria chat transcript (ValueError"))
    for path, needle in cases:
        with pytest.raises(UsageError, match=re.escape(needle)):
            load_transcript(path, default_options(), lambda source: None)
