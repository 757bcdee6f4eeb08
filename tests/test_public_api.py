"""The public API a fastai or pytorch-grad-cam user finds at once (issue 17)."""

import subprocess
import sys

import weakloc


def test_the_entry_points_import_from_the_package():
    from weakloc import calibrate, evaluate_counts, fine_tune, load_model  # noqa: F401
    from weakloc.evaluate.calibrate import calibrate as calibrate_fn
    from weakloc.train.fit import fine_tune as fine_tune_fn

    assert (calibrate, fine_tune) == (calibrate_fn, fine_tune_fn)


def test_explain_localize_and_evaluate_are_packages_and_functions(tmp_path):
    import inspect

    import torch

    from weakloc import evaluate, explain, localize
    import weakloc.localize.run as run  # the packages import as usual, before or after
    from weakloc.evaluate.run import evaluate_model
    from weakloc.explain import explain as explain_fn
    from weakloc.localize import region_boxes  # noqa: F401
    from weakloc.models import ModelConfig, WeaklocNet
    from weakloc.report.localization import localize_images

    assert run.__name__ == "weakloc.localize.run" and localize is weakloc.localize and explain is weakloc.explain
    assert inspect.signature(localize) == inspect.signature(localize_images)
    assert inspect.signature(evaluate) == inspect.signature(evaluate_model)
    assert inspect.signature(explain) == inspect.signature(explain_fn)
    net = WeaklocNet(ModelConfig(backbone="test_resnet", classes=["a", "b"], input_size=32), pretrained="none").eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(explain(net, x, "cam").raw, explain_fn(net, x, "cam").raw)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    assert localize(net, [tmp_path / "a.png"]).to_dict() == localize_images(net, [tmp_path / "a.png"]).to_dict()


def test_a_package_imported_first_is_callable_too():
    code = ("import weakloc.evaluate.wsol, weakloc; from weakloc import evaluate; "
            "print(callable(evaluate), evaluate.__name__, evaluate.__function__.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True weakloc.evaluate evaluate_model"


def test_every_listed_name_resolves():
    for name in [*weakloc.API, *weakloc.CALLABLE_PACKAGES]:
        assert getattr(weakloc, name) is not None, name
    assert set(weakloc.API) <= set(dir(weakloc)) and set(weakloc.__all__) == {"__version__", *weakloc.API, *weakloc.CALLABLE_PACKAGES}


def test_import_weakloc_is_light():
    code = "import sys, weakloc; print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_results_are_typed_with_to_dict():
    from weakloc import CalibrationResult, CountingReport, EvaluationReport, LocalizationResult
    from weakloc.results import Result

    for cls in (CalibrationResult, CountingReport, EvaluationReport, LocalizationResult):
        assert issubclass(cls, Result) and callable(cls.to_dict)
