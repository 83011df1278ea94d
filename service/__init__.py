"""HTTP service of the RSAE upgrade stack: FastAPI routes, SQL models, enqueueing, artifact streaming.

Thin by design: no numerical code lives here (that is :mod:`rsae`); the Celery task is in :mod:`worker`.
"""
