"""``compactvl serve``: a saved CompactVLM behind an OpenAI-compatible HTTP API (docs/serving.md).

    from compactvl.serve import ServeSettings, ServerThread, build_app
    with ServerThread(model, ServeSettings(model_name="demo")) as srv:   # srv.url = http://127.0.0.1:PORT
        ...  # openai.OpenAI(base_url=srv.url + "/v1", api_key="none").chat.completions.create(...)

Needs the ``serve`` extra (fastapi, uvicorn; the tests drive it with openai and httpx): ``pip install
'compactvl[serve]'``. Modules: ``settings`` (the limits), ``protocol`` (request checks, images), ``engine`` (the
batcher), ``app`` (the routes), ``server`` (uvicorn).
"""
from .app import build_app
from .engine import Engine
from .protocol import ApiError
from .server import ServerThread, load_model, serve
from .settings import ServeSettings

__all__ = ["ApiError", "Engine", "ServeSettings", "ServerThread", "build_app", "load_model", "serve"]
