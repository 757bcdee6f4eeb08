"""The public API a fastai or pytorch-grad-cam user finds at once (issue 17)."""

import subprocess
import sys

import weakloc


def test_the_entry_points_import_from_the_package():
    from weakloc import calibrate, evaluate, evaluate_counts, explain, fine_tune, load_model, localize  # noqa: F401
    from weakloc.evaluate.calibrate import calibrate as calibrate_fn
    from weakloc.evaluate.run import evaluate_model
    from weakloc.explain import explain as explain_fn
    from weakloc.report.localization import localize_images
    from weakloc.train.fit import fine_tune as fine_tune_fn

    assert (explain, localize, evaluate, calibrate, fine_tune) == (explain_fn, localize_images, evaluate_model, calibrate_fn, fine_tune_fn)


def test_every_listed_name_resolves_and_subpackages_do_not_shadow_functions():
    import weakloc.evaluate.wsol  # noqa: F401  (importing subpackages must not replace the functions)
    import weakloc.explain.maps  # noqa: F401
    import weakloc.localize.regions  # noqa: F401

    for name in weakloc.API:
        assert getattr(weakloc, name) is not None, name
    assert callable(weakloc.localize) and callable(weakloc.evaluate) and callable(weakloc.explain)
    assert weakloc.localize.__name__ == "localize_images" and weakloc.evaluate.__name__ == "evaluate_model"
    assert set(weakloc.API) <= set(dir(weakloc)) and set(weakloc.__all__) == {"__version__", *weakloc.API}


def test_import_weakloc_is_light():
    code = "import sys, weakloc; print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_results_are_typed_with_to_dict():
    from weakloc import CalibrationResult, CountingReport, EvaluationReport, LocalizationResult
    from weakloc.results import Result

    for cls in (CalibrationResult, CountingReport, EvaluationReport, LocalizationResult):
        assert issubclass(cls, Result) and callable(cls.to_dict)
