"""``report.json`` is part of the product: its JSON Schema is checked in, and reports validate against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from rsae.report import REPORT_SCHEMA_VERSION, CurvePoint, Report, report_json_schema

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"


def test_checked_in_schema_equals_the_generated_one():
    """Regenerate with ``python -m rsae.report > docs/report.schema.json`` after changing a section."""
    assert json.loads(SCHEMA.read_text()) == report_json_schema()


def test_schema_version_and_typed_sections():
    schema = report_json_schema()
    assert REPORT_SCHEMA_VERSION == "rsae-report/9"
    for section in (
        "HostModel",
        "TeacherInfo",
        "DataSection",
        "ActivationStorage",
        "RemezSection",
        "CalibrationSection",
        "FinetuneSection",
        "ControlSection",
        "ProbingSection",
        "Plots",
        "SAEMetrics",
        "Comparison",
        "LatentIdentitySection",
        "EvalSplit",
        "UpgradeConfig",
    ):
        assert section in schema["$defs"], section


def test_curve_points_keep_the_lambda_key_and_sections_refuse_unknown_fields():
    p = CurvePoint.model_validate(
        {"step": 1, "train_mse": 1.0, "train_l0": 2.0, "lambda": 0.5, "eval_mse": 1.0, "eval_l0": 2.0, "eval_fvu": 0.1}
    )
    assert p.model_dump(mode="json", by_alias=True)["lambda"] == 0.5
    with pytest.raises(ValidationError):
        Report.model_validate({"schema_version": REPORT_SCHEMA_VERSION, "unknown_section": {}})
