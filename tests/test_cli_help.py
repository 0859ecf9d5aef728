"""Every entry point's --help shows its module's whole description, not a sentence cut at a line break."""

import importlib

import pytest

MODULES = ["workflows.generate", "workflows.quality", "workflows.bench", "workflows.calibrate", "workflows.inspect",
           "workflows.train_demo", "workflows.serve", "workflows.report", "benchmarks.adaptive",
           "benchmarks.adaptive_cost", "benchmarks.chaos", "benchmarks.report"]


@pytest.mark.parametrize("name", MODULES)
def test_help_shows_the_whole_first_paragraph_of_the_module_docstring(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    first_paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
    assert first_paragraph in shown
    assert first_paragraph.endswith(".")
