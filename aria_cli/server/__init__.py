"""`aria serve`: an OpenAI-compatible HTTP server over one loaded model.

- chat_request.py: a chat completion request, checked field by field (OpenAI's wire format in);
- completions.py: completion objects, stream chunks and error objects (OpenAI's wire format out);
- model_worker.py: answers one request at a time on one thread, with a bounded wait queue;
- app.py: the Starlette routes, authentication, body limit and streaming;
- the command itself (flags, loading, listening, signals) is aria_cli/serve.py.
"""
