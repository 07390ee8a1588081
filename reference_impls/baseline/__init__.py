from reference_impls.baseline.full import Full

__all__ = ["Full"]
