"""`aria chat`: talk with the model, turn after turn, in the terminal.

This module is only the command (its flags and help); the REPL is in chat_repl.py, imported when
the command runs so that `aria --help` does not load torch. Only a model that fails to load
ends the chat with an error (exit 1); everything after that is handled inside the REPL.
"""

from __future__ import annotations

import sys

from runtime.errors import UsageError

from .options import RunOptions, with_options


@with_options(RunOptions, hidden=("json",))  # refused below with a pointer to /save
def chat(opts: RunOptions) -> None:
    """Chat with the model in the terminal; answers stream as they are written.

    Type a message and press Enter. `/image PATH|URL` attaches a picture to your next message (an
    image path typed in a message is attached too), `/set temperature 0.7` changes a setting,
    `/save FILE` and `/load FILE` keep a conversation, `/help` lists every command. Use three
    double quotes to start and end a message of several lines. Ctrl-C stops an answer and keeps
    the chat; Ctrl-D leaves.
    """
    if opts.json:
        raise UsageError("--json is for `aria ask`; aria chat is interactive (use /save FILE for a JSON transcript)")
    if sys.stdin is None:  # started with stdin closed (`aria chat <&-`): say so before loading a model
        raise UsageError("aria chat reads your messages from standard input, which is closed; run it in a "
                         "terminal or pipe the messages in")
    from .assistant_loader import open_assistant
    from .chat_repl import Chat

    assistant = open_assistant(opts)
    Chat(assistant, opts).run()


