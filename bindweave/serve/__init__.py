"""A resident BindWeave server with the OpenAI-style Videos API (docs/SERVING.md).

    BINDWEAVE_API_KEYS=sk-local-123456 python launch/serve.py serve.port=8000

The models load once; each request is stage 2 (Qwen2.5-VL hidden states, in memory) and stage 3
(``Stage3Engine.run``) on the worker thread. One module per job:

- ``settings.py``   ``serve.*`` (the entry point's whole schema, ``ServeConfig``, is in bindweave/app/config.py;
                    config -> keys, port, job table, models, worker, app -> uvicorn: bindweave/app/serve.py)
- ``api.py``        the HTTP routes (FastAPI) and the OpenAI video object
- ``job_request.py``  a request's fields and uploads checked, the job queued
- ``store.py``      the job table (SQLite or PostgreSQL: ``database.py``) and each job's folder
- ``worker.py``     the engine's thread: queue order, leases, progress, cancel, drain
- ``callbacks.py``  completion webhooks (``callback_url``)
- ``hidden_states.py``  stage 2 for one request, in memory
- ``auth.py``, ``metrics.py``, ``errors.py``   bearer keys, Prometheus text, the API's error shape
"""
