"""``docs/settings.md`` lists every setting with its default: generated from ``service/config.py``, checked here."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings, settings_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_checked_in_settings_doc_equals_the_generated_one():
    """Regenerate with ``python -m service.config > docs/settings.md`` after adding or changing a setting."""
    assert DOC.read_text() == settings_markdown()


def test_every_setting_is_described():
    missing = [name for name, field in Settings.model_fields.items() if len((field.description or "").strip()) < 10]
    assert missing == []
