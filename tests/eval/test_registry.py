"""The evaluation registry: every entry loads under its name; the CLI, sweep and report loop over it."""
import pytest

from bcssl.cli import main
from bcssl.eval import registry


def test_every_entry_loads_under_its_name_and_help_lists_each_on_one_line(capsys):
    for e in registry.REGISTRY:
        ev = registry.get(e.name)
        assert isinstance(ev, registry.Evaluation) and ev.name == e.name and ev.result_file == f"{e.name}.json"
        assert "\n" not in e.help
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for e in registry.REGISTRY:
        assert sum(line.split()[:1] == [e.name] for line in out.splitlines()) == 1, e.name
    assert [ev.name for ev in registry.in_order(["robustness", "knn"])] == ["linear", "robustness", "knn"]
    with pytest.raises(ValueError, match="choose from"):
        registry.get("knnn")
