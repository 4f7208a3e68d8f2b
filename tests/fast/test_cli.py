"""The `subpeft` command line's method listing."""

import json

from subpeft.cli import main


def test_methods_table_lists_lora(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["method", "family", "kind", "mergeable"]
    lora = next(line for line in out if line.startswith("lora "))
    assert "extension" in lora and "r·(d_in + d_out)" in lora


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lora"]["mergeable"] is True and rows["lora"]["kind"] == "weight"
    assert rows["lora"]["layer_types"] == ["linear", "conv1d", "embedding", "conv2d"]


def test_readme_method_table_matches_the_registry():
    """The README lists every registered method as the registry describes it (regenerate with
    `subpeft methods --markdown`)."""
    from pathlib import Path

    from subpeft.cli import methods_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- methods-table:begin -->\n", "\n<!-- methods-table:end -->"
    assert begin in readme and end in readme, "README.md lost its generated method table markers"
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == methods_markdown(), "README method table is stale: paste `subpeft methods --markdown`"
