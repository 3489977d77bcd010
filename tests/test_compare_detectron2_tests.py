"""scripts/compare_detectron2_tests.py: detectron2's own tests with and without the plug-in, compared."""
import importlib.util
import os
import textwrap

from .conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("compare_d2_tests", os.path.join(REPO, "scripts", "compare_detectron2_tests.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_checkouts_tests_run_with_and_without_the_plug_in_and_differences_are_listed(tmp_path):
    """A stand-in checkout: one test whose outcome does not depend on the plug-in, one that does (it
    asks whether a plug-in name is known); only the second is listed, and the status says so."""
    tests = tmp_path / "src" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_norms.py").write_text(textwrap.dedent('''
        from detectron2.layers import get_norm

        def test_detectron2_names():
            assert get_norm("BN", 4) is not None

        def test_plugin_name_unknown():
            import detectron2.layers
            try:
                detectron2.layers.get_norm("GhostBN", 4)
            except KeyError:
                return
            raise AssertionError("GhostBN is known")
    '''))
    script = _script()
    out = tmp_path / "out"
    status = script.main(["--detectron2-src", str(tmp_path / "src"), "--tests", "tests/test_norms.py", "--out", str(out)])
    assert status == 1
    comparison = (out / "comparison.txt").read_text().splitlines()
    assert comparison == ["test_norms::test_plugin_name_unknown: passed without the plug-in, failed with it"]
    without = script.outcomes(str(out / "junit_without_plugin.xml"))
    assert without == {"test_norms::test_detectron2_names": "passed", "test_norms::test_plugin_name_unknown": "passed"}
