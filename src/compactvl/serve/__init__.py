"""``compactvl serve``: a saved CompactVLM behind an OpenAI-compatible HTTP API (docs/serving.md).

    from compactvl.serve import ServeSettings, ServerThread, build_app
    with ServerThread(model, ServeSettings(model_name="demo")) as srv:   # srv.url = http://127.0.0.1:PORT
        ...  # openai.OpenAI(base_url=srv.url + "/v1", api_key="none").chat.completions.create(...)

Needs the ``serve`` extra (fastapi, uvicorn; the tests drive it with openai and httpx): ``pip install
'compactvl[serve]'``. Modules: ``settings`` (the limits), ``protocol`` (request checks, images), ``engine`` (the
batcher), ``app`` (the routes), ``server`` (uvicorn); ``vllm_contract`` (no extra needed: the pure functions a
vLLM plugin sizes placeholders and prunes with).
"""
from __future__ import annotations

import importlib

# Names resolve on first use, so ``compactvl.serve.vllm_contract`` (torch and compactvl only, for a vLLM plugin)
# imports without the serve extra.
_WHERE = {"build_app": "app", "Engine": "engine", "ApiError": "protocol", "ServerThread": "server",
          "load_model": "server", "serve": "server", "ServeSettings": "settings"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
