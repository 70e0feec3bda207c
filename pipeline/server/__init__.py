"""The dataengine web app: curation dashboard and SAM-assisted browser annotation, one server.

``create_app(root, host=...)`` builds the FastAPI app (:mod:`dataengine.pipeline.server.app`);
``dataengine dashboard --root ROOT`` serves it with uvicorn. Static pages (plain JS, no build
step) live in ``pipeline/server/static/``.
"""
