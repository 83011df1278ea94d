"""Celery worker of the RSAE upgrade stack: a thin task that runs :func:`rsae.pipeline.run_upgrade`."""
