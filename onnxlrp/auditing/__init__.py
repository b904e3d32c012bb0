"""``onnxlrp audit``: the checks a CI pipeline runs on every export (checks.py), drift against a baseline
or another export (drift.py), and the report's pictures and HTML page (report.py)."""
from .checks import (CHECKS, DEFAULT_THRESHOLDS, FAITHFULNESS_DEFAULTS, AuditReport, CheckResult, audit,
                     conservative_rules, faithfulness_options, synthetic_inputs, without_biases)
from .drift import Baseline, BaselineError, load_baseline

__all__ = ["AuditReport", "Baseline", "BaselineError", "CheckResult", "CHECKS", "DEFAULT_THRESHOLDS",
           "FAITHFULNESS_DEFAULTS", "audit", "conservative_rules", "faithfulness_options", "load_baseline",
           "synthetic_inputs", "without_biases"]
