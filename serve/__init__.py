"""dg_serve: an OpenAI-compatible HTTP server over dg_runtime, with a page at / that shows the canvas refine.

    dg-serve tiny.dg      # http://127.0.0.1:8080

engine.py runs generations one at a time on the loaded model; prefix_cache.py keeps earlier prompts' KV;
openai_api.py speaks OpenAI's request and response formats; app.py is the HTTP side; page.html the page.
"""
