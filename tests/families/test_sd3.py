"""SD3 / SD3.5 (two CLIP encoders on the tiny pipeline, true CFG) keeps the families' contract (its loading,
conditioning and sampling equal to the stock pipeline are in test_policy.py)."""

from contract import FamilyContract


class TestSD3Contract(FamilyContract):
    family = "sd3"
