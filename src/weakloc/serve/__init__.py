"""``weakloc serve``: a local web page and JSON API for a model's heatmaps, boxes and counts.

:func:`~weakloc.serve.app.run_server` serves a loaded model; :func:`~weakloc.serve.app.create_app`
builds the ASGI app around a :class:`~weakloc.serve.service.Service` (the model, its batching
queue and kept results). Every result is computed by :func:`weakloc.localize.run.localize_batches`
and has ``weakloc localize``'s schema; docs/serve.md describes the page and the API.
"""
